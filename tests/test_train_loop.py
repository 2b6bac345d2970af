"""The shared training loop: exact resume, the spike guard (skip and rollback), signals, accumulation.

Every run here is a few steps of a hidden-32 DeepSeek-V3 (MLA, MoE with 8 experts, MTP) on the
synthetic stream, so the suite stays fast. Bad data is injected by position in the stream (a
wrapper marks loader batch k with document id -1 and multiplies its loss, or makes it NaN),
so a rollback that moves the data past it really never sees it again.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from nanoseek.model.checkpoint import from_hf_state_dict, load_hf_tensors
from nanoseek.model.moe import MoE
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints, step_of
from nanoseek.train.config import config_from_dict
from nanoseek.train.loop import ExpertBalanceHook, Hook, Trainer, TrainingDiverged
from nanoseek.train.metrics import events, read_metrics, step_records
from nanoseek.train.pretrain import LMBatch, build_pretraining

from train_helpers import CrashAt, StopAt, fit_pretraining

MODEL = dict(preset="tiny", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=128)
POISON = -1


def make_cfg(tmp_path, name="run", **sections):
    raw = {"model": dict(MODEL), "data": {"source": "synthetic", "val_batches": 1},
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "micro_batch_size": 2, "grad_accum": 2,
                     "seq_len": 16},
           "train": {"max_steps": 8, "eval_every": 4, "save_every": 4, "keep_last": 3,
                     "out_dir": str(tmp_path / name)},
           "spike": {"min_history": 3}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, name)


def run(cfg, resume=False, hooks=(), poison=None):
    return fit_pretraining(cfg, resume, hooks, wrap_task=(lambda task: Poisoned(task, poison)) if poison else None)


def losses(run_dir) -> dict[int, float]:
    return {s: r["loss"] for s, r in step_records(read_metrics(run_dir)).items()}


class Poisoned:
    """Wraps the pretraining task: loader batches in ``bad`` (index -> factor) get doc id -1 and loss x factor."""

    def __init__(self, inner, bad: dict[int, float]):
        self.inner, self.bad = inner, bad

    def batches(self):
        return PoisonedBatches(self.inner.batches(), self.bad)

    def loss(self, model, batch: LMBatch):
        loss, metrics = self.inner.loss(model, batch)
        if any(POISON in ids for ids in batch.doc_ids):
            loss = loss * batch.factor
        return loss, metrics

    def evaluate(self, model):
        return self.inner.evaluate(model)


class PoisonedBatches:
    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __iter__(self):
        return self

    def __next__(self):
        index = self.inner.loader.index
        batch = next(self.inner)
        if index in self.bad:
            batch.doc_ids = [[POISON] + ids for ids in batch.doc_ids]
            batch.factor = self.bad[index]
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


class Probe(Hook):
    """Records, after each step: applied?, lm_head checksum, expert biases, MoE loads, AdamW step."""

    def __init__(self):
        self.rows: list[dict] = []
        self.events: list[tuple[dict, dict]] = []

    def after_step(self, trainer, applied):
        m = trainer.model
        p = m.lm_head.weight
        st = trainer.optimizer.state.get(p, {})
        self.rows.append({"step": trainer.step + 1, "applied": applied, "head": p.detach().clone(),
                          "bias": m.expert_bias().clone(),
                          "load": sum(float(x.mlp.load.sum()) for x in m.model.layers if isinstance(x.mlp, MoE)),
                          "adam_step": float(st["step"]) if "step" in st else 0.0})
        return None

    def on_event(self, trainer, record):
        snap = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        self.events.append((dict(record), snap))


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_and_resumed_run_has_the_same_losses_as_an_uninterrupted_one(tmp_path, optimizer):
    steps, optim = {"max_steps": 6, "eval_every": 3, "save_every": 4}, {"optimizer": optimizer}
    ta, ra = run(make_cfg(tmp_path, "a", train=steps, optim=optim))
    assert ra.status == "done" and ra.step == 6
    ref = losses(tmp_path / "a")
    assert sorted(ref) == list(range(1, 7)) and all(math.isfinite(v) for v in ref.values())

    b = make_cfg(tmp_path, "b", train=steps, optim=optim)
    _, r1 = run(b, hooks=[StopAt(2)])                     # Ctrl-C-like stop: saves at step 2
    assert r1.status == "interrupted" and r1.step == 2 and step_of(latest_checkpoint(tmp_path / "b")) == 2
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(b, resume=True, hooks=[CrashAt(6)])            # killed during step 6; last checkpoint is step 4
    assert step_of(latest_checkpoint(tmp_path / "b")) == 4
    tb, r3 = run(b, resume=True)
    assert r3.status == "done" and r3.step == 6
    assert losses(tmp_path / "b") == ref                   # bitwise: same weights, moments, data, RNG
    evals_a = {e["step"]: e["val_loss"] for e in events(read_metrics(tmp_path / "a"), "eval")}
    evals_b = {e["step"]: e["val_loss"] for e in events(read_metrics(tmp_path / "b"), "eval")}
    assert evals_a == evals_b and set(evals_a) == {3, 6}
    for (k, va), vb in zip(ta.model.state_dict().items(), tb.model.state_dict().values()):
        assert torch.equal(va, vb), k
    sa, sb = ta.optimizer.state_dict(), tb.optimizer.state_dict()      # moments (and Muon's momentum) too
    assert [g["name"] for g in sa["param_groups"]] == (["decay", "no_decay", "muon"] if optimizer == "muon"
                                                       else ["decay", "no_decay"])
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in st.items()), i
    assert [e["event"] for e in events(read_metrics(tmp_path / "b")) if e["event"] in ("resume", "interrupted")] == \
        ["interrupted", "resume", "resume"]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np
    cfg = make_cfg(tmp_path, "rng", train={"max_steps": 1, "save_every": 1})
    trainer, _ = run(cfg)
    state = trainer.state_dict()
    trainer.save()                                         # re-saves step 1 (replacing it atomically)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    trainer.restore(latest_checkpoint(tmp_path / "rng"))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]
    assert state["step"] == 1 and state["batches"]["index"] == 2      # grad_accum 2: two loader batches


# ---------------------------------------------------------------------------- the spike guard
def test_fast_spike_is_skipped_without_an_update_and_training_recovers(tmp_path):
    cfg = make_cfg(tmp_path, "spike", train={"max_steps": 10, "save_every": 0, "eval_every": 0},
                   spike={"min_history": 3, "max_skips": 0, "trend_factor": 0})
    probe = Probe()
    trainer, res = run(cfg, hooks=[probe], poison={12: 1e4})   # loader batch 12 = 1st micro-batch of step 7
    assert res.status == "done" and res.step == 10 and trainer.updates == 9
    recs = read_metrics(tmp_path / "spike")
    (ev,) = events(recs, "spike_skipped")
    assert ev["step"] == 7 and POISON in ev["doc_ids"] and ev["loss"] > 1e3 and "median" in ev["reason"]
    steps = step_records(recs)
    assert steps[7]["skipped"] is True and not any(steps[s].get("skipped") for s in steps if s != 7)
    rows = {r["step"]: r for r in probe.rows}
    assert rows[7]["applied"] is False
    assert torch.equal(rows[7]["head"], rows[6]["head"])               # no optimizer update
    assert torch.equal(rows[7]["bias"], rows[6]["bias"])               # no bias update from the spiked load
    assert rows[7]["load"] == 0                                        # ...and its counts were dropped
    assert rows[7]["adam_step"] == rows[6]["adam_step"] == 6           # AdamW did not count it
    assert not torch.equal(rows[8]["head"], rows[7]["head"]) and rows[8]["adam_step"] == 7
    before = steps[6]["loss"]
    assert all(math.isfinite(steps[s]["loss"]) and steps[s]["loss"] < 1.5 * before for s in (8, 9, 10))


class Damage(Hook):
    """After the update of 1-based step ``step`` (once), scale the output head: the weights go bad."""

    def __init__(self, step, factor=50.0):
        self.step, self.factor, self.done = step, factor, False

    def after_step(self, trainer, applied):
        if trainer.step + 1 == self.step and applied and not self.done:
            self.done = True
            with torch.no_grad():
                trainer.model.lm_head.weight.mul_(self.factor)


def test_bad_weights_roll_back_to_the_last_checkpoint_and_skip_the_data(tmp_path):
    # skips alone never roll back (test_adversarial_spike.py); here the weights themselves go bad
    # after step 7, so steps 8 and 9 spike, and the re-measured reference batches fail too
    cfg = make_cfg(tmp_path, "rb", optim={"grad_accum": 1}, train={"max_steps": 10, "save_every": 3, "eval_every": 0},
                   spike={"min_history": 2, "max_skips": 2, "skip_window": 10, "trend_factor": 0})
    probe = Probe()
    trainer, res = run(cfg, hooks=[Damage(7), probe])
    assert res.status == "done" and res.step == 10
    recs = read_metrics(tmp_path / "rb")
    skipped = events(recs, "spike_skipped")
    assert [e["step"] for e in skipped] == [8]
    (rb,) = events(recs, "rollback")
    assert (rb["step"], rb["to_step"], rb["skipped_batches"]) == (9, 6, 3)
    assert "2 skipped steps" in rb["reason"] and "the weights are damaged (reference loss" in rb["reason"]
    # the weights right after the rollback are exactly those of checkpoint 6
    (_, snap), = [(r, s) for r, s in probe.events if r["event"] == "rollback"]
    ckpt = tmp_path / "rb" / "checkpoints" / "step-000006"
    saved = from_hf_state_dict(load_hf_tensors(ckpt, trainer.model.config), trainer.model.config)
    assert set(saved) == set(snap) and all(torch.equal(saved[k], snap[k]) for k in saved)
    # after it, steps 7..10 ran on loader batches 9..12, all applied
    after = probe.rows[-4:]
    assert [r["step"] for r in after] == [7, 8, 9, 10] and all(r["applied"] for r in after)
    steps = step_records(recs)
    assert all(not steps[s].get("skipped") and math.isfinite(steps[s]["loss"]) for s in (7, 8, 9, 10))
    assert [step_of(p) for p in list_checkpoints(tmp_path / "rb")] == [6, 9, 10]        # keep_last 3
    assert trainer.batches.state_dict()["index"] == 13 and trainer.batches_consumed == 13   # 0..12, 6..8 skipped


def test_upward_trend_rolls_back_only_on_damaged_weights_and_no_checkpoint_means_diverged(tmp_path):
    spike = {"min_history": 2, "sigma": 0.0, "tail": 0.0, "ratio": 0.0, "max_skips": 0, "trend_window": 2,
             "trend_factor": 1.3, "reference_batches": 2}
    # harder data (step 7's loss x3) lifts the 2-step quartile, but the weights are sound: no rollback
    cfg = make_cfg(tmp_path, "hard", optim={"grad_accum": 1}, train={"max_steps": 9, "save_every": 3, "eval_every": 0},
                   spike=spike)
    trainer, res = run(cfg, poison={6: 3.0})
    recs = read_metrics(tmp_path / "hard")
    assert res.status == "done" and res.step == 9 and trainer.rollbacks == 0 and not events(recs, "rollback")
    ok = events(recs, "spike_checked")
    assert ok[0]["step"] == 7 and all("reference batches are fine" in e["reason"] for e in ok)
    # damaged weights after step 7 (an output head scaled x -50: confidently wrong) lift it too, and
    # the reference confirms it: roll back to step 6
    cfg = make_cfg(tmp_path, "trend", optim={"grad_accum": 1}, train={"max_steps": 9, "save_every": 3, "eval_every": 0},
                   spike=spike)
    trainer, res = run(cfg, hooks=[Damage(7, -50.0)])
    assert res.status == "done" and res.step == 9
    (rb,) = events(read_metrics(tmp_path / "trend"), "rollback")
    assert (rb["step"], rb["to_step"], rb["skipped_batches"]) == (8, 6, 2)
    assert "lower quartile of the last 2" in rb["reason"] and "weights are damaged" in rb["reason"]
    assert trainer.rollbacks == 1

    cfg = make_cfg(tmp_path, "nockpt", optim={"grad_accum": 1}, train={"max_steps": 9, "save_every": 0}, spike=spike)
    with pytest.raises(TrainingDiverged, match="no checkpoint to roll back to"):
        run(cfg, hooks=[Damage(7, -50.0)])
    assert events(read_metrics(tmp_path / "nockpt"), "diverged")

    spike_once = dict(spike, max_rollbacks=0)
    cfg = make_cfg(tmp_path, "maxrb", optim={"grad_accum": 1}, train={"max_steps": 9, "save_every": 3},
                   spike=spike_once)
    with pytest.raises(TrainingDiverged, match="max_rollbacks = 0"):
        run(cfg, hooks=[Damage(7, -50.0)])


# ---------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_restores_the_handler(tmp_path, sig):
    class Kill(Hook):
        def after_step(self, trainer, applied):
            if trainer.step + 1 == 2:
                os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    cfg = make_cfg(tmp_path, f"sig{int(sig)}", train={"max_steps": 6, "save_every": 0})
    trainer, res = run(cfg, hooks=[Kill()])
    assert res.status == "interrupted" and res.step == 2
    assert step_of(latest_checkpoint(cfg.train.out_dir)) == 2 and res.final_dir is None
    assert events(read_metrics(cfg.train.out_dir), "interrupted")[0]["reason"] == signal.Signals(sig).name
    assert signal.getsignal(sig) is before


# ---------------------------------------------------------------------------- accumulation and the task API
class FullBatch:
    """One micro-batch of 4 rows, made from two consecutive 2-row loader batches."""

    micro_batch_reduction = "mean"

    def __init__(self, inner):
        self.inner = inner

    def batches(self):
        outer = self

        class It:
            def __init__(self):
                self.src = outer.inner.batches()

            def __next__(self):
                a, b = next(self.src), next(self.src)
                return LMBatch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.labels, b.labels]),
                               a.doc_ids + b.doc_ids)

            def state_dict(self):
                return self.src.state_dict()

            def load_state_dict(self, s):
                self.src.load_state_dict(s)
        return It()

    def loss(self, model, batch):
        return self.inner.loss(model, batch)


class ListOfHalves(FullBatch):
    """A task that yields the whole step as a list and pre-normalises each part ("sum")."""

    micro_batch_reduction = "sum"

    def batches(self):
        outer = self

        class It:
            def __init__(self):
                self.src = outer.inner.batches()

            def __next__(self):
                return [next(self.src), next(self.src)]

            def state_dict(self):
                return self.src.state_dict()

            def load_state_dict(self, s):
                self.src.load_state_dict(s)
        return It()

    def loss(self, model, batch):
        loss, m = self.inner.loss(model, batch)
        return loss / 2, m


def test_accumulation_list_batches_and_sum_reduction_match_one_big_batch(tmp_path):
    """4 rows as one micro-batch, as grad_accum=2 x 2 rows ("mean"), and as a list of two halves
    pre-normalised by the task ("sum"): the same weights after two steps."""
    finals, losses2, norms = [], [], []
    for wrap, accum in [(FullBatch, 1), (None, 2), (ListOfHalves, 1)]:
        name = f"acc-{accum}-{wrap.__name__ if wrap else 'loader'}"
        cfg = make_cfg(tmp_path, name, optim={"grad_accum": accum, "warmup_steps": 0}, data={"val_batches": 0},
                       train={"max_steps": 2, "save_every": 0, "eval_every": 0})
        model, task, _ = build_pretraining(cfg)
        trainer = Trainer(model, wrap(task) if wrap else task, cfg.optim, cfg.train, cfg.spike, cfg.train.out_dir,
                          hooks=[ExpertBalanceHook(cfg.train.bias_update_gamma)], progress=False, quiet=True)
        res = trainer.fit()
        recs = step_records(read_metrics(cfg.train.out_dir))
        assert recs[1]["tokens"] == 4 * 16 and res.tokens == 2 * 4 * 16
        finals.append(trainer.model.state_dict())
        losses2.append(recs[2]["loss"])
        norms.append(recs[1]["grad_norm"])                 # before clipping: catches a wrong 1/n scale
    assert losses2[0] == pytest.approx(losses2[1], rel=1e-5) and losses2[1] == pytest.approx(losses2[2], rel=1e-5)
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[1] == pytest.approx(norms[2], rel=1e-5)
    for other in finals[1:]:
        for k, a in finals[0].items():
            # Adam divides by |g|: float noise in near-zero gradients moves weights by ~1e-6
            assert torch.allclose(a, other[k], atol=3e-5, rtol=1e-5), (k, (a - other[k]).abs().max())
