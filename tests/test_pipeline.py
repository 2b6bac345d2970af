"""Pipeline parallelism (``[parallel] pp``) on gloo: PP x DP and PP x EP must train exactly like 1 process.

The processes start like torchrun's (``test_distributed.spawn``). The reference is one process
with the same global batch, seed, data and init; a PP2 x DP2 run reads 2 of its 4 rows per
data-parallel replica, and the two stages of a pipeline read the same rows. The model has 4
decoder layers (the first dense, 3 MoE) and one MTP module, so every stage of a V-shaped schedule
(4 stages on 2 ranks) gets a layer, MTP's embedding is shared with the first stage, and the
balance loss lives on several stages. Tolerances as in ``test_distributed``: per-step losses and
gradient norms within 1e-5 relative, weights within 1e-5, the aux-loss-free biases exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.train.config import config_from_dict
from nanoseek.train.loop import Hook
from test_distributed import ATOL, RTOL, _truncate_to, assert_same_weights, spawn, steps_of

MODEL = {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
         "moe_intermediate_size": 16, "vocab_size": 128, "num_hidden_layers": 4}


def raw_config(out_dir: Path, micro_batch_size: int, grad_accum: int, steps: int, **parallel) -> dict:
    return {"model": dict(MODEL), "data": {"source": "synthetic", "val_batches": 1},
            "optim": {"micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "seq_len": 16, "lr": 3e-3,
                      "warmup_steps": 1},
            "train": {"max_steps": steps, "save_every": 2, "eval_every": 0, "keep_last": 5, "seed": 7,
                      "device": "cpu", "out_dir": str(out_dir)},
            "spike": {"reference_batches": 4},
            "parallel": {"timeout_minutes": 1.0, **parallel}}


class BiasRecorder(Hook):
    """After every step: the whole model's expert biases as this rank sees them (gathered over the
    pipeline), written to a JSON file."""

    def __init__(self, path: Path):
        self.path, self.biases, self.order = path, [], None

    def after_step(self, trainer, applied):
        from nanoseek.train.pipeline import events_order
        bias = trainer.dist.layer_rows(trainer.model, trainer.model.expert_bias())
        self.biases.append(bias.tolist())
        pipe = trainer.dist.pipe
        if pipe is not None and trainer.step == 1:
            pipe.events = self.events = []            # (the count before this step) record step 3
        elif pipe is not None and trainer.step == 2 and pipe.events is not None:
            self.order, pipe.events = events_order(pipe.events), None
            from nanoseek.train.pipeline import chrome_trace
            gathered = pipe.gather_events(self.events)                       # every pp rank's actions
            assert len(gathered[pipe.pp_rank]) == len(self.order)
            trace = chrome_trace(gathered)
            assert len(trace["traceEvents"]) == sum(len(v) for v in gathered.values())
            assert {e["pid"] for e in trace["traceEvents"]} == {0, 1}
            assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in trace["traceEvents"])
        moes = trainer.model.moe_layers()
        self.path.write_text(json.dumps({"biases": self.biases, "order": self.order,
                                         "local_experts": moes[0].experts.gate_up_proj.shape[0] if moes else None}))
        return None


def _worker(rank: int, out: Path, raw: dict, resume: bool) -> None:
    from nanoseek.train.pretrain import pretrain
    rec = BiasRecorder(out / f"rank{rank}.json")
    pretrain(config_from_dict(raw, "test"), resume=resume, progress=False, quiet=True, hooks=[rec])


def run(out: Path, world: int, mbs: int, grad_accum: int = 4, steps: int = 3, resume: bool = False,
        **parallel) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    raw = raw_config(out / "run", mbs, grad_accum, steps, **parallel)
    if world == 1:
        _worker(0, out, raw, resume)
    else:
        spawn(_worker, out, raw, resume, world=world)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def assert_same_steps(run_dir: Path, ref: Path, steps) -> None:
    a, b = steps_of(run_dir), steps_of(ref)
    for s in steps:
        for key in ("loss", "grad_norm", "ce", "mtp_loss", "aux_loss"):
            assert a[s][key] == pytest.approx(b[s][key], rel=RTOL), (s, key, a[s][key], b[s][key])
        assert a[s]["tokens"] == b[s]["tokens"]
        assert a[s]["maxvio"] == pytest.approx(b[s]["maxvio"], abs=1e-4)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process: 4 rows x 16 tokens x 4 micro-batches, 3 steps."""
    out = tmp_path_factory.mktemp("one")
    return out, run(out, 1, mbs=4)[0]


def check(out: Path, infos: list[dict], one) -> None:
    ref, ref_info = one
    assert_same_steps(out / "run", ref / "run", [1, 2, 3])
    assert all(i["biases"] == ref_info["biases"] for i in infos)         # every rank, every step, exactly
    assert any(b != 0 for layer in ref_info["biases"][-1] for b in layer)
    assert_same_weights(out / "run" / "final", ref / "run" / "final")
    assert_same_weights(out / "run" / "checkpoints" / "step-000002", ref / "run" / "checkpoints" / "step-000002")
    starts = [r for r in json_lines(out / "run" / "metrics.jsonl") if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["pp"] == 2
    assert "val_loss" in [r for r in json_lines(out / "run" / "metrics.jsonl") if r.get("event") == "eval"][-1]
    # the AdamW state is written in a 1-rank optimizer's order and layout
    from nanoseek.train.checkpoint import load_state
    a = load_state(out / "run" / "checkpoints" / "step-000002")["optimizer"]
    b = load_state(ref / "run" / "checkpoints" / "step-000002")["optimizer"]
    assert [(g["name"], g["params"]) for g in a["param_groups"]] == [(g["name"], g["params"]) for g in b["param_groups"]]
    assert a["state"].keys() == b["state"].keys()
    for i in b["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][i][k], b["state"][i][k], rtol=1e-4, atol=1e-7)


def json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------- equality with one process
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_pp2_dp2_matches_one_process(tmp_path, one, schedule):
    infos = run(tmp_path, 4, mbs=2, pp=2, schedule=schedule)
    check(tmp_path, infos, one)
    assert [i["local_experts"] for i in infos] == [8] * 4                # replicated (no EP)
    # the executed order (recorded by pipeline.instrument) is the schedule's: 1F1B by its rule (ranks
    # 0, 1 = stages 0, 1; replicas 2, 3 the same), the V schedule as torch's pipeline_order says
    from nanoseek.train.pipeline import build_schedule_order
    if schedule == "1f1b":
        want = {0: "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3".split(), 1: "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3".split()}
    else:
        want = {r: [a for x in acts for a in (x[1:x.index(")")].split(";") if x.startswith("(") else [x])]
                for r, acts in build_schedule_order(schedule, 2, 4).items()}
    assert [i["order"] for i in infos] == [want[0], want[0], want[1], want[1]]
    # validation ran through the stages (PipelineEvalModel): the final weights in one process, on
    # the same validation rows (micro_batch_size is per rank), give the same loss
    from nanoseek.train.checkpoint import load_model_weights
    from nanoseek.train.pretrain import build_pretraining
    model, task, _ = build_pretraining(config_from_dict(raw_config(tmp_path / "x", 2, 4, 1), "t"))
    load_model_weights(model, tmp_path / "run" / "final")
    model.eval()
    want = task.evaluate(model)["val_loss"]
    got = [r for r in json_lines(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "eval"][-1]
    assert got["val_loss"] == pytest.approx(want, rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev", "gpipe", "interleaved-1f1b", "zbv"])
def test_pp2_ep2_matches_one_process(tmp_path, one, schedule):
    infos = run(tmp_path, 4, mbs=2, pp=2, ep=2, schedule=schedule)
    check(tmp_path, infos, one)
    assert {i["local_experts"] for i in infos} - {None} == {4}             # 8 experts over 2 ranks


@pytest.mark.parametrize("schedule,grad_accum", [("zbv", 1), ("zbv", 3), ("interleaved-1f1b", 3), ("gpipe", 1)])
def test_micro_batch_counts_torch_accepts_train_like_one_process(tmp_path, schedule, grad_accum):
    """Counts the one rule accepts beyond 1F1B's m >= pp (ZBV and GPipe any, interleaved 1F1B any
    multiple of its rounds) train exactly like one process."""
    assert run(tmp_path / "one", 1, mbs=2, grad_accum=grad_accum, steps=2)
    run(tmp_path / "pp", 2, mbs=2, grad_accum=grad_accum, steps=2, pp=2, schedule=schedule)
    assert_same_steps(tmp_path / "pp" / "run", tmp_path / "one" / "run", [1, 2])


@pytest.mark.slow
def test_pp2_ep2_dp2_eight_processes_match_one(tmp_path, one):
    """World 8: pipelines of 2 stages, each stage 4 replicas in 2 EP groups of 2 (rows 1 per rank)."""
    infos = run(tmp_path, 8, mbs=1, pp=2, ep=2, schedule="dualpipev")
    check(tmp_path, infos, one)


# ---------------------------------------------------------------------------- checkpoints between layouts
@pytest.mark.slow
def test_checkpoints_move_between_layouts_and_resume_exactly(tmp_path, one):
    ref, _ = one
    # pp2 x dp2 (1F1B) -> pp2 x ep2 (DualPipeV): resume its step-2 checkpoint under another layout
    run(tmp_path / "a", 4, mbs=2, pp=2, schedule="1f1b")
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    _truncate_to(tmp_path / "b" / "run", 2)
    run(tmp_path / "b", 4, mbs=2, resume=True, pp=2, ep=2, schedule="dualpipev")
    assert_same_steps(tmp_path / "b" / "run", ref / "run", [3])
    assert_same_weights(tmp_path / "b" / "run" / "final", ref / "run" / "final")
    # pp2 -> one process
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "c" / "run")
    _truncate_to(tmp_path / "c" / "run", 2)
    run(tmp_path / "c", 1, mbs=4, resume=True)
    assert_same_steps(tmp_path / "c" / "run", ref / "run", [3])
    assert_same_weights(tmp_path / "c" / "run" / "final", ref / "run" / "final")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_pp2_exactly(tmp_path, one):
    """1 process -> pp2 x dp2: the single process's step-2 checkpoint (weights, AdamW moments in a
    1-rank optimizer's order, data position, biases) continues to the same step 3."""
    ref, _ = one
    shutil.copytree(ref / "run", tmp_path / "run")
    _truncate_to(tmp_path / "run", 2)
    run(tmp_path, 4, mbs=2, resume=True, pp=2, schedule="1f1b")
    assert_same_steps(tmp_path / "run", ref / "run", [3])
    assert_same_weights(tmp_path / "run" / "final", ref / "run" / "final")


# ---------------------------------------------------------------------------- the split itself
@pytest.mark.parametrize("schedule,pp", [("1f1b", 2), ("dualpipev", 2), ("interleaved-1f1b", 2), ("gpipe", 4)])
def test_stages_chained_equal_the_full_model(schedule, pp):
    """One process: the stage modules of every pp rank, run in stage order, give the full model's
    loss (CE + lambda MTP + balance loss) and logits; each layer is in exactly one stage."""
    import copy

    from nanoseek.train.pipeline import PipelineParallel, local_stages, schedule_spec, stage_rank
    from nanoseek.train.pretrain import build_pretraining
    cfg = config_from_dict(raw_config(Path("/nonexistent"), 2, 4, 1), "t")
    cfg.model.fields["num_hidden_layers"] = 8
    model, task, _ = build_pretraining(cfg)
    x = next(task.batches()).input_ids
    y = torch.roll(x, -1, 1)
    y[0, :3] = -100                                  # ignored labels count nowhere
    copies = [copy.deepcopy(model) for _ in range(pp)]
    model.train()
    with torch.no_grad():
        ref = model(x, labels=y)
    ref_loss = ref.loss + task.mtp_lambda * ref.mtp_loss + ref.aux_loss
    spec = schedule_spec(schedule)
    pipes, seen = {}, []
    for r in range(pp):
        pipe = PipelineParallel(schedule, pp, r, None, list(range(pp)), torch.device("cpu"))
        part = pipe.split(copies[r], task)
        part.train()
        seen += [int(k) for k in part.model.layers._modules]
        assert part.state_dict().keys() <= model.state_dict().keys()
        for s in local_stages(r, pp, spec):
            pipes[s] = pipe
    assert sorted(seen) == list(range(8))
    h, notes, early_aux = x, {}, 0.0
    for s in range(len(pipes)):
        pipe = pipes[s]
        assert stage_rank(s, pp, spec) == pipe.pp_rank
        pipe.stats, pipe.scale = {}, 1.0
        h = pipe.stages[s](h, input_ids=x, labels=y)
        if s < len(pipes) - 1:                        # an early stage's balance loss joins through its backward
            early_aux += pipe.stats.get("aux_loss", 0.0)
        for k, v in pipe.stats.items():
            notes[k] = notes.get(k, 0.0) + v
    assert early_aux > 0
    assert float(h.detach()) + early_aux == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert notes["ce"] == pytest.approx(float(ref.loss), rel=1e-6)
    assert notes["mtp_loss"] == pytest.approx(float(ref.mtp_loss), rel=1e-6)
    assert notes["aux_loss"] == pytest.approx(float(ref.aux_loss), rel=1e-5)


@pytest.mark.parametrize("model", [{}, {"tie_word_embeddings": True}, {"num_nextn_predict_layers": 2},
                                   {"tie_word_embeddings": True, "num_nextn_predict_layers": 2}])
def test_split_backward_of_the_last_stage_equals_its_full_backward(model):
    """The V schedules' split backward (input gradients, then weight gradients later; ZBV,
    DualPipeV) through the stage class the pipeline builds gives every parameter of the last
    stage the gradient of a plain backward, when the head, tied embedding and MTP modules use a
    parameter at several places (torch alone crashes or counts a gradient twice there)."""
    from nanoseek.train.pipeline import PipelineParallel, _pipeline_stage_class
    from nanoseek.train.pretrain import build_pretraining
    cfg = config_from_dict(raw_config(Path("/nonexistent"), 2, 4, 1), "t")
    cfg.model.fields.update(model)
    full, task, _ = build_pretraining(cfg)
    pipe = PipelineParallel("dualpipev", 2, 0, None, [0, 1], torch.device("cpu"))
    pipe.split(full, task)
    last = pipe.stages[pipe.S - 1]
    last.train()
    x = next(task.batches()).input_ids
    h0 = torch.randn(*x.shape, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stage = _pipeline_stage_class().__new__(_pipeline_stage_class())      # only the backward methods
    stage.submod = last

    def grads(split: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        last.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_()
        pipe.stats, pipe.scale = {}, 0.25
        loss = last(h, input_ids=x, labels=torch.roll(x, -1, 1)) * 0.25
        if split:
            (dh,), groups = stage.backward_maybe_with_nosync(
                "input", {"stage_output": (loss,), "output_grads": None, "input_values": [h]})
            stage.backward_maybe_with_nosync("weight", {"stage_output": (loss,), "param_groups": groups})
        else:
            loss.backward()
            dh = h.grad
        return dh, {n: p.grad.clone() for n, p in last.named_parameters() if p.grad is not None}

    (want_h, want), (got_h, got) = grads(False), grads(True)
    assert torch.equal(got_h, want_h)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_micro_batch_rule_is_torchs_and_the_estimates():
    """One rule for the pipeline's micro-batches: the trainer's check (``[optim] grad_accum``) and
    the estimate's (``--micro-batches``) accept exactly the counts torch's schedule constructors
    accept, for every schedule torch ships and pp 2..8; an accepted count builds on every rank."""
    import warnings

    from nanoseek.estimate.flops import EstimateError
    from nanoseek.estimate.pipeline import SCHEDULES as EST
    from nanoseek.train.pipeline import SCHEDULES, build_schedule_order, check_microbatches
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    assert SCHEDULES.keys() == {k for k, s in EST.items() if s.torch_class}
    refused = 0
    for name, spec in SCHEDULES.items():
        for pp in range(2, 9):
            for m in range(1, 2 * pp + 4):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        visualizer.get_schedule_ops(spec.torch_class.removeprefix("Schedule"), pp, m)
                    torch_ok = True
                except ValueError:
                    torch_ok = False
                why = check_microbatches(spec, pp, m, "grad_accum")
                assert (why is None) == torch_ok, (name, pp, m, why)
                try:
                    EST[name].validate(pp, m)
                    assert torch_ok, (name, pp, m)
                except EstimateError:
                    assert not torch_ok, (name, pp, m)
                refused += not torch_ok
                if torch_ok and pp in (2, 5) and m <= pp + 1:
                    assert len(build_schedule_order(name, pp, m)) == pp
    assert refused > 20                            # 1F1B, DualPipeV and interleaved 1F1B refuse some


def test_stage_layers_and_placement():
    from nanoseek.train.pipeline import SCHEDULES, local_stages, stage_layers, stage_rank
    assert stage_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    with pytest.raises(ConfigError, match="fewer than the 5 pipeline stages"):
        stage_layers(4, 5)
    v, loop = SCHEDULES["dualpipev"], SCHEDULES["interleaved-1f1b"]
    assert [local_stages(r, 4, v) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [local_stages(r, 4, loop) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stage_rank(s, 3, SCHEDULES["1f1b"]) for s in range(3)] == [0, 1, 2]


def test_executed_order_of_every_schedule():
    """Every registered schedule yields a per-rank order in which each (stage, micro-batch) of the
    rank is run forward once and backward once (full B, or I then W)."""
    from nanoseek.train.pipeline import SCHEDULES, build_schedule_order, local_stages
    for name, spec in SCHEDULES.items():
        if name == "1f1b":          # torch 2.13's descriptive IR of Schedule1F1B numbers the last rank's
            continue                # forwards from 1 (it executes 0..n-1): see test_pp2_dp2's recorded order
        pp, n = 2, 4
        order = build_schedule_order(name, pp, n)
        for r in range(pp):
            acts = [a for x in order[r] for a in (x[1:-len("OVERLAP_F_B")-1].split(";") if x.startswith("(") else [x])
                    if a[-1].isdigit()]
            for s in local_stages(r, pp, spec):
                for mb in range(n):
                    f = acts.count(f"{s}F{mb}")
                    b = acts.count(f"{s}B{mb}") + min(acts.count(f"{s}I{mb}"), acts.count(f"{s}W{mb}"))
                    assert (f, b) == (1, 1), (name, r, s, mb, order[r])


def test_parallel_pp_is_checked(tmp_path):
    def cfg(**kw):
        raw = raw_config(tmp_path, 2, kw.pop("grad_accum", 4), 2, **kw)
        return config_from_dict(raw, "t.toml")
    with pytest.raises(ConfigError, match=r"\[parallel\] schedule = 'zero'"):
        cfg(pp=2, schedule="zero")
    with pytest.raises(ConfigError, match=r"\[optim\] grad_accum = 2: .*'dualpipev' with pp = 2 needs grad_accum >= 4, got 2"):
        cfg(pp=2, schedule="dualpipev", grad_accum=2)
    with pytest.raises(ConfigError, match=r"\[parallel\] pp = 4: with schedule 'dualpipev' makes 8 stages, more than"):
        cfg(pp=4, schedule="dualpipev", grad_accum=8)
    with pytest.raises(ConfigError, match=r"\[parallel\] pp = 2: cannot run with fsdp"):
        cfg(pp=2, fsdp=True)
    assert cfg(pp=2).to_dict()["parallel"]["schedule"] == "1f1b"
    from nanoseek.train.pretrain import pretrain
    with pytest.raises(ConfigError, match="need several processes: launch with torchrun"):
        pretrain(cfg(pp=2), progress=False, quiet=True)


@pytest.mark.slow
def test_torchrun_cli_pipeline(tmp_path):
    """The documented command line: ``torchrun --nproc_per_node 2 -m nanoseek pretrain ... --set
    parallel.pp=2 --set parallel.schedule=dualpipev`` trains, logs and writes the 1-rank checkpoint."""
    import os
    import subprocess
    import sys

    from test_distributed import ROOT, _free_port
    from nanoseek.train.metrics import read_metrics
    sets = [f"model.{k}={v}" for k, v in MODEL.items() if k != "preset"] + [
        "optim.seq_len=16", "optim.micro_batch_size=2", "optim.grad_accum=4", "data.val_batches=1",
        "train.max_steps=2", "train.device=cpu", "parallel.pp=2", "parallel.schedule=dualpipev"]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "nanoseek", "pretrain", "--config", "tiny", "--out-dir", str(tmp_path / "run"),
           "--no-progress", *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r and "event" not in r] == [1, 2]
    start = [r for r in recs if r.get("event") == "start"][0]
    assert (start["pp"], start["dp"], start["schedule"], start["stages"]) == (2, 1, "dualpipev", 4)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_tied_embeddings_split_over_two_ranks(tmp_path, monkeypatch):
    """Tied embeddings under 1F1B: the head (last rank) and the embedding (first rank) are one
    matrix held twice; their gradients are summed, so 2 ranks train like 1 process."""
    monkeypatch.setitem(MODEL, "tie_word_embeddings", True)
    run(tmp_path / "one", 1, mbs=2, steps=2)
    run(tmp_path / "two", 2, mbs=2, steps=2, pp=2, schedule="1f1b")
    assert_same_steps(tmp_path / "two" / "run", tmp_path / "one" / "run", [1, 2])
    assert_same_weights(tmp_path / "two" / "run" / "final", tmp_path / "one" / "run" / "final")
