"""Adversarial tests of the loss-spike guard (issue 17, class 3): safe by construction.

Reproductions: a clean small corpus (``nanoseek data corpus --task-docs 600``) skipped ordinary
prose batches, rolled back and aborted; resuming a finished run with a learning rate that blows
up deleted its last checkpoint; skipped steps wrote checkpoints that pushed the good one out of
``keep_last``; a long garbage document led to rollback, rollback, "diverged" and a run that could
not be resumed. Each is a test here, with the policy's other promises (see ``spike.py``).
"""

from __future__ import annotations

import random

import pytest
import torch

from nanoseek.cli import UserError, main as cli_main
from nanoseek.data.corpus import DEFAULT_TASKS, default_corpus_records
from nanoseek.data.prepare import Document, PrepareConfig, prepare
from nanoseek.train.checkpoint import (discard_after, latest_checkpoint, list_checkpoints, prune_checkpoints,
                                       save_checkpoint, step_of)
from nanoseek.errors import ConfigError
from nanoseek.train.config import config_from_dict
from nanoseek.train.loop import ExpertBalanceHook, Hook, Trainer, TrainingDiverged
from nanoseek.train.metrics import events, read_metrics, step_records
from pydoc_data.topics import topics
from nanoseek.train.pretrain import build_pretraining

from train_helpers import fit_pretraining as fit

TINY = dict(preset="tiny", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2,
            num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, max_position_embeddings=128)
GARBAGE = "garbage"


def _prepare(out, docs, vocab=512, filters=True):
    cfg = PrepareConfig(vocab_size=vocab, val_fraction=0.01, overwrite=True)
    if not filters:
        cfg.filters = None
    prepare(docs, out, cfg=cfg)
    return out


def _clean_docs() -> list[Document]:
    """The issue's corpus: 600 task documents in one wording per task, and the prose. (With the varied
    wordings the median loss is higher and the prose tail thinner: 1.9x the median, not the 2x
    test_clean_small_corpus_guard_on_no_skip_no_rollback checks, the guard skipping nothing there either; and fewer
    repeats are deduplicated, which moves the documents inserted below into the validation split.)"""
    return list(default_corpus_records(600, tasks=[f"{t}@fixed" for t in DEFAULT_TASKS]))


@pytest.fixture(scope="module")
def clean_corpus(tmp_path_factory):
    """``nanoseek data corpus --task-docs 600`` prepared: tasks and shipped prose, 44K tokens."""
    return _prepare(tmp_path_factory.mktemp("clean") / "data", _clean_docs())


def _garbage_doc(kind: str) -> str:
    rng = random.Random(0)
    if kind == "random":                      # random characters: thousands of byte-level tokens
        return "".join(chr(rng.randrange(33, 0x2FFF)) for _ in range(4000))
    return " ".join(["zebra"] * 4000)         # one word repeated


@pytest.fixture(scope="module", params=["random", "repeated"])
def garbage_corpus(request, tmp_path_factory):
    """The clean corpus with one long garbage document inside (unfiltered, as if the filters missed it)."""
    docs = _clean_docs()
    docs.insert(300, Document(_garbage_doc(request.param) + "\n", GARBAGE))
    return _prepare(tmp_path_factory.mktemp("garbage") / "data", docs, filters=False)


def cfg_for(tmp_path, name, data=None, model=None, **sections):
    raw = {"model": dict(model or TINY),
           "data": ({"source": "packed", "dir": str(data), "val_batches": 0} if data
                    else {"source": "synthetic", "val_batches": 0}),
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "micro_batch_size": 4, "grad_accum": 2,
                     "seq_len": 32},
           "train": {"max_steps": 200, "save_every": 20, "eval_every": 0, "keep_last": 2, "seed": 1337,
                     "out_dir": str(tmp_path / name)},
           "spike": {"min_history": 5}}                  # the shipped tiny recipe's guard
    if not data:
        raw["model"]["vocab_size"] = 128
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, name)


# ---------------------------------------------------------------------------- a clean run never aborts
def test_clean_small_corpus_guard_on_no_skip_no_rollback(tmp_path, clean_corpus):
    # the run: tiny recipe, 200 steps, save every 20; before, it skipped prose batches,
    # rolled back three times and aborted at step 141
    cfg = cfg_for(tmp_path, "clean", clean_corpus)
    trainer, res = fit(cfg)
    recs = read_metrics(tmp_path / "clean")
    assert res.status == "done" and res.step == 200
    assert events(recs, "spike_skipped") == [] and events(recs, "rollback") == [] and trainer.updates == 200
    losses = [r["loss"] for r in step_records(recs).values()]
    assert max(losses[50:]) > 2 * sorted(losses[50:])[len(losses[50:]) // 2]   # the heavy tail (prose) is there


def test_shipped_tiny_recipe_on_the_clean_corpus_through_the_cli(tmp_path, clean_corpus, capsys):
    # the exact reproduction: `nanoseek pretrain --config tiny` on the prepared corpus, 200 steps
    out = tmp_path / "run"
    rc = cli_main(["pretrain", "--config", "tiny", "--set", "data.source=packed", "--set", f"data.dir={clean_corpus}",
                   "--set", "model.vocab_size=512", "--set", "train.max_steps=200", "--set", "train.save_every=20",
                   "--set", "train.eval_every=0", "--out-dir", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().out
    recs = read_metrics(out)
    assert events(recs, "spike_skipped") == [] and events(recs, "rollback") == []


@pytest.mark.slow
def test_shipped_corpus_speedrun_shape_guard_on_no_skip_no_rollback(tmp_path):
    # the speedrun's pre-training (its corpus settings, model and 2 x 256-token steps), guard on:
    # rare prose batches at 5-9x the median step loss are ordinary, not spikes
    import tomllib
    from nanoseek.train.config import resolve_config_path
    rc = tomllib.loads(resolve_config_path("speedrun").read_text())
    docs = default_corpus_records(4000, seed=0, tasks=tuple(rc["data"]["tasks"]))
    data = _prepare(tmp_path / "data", docs, vocab=int(rc["data"]["vocab_size"]))
    p = rc["pretrain"]
    raw = {"model": dict(rc["model"]), "data": {"source": "packed", "dir": str(data), "val_batches": 0},
           "optim": dict(p["optim"]), "spike": {},            # the guard's defaults, on
           "train": {**p["train"], "max_steps": 1000, "save_every": 100, "eval_every": 0, "log_every": 1,
                     "out_dir": str(tmp_path / "sr")}}
    trainer, res = fit(config_from_dict(raw, "speedrun-shape"))
    recs = read_metrics(tmp_path / "sr")
    assert res.status == "done" and events(recs, "spike_skipped") == [] and events(recs, "rollback") == []
    losses = sorted(r["loss"] for r in step_records(recs).values())
    assert losses[-1] > 4 * losses[len(losses) // 2]                  # the heavy tail is there


# ---------------------------------------------------------------------------- garbage is skipped, the run completes
def _garbage_steps(cfg) -> tuple[int, int]:
    """(first, last) 1-based step whose batch holds the garbage document, from the loader's order."""
    _, task, _ = build_pretraining(cfg)
    loader, shards = task.train_loader, task.train_loader.shards
    (doc,) = [i for i in range(shards.n_docs) if shards.origin(i) == GARBAGE]
    order, ends = loader._order(0)
    k = int((order == doc).nonzero()[0][0])
    start, end = int(ends[k] - shards.doc_lengths[doc]), int(ends[k])
    per_step = cfg.optim.micro_batch_size * cfg.optim.seq_len * cfg.optim.grad_accum
    return start // per_step + 1, end // per_step + 1


@pytest.mark.slow
def test_long_garbage_document_is_skipped_and_the_run_completes(tmp_path, garbage_corpus):
    # the shipped tiny recipe's model; before, this went rollback, rollback, "diverged"
    probe = cfg_for(tmp_path, "garbage", garbage_corpus, model={"preset": "tiny"})
    first, last = _garbage_steps(probe)
    assert 30 <= first and last - first >= 10          # thousands of tokens, after the statistics started
    cfg = cfg_for(tmp_path, "garbage", garbage_corpus, model={"preset": "tiny"}, train={"max_steps": last + 10})
    trainer, res = fit(cfg)
    assert res.status == "done" and res.step == last + 10
    recs = read_metrics(tmp_path / "garbage")
    origins = trainer.task.origins
    skipped = events(recs, "spike_skipped")
    assert all(any(origins(i) == GARBAGE for i in e["doc_ids"]) for e in skipped)   # nothing ordinary skipped
    steps = [e["step"] for e in skipped]
    assert len(steps) >= (last - first) - 2                   # the garbage steps were skipped...
    assert events(recs, "rollback") == [] and events(recs, "diverged") == []       # ...with no rollback
    assert not [e for e in events(recs, "checkpoint") if e["step"] in steps]       # and wrote no checkpoint
    assert trainer.updates == res.step - len(steps)


# ---------------------------------------------------------------------------- skips write no checkpoint
class Poison(Hook):
    """The batches drawn for 1-based steps in ``steps`` are bad data: their task loss x ``factor``
    (whenever it is computed, re-checks included); the weights stay sound."""

    def __init__(self, task, steps, factor=1e4):
        self.steps, self.factor, self.trainer = set(steps), factor, None
        inner_loss, inner_batches = task.loss, task.batches

        def loss(model, batch):
            out, metrics = inner_loss(model, batch)
            return (out * self.factor if getattr(batch, "bad", False) else out), metrics

        def batches():
            it = inner_batches()
            nxt = type(it).__next__

            class Tagged(type(it)):
                def __next__(this):
                    b = nxt(this)
                    b.bad = self.trainer is not None and self.trainer.step + 1 in self.steps
                    return b
            it.__class__ = Tagged
            return it
        task.loss, task.batches = loss, batches


def test_skipped_steps_write_no_checkpoint_and_do_not_push_out_the_good_one(tmp_path):
    # steps 12..21 are bad data; saves are due at 12, 14, ..., 20: none is written until step 22
    cfg = cfg_for(tmp_path, "skips", optim={"grad_accum": 1}, train={"max_steps": 24, "save_every": 2, "keep_last": 1},
                  spike={"min_history": 3})
    seen = []

    class Watch(Hook):
        def on_event(self, trainer, record):
            if record["event"] == "checkpoint":
                seen.append((record["step"], [step_of(p) for p in list_checkpoints(tmp_path / "skips")]))
    model, task, files = build_pretraining(cfg)
    poison = Poison(task, range(12, 22))
    trainer = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, cfg.train.out_dir,
                      hooks=[ExpertBalanceHook(cfg.train.bias_update_gamma), Watch()], config=cfg.to_dict(),
                      final_files=files, progress=False, quiet=True)
    poison.trainer = trainer
    res = trainer.fit()
    recs = read_metrics(tmp_path / "skips")
    assert res.status == "done"
    assert [e["step"] for e in events(recs, "spike_skipped")] == list(range(12, 22))
    assert events(recs, "rollback") == []                      # the weights are sound: skips alone never roll back
    assert [s for s, _ in seen] == [2, 4, 6, 8, 10, 22, 24]     # the save due at 12..20 waited for step 22
    # keep_last 1 never dropped the last known-good checkpoint: the one before the newest stays
    assert seen[-2][1] == [10, 22] and seen[-1][1] == [22, 24]


# ---------------------------------------------------------------------------- a rollback deletes nothing it did not write
class Blowup(Hook):
    """From 1-based step ``start`` on, every applied update scales the output head (weights go bad)."""

    def __init__(self, start):
        self.start = start

    def after_step(self, trainer, applied):
        if applied and trainer.step + 1 >= self.start:
            with torch.no_grad():
                trainer.model.lm_head.weight.mul_(30.0)


def test_resuming_a_finished_run_that_blows_up_keeps_its_checkpoints_and_stays_resumable(tmp_path):
    steps = {"max_steps": 16, "save_every": 4, "keep_last": 2}
    cfg = cfg_for(tmp_path, "fin", optim={"grad_accum": 1}, train=steps, spike={"min_history": 3})
    fit(cfg)
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path / "fin")}
    assert sorted(before) == ["step-000012", "step-000016"]
    # resumed with more steps and a learning rate that blows the weights up at once
    more = cfg_for(tmp_path, "fin", optim={"grad_accum": 1, "lr": 30.0, "min_lr": 30.0},
                   train={**steps, "max_steps": 40}, spike={"min_history": 3})
    with pytest.raises(TrainingDiverged) as err:
        fit(more, resume=True, hooks=[Blowup(17)])
    e = err.value
    msg = str(e)
    assert "\n" not in msg and "step-000016" in msg and "--resume" in msg and "known-good" in msg
    assert isinstance(e, UserError) and e.checkpoint.name == "step-000016"
    after = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path / "fin")}
    assert after == before                                     # nothing the earlier run wrote was touched
    assert latest_checkpoint(tmp_path / "fin").name == "step-000016"
    recs = read_metrics(tmp_path / "fin")
    assert all(r["to_step"] == 16 for r in events(recs, "rollback")) and len(events(recs, "rollback")) == 3
    # ...and it resumes from there with a sane learning rate
    again = cfg_for(tmp_path, "fin", optim={"grad_accum": 1}, train={**steps, "max_steps": 24}, spike={"min_history": 3})
    _, res = fit(again, resume=True)
    assert res.status == "done" and res.step == 24


def test_divergence_is_one_line_with_a_resume_command_that_works(tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--set", "model.hidden_size=32", "--set", "data.val_batches=0", "--set", "train.eval_every=0",
              "--set", "train.save_every=4", "--out-dir", str(out), "--quiet"]
    assert cli_main(["pretrain", "--config", "tiny", "--set", "train.max_steps=8", *common]) == 0
    capsys.readouterr()
    rc = cli_main(["pretrain", "--config", "tiny", "--resume", "--set", "train.max_steps=40", "--set", "optim.lr=3",
                   "--set", "optim.min_lr=3", "--set", "optim.warmup_steps=0", "--set", "optim.grad_clip=0", *common])
    text = capsys.readouterr().out.strip().splitlines()
    assert rc == 3 and len(text) == 1, text
    assert "training diverged" in text[0] and "step-000008" in text[0] and "weights are damaged" in text[0]
    assert {p.name for p in list_checkpoints(out)} >= {"step-000004", "step-000008"}
    assert latest_checkpoint(out).name == "step-000008"
    # the printed command, run as printed, resumes from the good checkpoint and finishes the run
    command = text[0].split("; run: nanoseek ")[1].split()
    assert command == ["pretrain", "--out-dir", str(out), "--resume",
                       "--set", "optim.lr=0.3", "--set", "optim.min_lr=0.3"]
    assert cli_main([*command, "--quiet"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("done: step 40")
    assert events(read_metrics(out), "done")


def test_rollback_in_a_fresh_run_deletes_only_its_abandoned_timeline(tmp_path):
    cfg = cfg_for(tmp_path, "fresh", optim={"grad_accum": 1}, train={"max_steps": 20, "save_every": 4, "keep_last": 5},
                  spike={"min_history": 3, "max_rollbacks": 1})
    with pytest.raises(TrainingDiverged) as err:
        fit(cfg, hooks=[Blowup(14)])
    names = [p.name for p in list_checkpoints(tmp_path / "fresh")]
    good = err.value.checkpoint
    assert latest_checkpoint(tmp_path / "fresh").name == good.name and good.name in names
    assert all(step_of(p) <= step_of(good) for p in list_checkpoints(tmp_path / "fresh"))
    assert "step-000004" in names and "step-000008" in names


def test_checkpoint_helpers_never_remove_protected_or_foreign_checkpoints(tmp_path):
    model, _, _ = build_pretraining(cfg_for(tmp_path, "m"))
    paths = {s: save_checkpoint(tmp_path, s, model, {"step": s}, keep_last=10) for s in (2, 4, 6, 8)}
    assert prune_checkpoints(tmp_path, 1, protect=[paths[4]]) == [paths[2], paths[6]]
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [4, 8]
    mine = [save_checkpoint(tmp_path, 10, model, {"step": 10}, keep_last=10, protect=[paths[4]])]
    assert discard_after(tmp_path, paths[4], removable=mine) == mine           # only what the caller wrote
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [4, 8] and latest_checkpoint(tmp_path) == paths[4]


def test_spike_config_rejects_a_tail_that_would_skip_ordinary_batches(tmp_path):
    with pytest.raises(ConfigError, match=r"\[spike\] tail"):
        cfg_for(tmp_path, "bad", spike={"tail": 0.5})


# ---------------------------------------------------------------------------- hard data never rolls back
def _long_document(kind: str) -> str:
    """Long, ordinary documents unlike the corpus's short tasks (the reviewer's cases)."""
    import inspect
    import re
    if kind.startswith("prose"):              # Python's documentation: English prose, 24K or 12K characters
        text = re.sub(r"[ \t]+", " ", "\n\n".join(topics[k] for k in sorted(topics)))
        return text[:12000 if kind == "prose12k" else 24000]
    return inspect.getsource(__import__("argparse"))[:24000]       # source code


@pytest.mark.parametrize("kind", [pytest.param("prose", marks=pytest.mark.slow), "code",
                                  pytest.param("prose12k", marks=pytest.mark.slow)])
def test_long_ordinary_document_never_rolls_back_and_the_run_completes(tmp_path, kind):
    # before: its ~50 steps at ~3x the median loss lifted the trend quartile past 1.5x its best:
    # rollback at 170, rollback at 170, "diverged" at step 153, and resuming at a lower lr diverged
    # again. The data got harder; the weights did not get worse: no rollback, no skip.
    docs = _clean_docs()
    docs.insert(300, Document(_long_document(kind) + "\n", GARBAGE))   # the origin tag _garbage_steps looks for
    data = _prepare(tmp_path / "data", docs)                          # filters on: it is ordinary text
    first, last = _garbage_steps(cfg_for(tmp_path, "run", data, model={"preset": "tiny"}))
    assert last - first >= 20
    cfg = cfg_for(tmp_path, "run", data, model={"preset": "tiny"}, train={"max_steps": last + 10, "log_every": 1})
    trainer, res = fit(cfg)
    recs = read_metrics(tmp_path / "run")
    assert res.status == "done" and res.step == last + 10 and trainer.updates == res.step
    assert events(recs, "rollback") == [] and events(recs, "diverged") == [] and events(recs, "spike_skipped") == []
    losses = step_records(recs)
    before = sorted(losses[s]["loss"] for s in range(first - 40, first))
    assert max(losses[s]["loss"] for s in range(first, last)) > 2 * before[len(before) // 2]   # the data is hard


def test_slow_drift_of_the_weights_by_a_growing_lr_still_rolls_back(tmp_path, clean_corpus):
    # a learning rate warming up to 1.0 over 200 steps (300x the recipe's) slowly damages the
    # weights: accepted losses creep up. The reference batches confirm it: rolled back, never to
    # a checkpoint of damaged weights (a save measures the reference first)
    cfg = cfg_for(tmp_path, "drift", clean_corpus, optim={"grad_accum": 1, "lr": 1.0, "min_lr": 1.0,
                                                          "warmup_steps": 200},
                  train={"max_steps": 200, "save_every": 10, "log_every": 1})
    try:
        fit(cfg)
    except TrainingDiverged:
        pass
    recs = read_metrics(tmp_path / "drift")
    rollbacks = events(recs, "rollback")
    assert rollbacks and all("the weights are damaged" in r["reason"] for r in rollbacks)
    assert rollbacks[0]["step"] > 50                   # slow: the first many steps were healthy
    last_saved = 0
    for r in recs:                             # a save of damaged weights was refused, not written
        if r.get("event") == "checkpoint":
            last_saved = r["step"]
        if r.get("event") == "rollback" and "at the save of step" in r["reason"]:
            assert last_saved < r["step"] and r["to_step"] < r["step"]
    assert any("at the save of step" in r["reason"] for r in rollbacks)


def test_killed_and_resumed_run_through_a_trend_alarm_decides_the_same(tmp_path, clean_corpus):
    # the reference batches and their best loss are checkpointed: a run killed after the alarm
    # began and resumed makes the same checks, with the same figures, as an uninterrupted one
    docs = _clean_docs()
    docs.insert(300, Document(_long_document("prose12k") + "\n", GARBAGE))
    data = _prepare(tmp_path / "data", docs)
    first, last = _garbage_steps(cfg_for(tmp_path, "a", data))
    steps = {"max_steps": last, "save_every": 10, "log_every": 1}
    fit(cfg_for(tmp_path, "a", data, train=steps))

    class Stop(Hook):                          # SIGTERM-like: save and stop after step first + 5
        def after_step(self, trainer, applied):
            if trainer.step + 1 == first + 5:
                trainer.request_stop("test")
    _, res = fit(cfg_for(tmp_path, "b", data, train=steps), hooks=[Stop()])
    assert res.status == "interrupted" and res.step == first + 5
    fit(cfg_for(tmp_path, "b", data, train=steps), resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert {s: r["loss"] for s, r in step_records(a).items()} == {s: r["loss"] for s, r in step_records(b).items()}
    checked = [(e["step"], e["reason"]) for e in events(a, "spike_checked")]
    assert checked and checked[-1][0] > first + 5                    # the alarm went on after the kill
    assert [(e["step"], e["reason"]) for e in events(b, "spike_checked")] == checked
