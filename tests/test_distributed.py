"""Scale-out on torch.distributed: 2 (or 4) CPU processes (gloo) must train exactly like 1.

Each test starts its worker processes with ``torch.multiprocessing`` and torchrun's environment
variables (MASTER_ADDR/PORT on 127.0.0.1, RANK, WORLD_SIZE, LOCAL_RANK), so the code under test
joins the process group the way it does under ``torchrun`` (one slow test runs torchrun itself).
The reference is one process with the same global batch (``micro_batch_size`` 4 on 1 rank = 2
per rank on 2 = 1 per rank on 4), the same seed, data and init.

Tolerance: per-step losses and gradient norms agree within ``RTOL = 1e-5`` relative in fp32
(measured: about 1e-7; the ranks sum in a different order than one process), final weights
within ``ATOL = 1e-5``; the aux-loss-free biases are compared exactly: every rank must hold the
same biases, equal to the single process's (the bias moves by +-gamma from integer loads).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nanoseek.errors import ConfigError
from nanoseek.train.config import config_from_dict
from nanoseek.train.loop import Hook
from nanoseek.train.metrics import read_metrics, step_records

RTOL = 1e-5          # per-step loss / grad-norm agreement, relative, fp32
ATOL = 1e-5          # final weights, absolute
ROOT = Path(__file__).resolve().parent.parent
START = os.environ.get("NANOSEEK_TEST_START", "")      # "fork" or "spawn"; default: see spawn()

MODEL = {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
         "moe_intermediate_size": 16, "vocab_size": 128}


def raw_config(out_dir: Path, micro_batch_size: int, steps: int = 4, optim: dict | None = None, **parallel) -> dict:
    return {"model": dict(MODEL), "data": {"source": "synthetic", "val_batches": 1},
            "optim": {"micro_batch_size": micro_batch_size, "grad_accum": 2, "seq_len": 16, "lr": 3e-3,
                      "warmup_steps": 1, **(optim or {})},
            "train": {"max_steps": steps, "save_every": 2, "eval_every": 0, "keep_last": 5, "seed": 7,
                      "device": "cpu", "out_dir": str(out_dir)},
            "parallel": {"timeout_minutes": 1.0, **parallel}}


# ---------------------------------------------------------------------------- process plumbing
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
        if dist.is_initialized():
            dist.barrier()        # no rank tears gloo down while another still talks to it (an abort under load)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` processes joined like torchrun's; raises their errors.

    Forked when this process runs no other thread (no import of torch again: ~1 s instead of
    ~10 s per test on a busy 2-core machine), else spawned (forking with live threads can
    deadlock); NANOSEEK_TEST_START=spawn|fork forces one.
    """
    start = START or ("fork" if threading.active_count() == 1 else "spawn")
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method=start)


class Recorder(Hook):
    """After every step: this rank's expert biases and expert-shard size (written to a JSON file)."""

    def __init__(self, path: Path):
        self.path, self.biases, self.local_experts = path, [], None

    def after_step(self, trainer, applied):
        self.biases.append(trainer.model.expert_bias().tolist())
        self.local_experts = trainer.model.moe_layers()[0].experts.gate_up_proj.shape[0]
        self.path.write_text(json.dumps({"biases": self.biases, "local_experts": self.local_experts}))
        return None


def _pretrain_worker(rank: int, out: Path, raw: dict, resume: bool) -> None:
    from nanoseek.model.expert_parallel import COMM
    from nanoseek.train.pretrain import pretrain

    COMM.reset()
    rec = Recorder(out / f"rank{rank}.json")
    pretrain(config_from_dict(raw, "test"), resume=resume, progress=False, quiet=True, hooks=[rec])
    info = json.loads(rec.path.read_text())
    info["a2a_bytes"] = COMM.bytes_sent
    rec.path.write_text(json.dumps(info))


def run_pretrain(out: Path, world: int, micro_batch_size: int, resume: bool = False, steps: int = 4,
                 optim: dict | None = None, **parallel) -> list[dict]:
    """A pretrain run in ``world`` processes (in this process when 1); returns each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    raw = raw_config(out / "run", micro_batch_size, steps, optim, **parallel)
    if world == 1:
        _pretrain_worker(0, out, raw, resume)
    else:
        spawn(_pretrain_worker, out, raw, resume, world=world)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def steps_of(run: Path) -> dict[int, dict]:
    return step_records(read_metrics(run / "metrics.jsonl"))


def assert_same_steps(run: Path, ref: Path, steps) -> None:
    a, b = steps_of(run), steps_of(ref)
    for s in steps:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=RTOL), (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=RTOL), s
        assert a[s]["tokens"] == b[s]["tokens"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()               # the same HF layout, per-expert names included
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The reference: one process, global batch 4 rows x 16 tokens x 2 micro-batches, 4 steps."""
    out = tmp_path_factory.mktemp("one")
    [info] = run_pretrain(out, 1, micro_batch_size=4)
    return out, info


def check_against_reference(out: Path, infos: list[dict], one_rank) -> None:
    ref, ref_info = one_rank
    assert_same_steps(out / "run", ref / "run", [1, 2, 3, 4])
    # the aux-loss-free biases: identical on both ranks and equal to one process's, every step
    assert infos[0]["biases"] == infos[1]["biases"] == ref_info["biases"]
    assert any(b != 0 for layer in ref_info["biases"][-1] for b in layer)          # they did move
    assert_same_weights(out / "run" / "final", ref / "run" / "final")
    # rank 0 alone wrote the log: one start event, one record per step
    recs = read_metrics(out / "run" / "metrics.jsonl")
    starts = [r for r in recs if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert sorted(steps_of(out / "run")) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- equality with one process
def test_data_parallel_two_ranks_match_one(tmp_path, one_rank):
    infos = run_pretrain(tmp_path, 2, micro_batch_size=2)
    check_against_reference(tmp_path, infos, one_rank)
    assert infos[0]["local_experts"] == infos[1]["local_experts"] == 8         # replicated
    assert infos[0]["a2a_bytes"] == 0


@pytest.fixture(scope="module")
def two_rank_ep(tmp_path_factory):
    """2 processes, expert parallel over both (4 experts each), 2 rows per rank: 4 steps."""
    out = tmp_path_factory.mktemp("two_ep")
    return out, run_pretrain(out, 2, micro_batch_size=2, ep=2)


def test_expert_parallel_two_ranks_match_one(two_rank_ep, one_rank):
    out, infos = two_rank_ep
    check_against_reference(out, infos, one_rank)
    assert infos[0]["local_experts"] == infos[1]["local_experts"] == 4         # 8 experts over 2 ranks
    assert infos[0]["a2a_bytes"] > 0 and infos[1]["a2a_bytes"] > 0            # tokens crossed ranks


@pytest.mark.parametrize("parallel", [{"fsdp": True}, {"fsdp": True, "ep": 2}], ids=["fsdp", "fsdp+ep"])
def test_fsdp_two_ranks_match_one(tmp_path, one_rank, parallel):
    infos = run_pretrain(tmp_path, 2, micro_batch_size=2, **parallel)
    check_against_reference(tmp_path, infos, one_rank)


@pytest.mark.parametrize("parallel", [{"ep": 2}, pytest.param({"ep": 2, "fsdp": True}, marks=pytest.mark.slow)],
                         ids=["ep2", "ep2+fsdp"])
def test_four_ranks_two_expert_replicas_match_one(tmp_path, one_rank, parallel):
    """World 4, ep 2: two EP groups {0,1} {2,3}; each expert block has 2 replicas whose gradients
    are all-reduced over the expert-data-parallel groups {0,2} {1,3}."""
    infos = run_pretrain(tmp_path, 4, micro_batch_size=1, **parallel)
    ref, ref_info = one_rank
    assert_same_steps(tmp_path / "run", ref / "run", [1, 2, 3, 4])
    assert all(i["biases"] == ref_info["biases"] for i in infos)
    assert [i["local_experts"] for i in infos] == [4, 4, 4, 4]
    assert_same_weights(tmp_path / "run" / "final", ref / "run" / "final")


def test_muon_under_expert_parallel_matches_one_process(tmp_path, one_rank):
    """optim.optimizer = "muon" on 2 ranks with ep = 2: each rank orthogonalises its own experts'
    matrices, the rest is data parallel; the checkpoint holds the full momentum, 1-rank layout.
    Tolerance: Newton-Schulz runs in bf16, where a gradient summed in another order can round to a
    neighbouring bf16 value; after 4 steps the weights differ by up to 3e-4 (measured), against
    1e-2 between this run and the AdamW one (``one_rank``): the test asks for 10x closer."""
    muon = {"optimizer": "muon"}
    run_pretrain(tmp_path / "one", 1, micro_batch_size=4, optim=muon)
    infos = run_pretrain(tmp_path / "two", 2, micro_batch_size=2, optim=muon, ep=2)
    assert infos[0]["local_experts"] == 4 and infos[0]["biases"] == infos[1]["biases"]
    a, b = steps_of(tmp_path / "two" / "run"), steps_of(tmp_path / "one" / "run")
    for s in (1, 2, 3, 4):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-4), s
    wa = load_file(str(tmp_path / "two" / "run" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "run" / "final" / "model.safetensors"))
    adamw = load_file(str(one_rank[0] / "run" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() == adamw.keys()
    near = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    far = max(float((adamw[k] - wb[k]).abs().max()) for k in wa)
    assert near < 1e-3 and near < far / 10, (near, far)
    from nanoseek.train.checkpoint import load_state
    sa = load_state(tmp_path / "two" / "run" / "checkpoints" / "step-000004")["optimizer"]
    sb = load_state(tmp_path / "one" / "run" / "checkpoints" / "step-000004")["optimizer"]
    assert [g["name"] for g in sa["param_groups"]] == ["decay", "no_decay", "muon"]
    assert {i: {k: tuple(v.shape) for k, v in st.items()} for i, st in sa["state"].items()} == \
        {i: {k: tuple(v.shape) for k, v in st.items()} for i, st in sb["state"].items()}


# ---------------------------------------------------------------------------- checkpoints between world sizes
def _truncate_to(run: Path, step: int) -> None:
    """Make a copy of a run look as if it had stopped right after checkpoint ``step``."""
    for p in (run / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(run / "final", ignore_errors=True)
    (run / "latest").write_text(f"checkpoints/step-{step:06d}\n")
    kept = [r for r in read_metrics(run / "metrics.jsonl") if r.get("step", 0) <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.mark.slow
def test_checkpoint_moves_between_two_ranks_and_one(tmp_path, one_rank, two_rank_ep):
    ref, _ = one_rank
    # 2 ranks (EP) -> 1: the 2-rank run's step-2 checkpoint, resumed in one process
    two, _ = two_rank_ep
    ckpt = two / "run" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json",
                                                      "trainer_state.safetensors"]
    assert_same_weights(ckpt, ref / "run" / "checkpoints" / "step-000002")    # the 1-rank layout, full experts
    shutil.copytree(two / "run", tmp_path / "to_one" / "run")
    _truncate_to(tmp_path / "to_one" / "run", 2)
    run_pretrain(tmp_path / "to_one", 1, micro_batch_size=4, resume=True)
    assert_same_steps(tmp_path / "to_one" / "run", ref / "run", [3, 4])
    assert_same_weights(tmp_path / "to_one" / "run" / "final", ref / "run" / "final")
    # 1 -> 2 ranks (EP): resume the single process's step-2 checkpoint on 2 ranks
    shutil.copytree(ref / "run", tmp_path / "to_two" / "run")
    _truncate_to(tmp_path / "to_two" / "run", 2)
    infos = run_pretrain(tmp_path / "to_two", 2, micro_batch_size=2, resume=True, ep=2)
    assert infos[0]["biases"] == infos[1]["biases"]
    assert_same_steps(tmp_path / "to_two" / "run", ref / "run", [3, 4])
    assert_same_weights(tmp_path / "to_two" / "run" / "final", ref / "run" / "final")


# ---------------------------------------------------------------------------- the all-to-all MoE itself
def _moe_worker(rank: int, out: Path) -> None:
    from nanoseek.model import ModelConfig
    from nanoseek.model.expert_parallel import COMM, ExpertParallelExperts
    from nanoseek.model.moe import Experts

    dist.init_process_group("gloo")
    cfg = ModelConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2,
                      vocab_size=32, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                      qk_rope_head_dim=4, v_head_dim=4, num_hidden_layers=1, n_group=1, topk_group=1)
    torch.manual_seed(0)
    full = Experts(cfg)
    torch.nn.init.normal_(full.gate_up_proj, std=0.3)
    torch.nn.init.normal_(full.down_proj, std=0.3)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 16, generator=g) for n in (7, 5)]                  # rank 0: 7 tokens, rank 1: 5
    # skewed routing: rank 1's tokens all go to experts 0..2 (rank 0's): it sends none to itself
    idx = [torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(7)]),
           torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(5)])]
    ws = [torch.rand(n, 2, generator=g) for n in (7, 5)]
    # reference: the single-device module on both ranks' tokens, loss = sum of both ranks' losses
    ref_x = [x.clone().requires_grad_(True) for x in xs]
    ref_loss = sum((full(x, w, i)[0] ** 2).sum() for x, w, i in zip(ref_x, ws, idx))
    ref_loss.backward()
    # expert parallel: 3 experts per rank, this rank's tokens only
    ep = ExpertParallelExperts(full, dist.group.WORLD)
    x = xs[rank].clone().requires_grad_(True)
    COMM.reset()
    y, counts = ep(x, ws[rank], idx[rank])
    (y ** 2).sum().backward()
    ref_y, ref_counts = full(xs[rank], ws[rank], idx[rank])
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist()
    torch.testing.assert_close(x.grad, ref_x[rank].grad, rtol=1e-5, atol=1e-6)
    sl = slice(3 * rank, 3 * rank + 3)
    torch.testing.assert_close(ep.gate_up_proj.grad, full.gate_up_proj.grad[sl], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.down_proj.grad, full.down_proj.grad[sl], rtol=1e-5, atol=1e-6)
    # rows leaving this rank: its pairs for the other rank's experts (dispatch, then their gradient
    # in the combine's backward) and the other rank's pairs for its experts (combine, dispatch's backward)
    other = 1 - rank
    remote = int((idx[rank] // 3 == other).sum()) + int((idx[other] // 3 == rank).sum())
    (out / f"moe{rank}.json").write_text(json.dumps({"bytes": COMM.bytes_sent, "calls": COMM.calls,
                                                     "expected": remote * 2 * 16 * 4}))


def test_all_to_all_moe_matches_single_device_forward_and_backward(tmp_path):
    spawn(_moe_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"moe{r}.json").read_text()) for r in range(2))
    assert r0["calls"] == r1["calls"] == 4                # dispatch, combine, and their two backwards
    assert r0["bytes"] == r0["expected"] > 0 and r1["bytes"] == r1["expected"] > 0


# ---------------------------------------------------------------------------- tasks that are not rank-aware
class ToyTask:
    """A mean-reduced task whose data is not rank-aware (like SFT and DPO): micro-batch i is
    2 rows of random tokens seeded by i; the loss is next-token CE."""

    def __init__(self, log: Path | None = None):
        self.log, self.seen = log, []

    def batches(self):
        class It:
            i = 0

            def __next__(self):
                self.i += 1
                g = torch.Generator().manual_seed(self.i)
                return {"i": self.i, "ids": torch.randint(0, 128, (2, 9), generator=g)}

            def state_dict(self):
                return {"i": self.i}

            def load_state_dict(self, s):
                self.i = s["i"]
        return It()

    def loss(self, model, batch):
        self.seen.append(batch["i"])
        if self.log:
            self.log.write_text(json.dumps(self.seen))
        ids = batch["ids"]
        return model(ids[:, :-1], labels=ids[:, 1:]).loss, {"tokens": ids[:, 1:].numel()}


def _toy_fit(out: Path, grad_accum: int, log: Path | None = None) -> list[dict]:
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.config import OptimSection, SpikeSection, TrainSection
    from nanoseek.train.loop import Trainer

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config_from_dict(raw_config(out, 2), "t").model.build_config())
    model.use_mtp = False
    tr = Trainer(model, ToyTask(log), OptimSection(lr=1e-2, warmup_steps=0, grad_accum=grad_accum),
                 TrainSection(max_steps=3, save_every=0, eval_every=0, device="cpu", out_dir=str(out)),
                 SpikeSection(enabled=False), quiet=True, progress=False)
    tr.fit()
    return [steps_of(out)[s] for s in (1, 2, 3)]


def _toy_worker(rank: int, out: Path) -> None:
    _toy_fit(out / "run", grad_accum=1, log=out / f"seen{rank}.json")


def test_task_without_rank_aware_data_gets_every_world_th_micro_batch(tmp_path):
    ref = _toy_fit(tmp_path / "one", grad_accum=2)             # one process: 2 micro-batches per step
    spawn(_toy_worker, tmp_path)                                # 2 ranks, 1 micro-batch each
    assert json.loads((tmp_path / "seen0.json").read_text()) == [1, 3, 5]
    assert json.loads((tmp_path / "seen1.json").read_text()) == [2, 4, 6]
    two = [steps_of(tmp_path / "run")[s] for s in (1, 2, 3)]
    for a, b in zip(two, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL) and a["tokens"] == b["tokens"] == 32


# ---------------------------------------------------------------------------- GRPO: rollouts per rank
class HashEngine:
    """Completions that depend only on the prompt's tokens and the sample index (any rank, any batch)."""

    def __init__(self, tokenizer):
        self.tk = tokenizer

    def generate(self, prompts, params):
        from types import SimpleNamespace
        seven, one, eos = self.tk.encode("7")[0], self.tk.encode("1")[0], self.tk.eos_id
        out = []
        for p in prompts:
            group = []
            for j in range(params.n):
                h = (sum(p) * 31 + j * 7) % 5
                ids = [seven, eos] if h < 2 else [one] * (h + 1) + [eos]
                group.append(SimpleNamespace(token_ids=ids, text=self.tk.decode(ids[:-1]), finish_reason="stop",
                                             stop_reason="eos"))
            out.append(group)
        return out


def _grpo_fit(out: Path, loss_agg: str, gamma: float = 0.0) -> None:
    """Two GRPO steps with a hashed engine. gamma 0: the MoE load includes the padding of each
    micro-batch, which depends on how rows are grouped, so the biases would legitimately differ."""
    sys.path.insert(0, str(ROOT / "tests"))
    from post_helpers import tiny_model, tiny_tokenizer

    from nanoseek.post.datasets import load_rl_prompts
    from nanoseek.post.grpo import GRPOSection, GRPOTask
    from nanoseek.tasks.rewards import RewardResult
    from nanoseek.train.config import OptimSection, SpikeSection, TrainSection
    from nanoseek.train.loop import ExpertBalanceHook, Trainer

    def reward(texts, items):
        return [RewardResult(reward=float(t[:1] == "7"), format_ok=True, correct=t[:1] == "7", answer=t[:1])
                for t in texts]

    tk = tiny_tokenizer()
    model = tiny_model(tk.vocab_size)
    model.use_mtp = False
    cfg = GRPOSection(template="chat", prompts_per_step=4, group_size=4, max_new_tokens=4, micro_batch_size=3,
                     loss_agg=loss_agg, log_samples=0)
    task = GRPOTask(model, tk, load_rl_prompts("arithmetic", 8, seed=0), cfg, reward_fn=reward, engine=HashEngine(tk))
    task._sampling_params = lambda seed: __import__("types").SimpleNamespace(n=cfg.group_size, seed=seed, stop=[])
    tr = Trainer(model, task, OptimSection(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                 TrainSection(max_steps=2, save_every=0, eval_every=0, device="cpu", out_dir=str(out)),
                 SpikeSection(enabled=False), hooks=[ExpertBalanceHook(gamma)], quiet=True, progress=False)
    tr.fit()


def _grpo_worker(rank: int, out: Path, loss_agg: str) -> None:
    _grpo_fit(out, loss_agg)


@pytest.mark.parametrize("loss_agg", ["grpo", "dapo", "dr_grpo"])
def test_grpo_rollouts_sharded_over_ranks_match_one_process(tmp_path, loss_agg):
    _grpo_fit(tmp_path / "one", loss_agg)                      # 4 prompts x 4 samples in one process
    spawn(_grpo_worker, tmp_path / "two", loss_agg)            # 2 prompts x 4 samples per rank
    a, b = steps_of(tmp_path / "two"), steps_of(tmp_path / "one")
    for s in (1, 2):
        assert a[s]["tokens"] == b[s]["tokens"]                # together the ranks trained on every sample
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=RTOL)
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=RTOL, abs=1e-7)
        assert a[s]["reward_mean"] == pytest.approx(b[s]["reward_mean"])
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")


def _refuse_worker(rank: int, out: Path) -> None:
    from nanoseek.train.config import ParallelSection
    from nanoseek.train.distributed import ParallelRuntime

    class Rollouts:                          # what GRPOTask declares
        independent_forwards = True

    dist.init_process_group("gloo")
    model = torch.nn.Linear(2, 2)
    for par in (ParallelSection(ep=2), ParallelSection(fsdp=True)):
        with pytest.raises(ConfigError, match="different number of forward passes on each rank"):
            ParallelRuntime(par, "cpu").parallelize(model, Rollouts())
    ParallelRuntime(ParallelSection(), "cpu").parallelize(model, Rollouts())     # plain DP is fine
    (out / f"ok{rank}").write_text("ok")


def test_rollout_tasks_refuse_collective_forwards(tmp_path):
    spawn(_refuse_worker, tmp_path)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ---------------------------------------------------------------------------- configuration and the CLI
def test_parallel_section_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"\[parallel\] ep = 3: must divide the model's n_routed_experts = 8"):
        config_from_dict(raw_config(tmp_path, 2, ep=3), "t.toml")
    with pytest.raises(ConfigError, match=r"\[parallel\] backend"):
        config_from_dict(raw_config(tmp_path, 2, backend="mpi"), "t.toml")
    cfg = config_from_dict(raw_config(tmp_path, 2, ep=2, fsdp=True), "t.toml")
    assert cfg.to_dict()["parallel"] == {"pp": 1, "schedule": "1f1b", "ep": 2, "fsdp": True, "backend": "auto",
                                         "timeout_minutes": 1.0}
    from nanoseek.train.pretrain import pretrain
    with pytest.raises(ConfigError, match="need several processes: launch with torchrun"):
        pretrain(cfg, progress=False, quiet=True)              # ep = 2 in one process


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """The documented command: ``torchrun --nproc_per_node 2 -m nanoseek pretrain ...``."""
    sets = [f"model.{k}={v}" for k, v in MODEL.items() if k != "preset"] + [
        "optim.seq_len=16", "optim.micro_batch_size=2", "optim.grad_accum=1", "data.val_batches=1",
        "train.max_steps=2", "train.device=cpu", "parallel.ep=2"]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "nanoseek", "pretrain", "--config", "tiny", "--out-dir", str(tmp_path / "run"),
           "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") >= 1
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r and "event" not in r] == [1, 2]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
