"""Shared pieces of the training tests: running a pretraining config through the one Trainer as
``nanoseek pretrain`` does, hooks that stop or kill a run at a chosen step (for the exact-resume
tests: test_train_loop, test_train_dsa, test_adversarial_spike), and real prepared shards
(test_train_pretrain, test_v4_usage, test_readme_tour)."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.train.loop import ExpertBalanceHook, Hook, Trainer
from nanoseek.train.pretrain import build_pretraining


def dsa_config(tmp_path, model: dict, seq_len: int, name="run", **sections):
    """A short pretraining config for the indexer-training tests (V3.2's and V4's): 6 steps, a
    3-step dense warm-up, checkpoints every 2 steps; ``sections`` update its tables."""
    from nanoseek.train.config import config_from_dict

    raw = {"model": dict(model), "data": {"source": "synthetic", "val_batches": 1},
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "micro_batch_size": 2, "grad_accum": 2,
                     "seq_len": seq_len},
           "train": {"max_steps": 6, "eval_every": 3, "save_every": 2, "keep_last": 5, "dsa_warmup_steps": 3,
                     "out_dir": str(tmp_path / name)},
           "spike": {"min_history": 3}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, name)


def fit_pretraining(cfg, resume=False, hooks=(), wrap_task=None):
    """Build ``cfg``'s model and task, train with the expert-balance hook and ``hooks``; returns
    (trainer, result). ``wrap_task`` may replace the task (e.g. to inject bad batches)."""
    model, task, files = build_pretraining(cfg)
    if wrap_task is not None:
        task = wrap_task(task)
    trainer = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, cfg.train.out_dir,
                      hooks=[ExpertBalanceHook(cfg.train.bias_update_gamma), *hooks], config=cfg.to_dict(),
                      final_files=files, progress=False, quiet=True)
    return trainer, trainer.fit(resume=resume)


class StopAt(Hook):
    """Asks the run to stop (a clean stop: it saves) after step ``step``."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer, applied):
        if trainer.step + 1 == self.step:
            trainer.request_stop("test")


class CrashAt(Hook):
    """Kills the run (an exception, no save) after step ``step``."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer, applied):
        if trainer.step + 1 == self.step:
            raise RuntimeError("simulated kill")


def prepare_prose_shards(tmp: Path) -> Path:
    """Real shards as `nanoseek data prepare` makes them (a 300-token BPE trained on the built-in
    prose, 10% validation) under ``tmp / "out"``; returns that folder."""
    from nanoseek.data.corpus import plain_text_documents
    from nanoseek.data.prepare import PrepareConfig, prepare_inputs

    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in plain_text_documents()), encoding="utf-8")
    prepare_inputs([src], tmp / "out", None, PrepareConfig(vocab_size=300, val_fraction=0.1))
    return tmp / "out"
