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


def check_resume_across_the_indexer_stages(tmp_path, make_cfg, **sections) -> None:
    """A run stopped in the dense warm-up (step 2), resumed, killed in sparse training (step 5:
    the last checkpoint is step 4) and resumed again has the uninterrupted run's losses, indexer
    KLs and final weights exactly (V3.2's and V4's indexer training)."""
    import pytest
    import torch

    from nanoseek.train.checkpoint import latest_checkpoint, step_of
    from nanoseek.train.metrics import read_metrics, step_records

    ta, ra = fit_pretraining(make_cfg(tmp_path, "a", **sections))
    assert ra.status == "done"
    ref = step_records(read_metrics(tmp_path / "a"))
    b = make_cfg(tmp_path, "b", **sections)
    _, r1 = fit_pretraining(b, hooks=[StopAt(2)])
    assert r1.status == "interrupted" and r1.step == 2
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit_pretraining(b, resume=True, hooks=[CrashAt(5)])
    assert step_of(latest_checkpoint(tmp_path / "b")) == 4
    tb, r3 = fit_pretraining(b, resume=True)
    assert r3.status == "done" and r3.step == 6
    got = step_records(read_metrics(tmp_path / "b"))
    for s in range(1, 7):
        assert (got[s]["loss"], got[s]["indexer_loss"]) == (ref[s]["loss"], ref[s]["indexer_loss"]), s
    for (k, va), vb in zip(ta.model.state_dict().items(), tb.model.state_dict().values()):
        assert torch.equal(va, vb), k


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
