"""``[train] compile = true``: the compiled training step (nanoseek/train/compiled.py).

Fast: the training forward is one graph (nothing read back to the host); compiled on a CPU, its
causal attention is explicit math over a constant mask table (SDPA past the table and in eager runs)
and equals SDPA's outputs and gradients; the grouped expert GEMM as one custom operator (what the compiled graph calls) gives the
eager grouped GEMM's outputs and gradients bitwise, on both of its paths; a compiler failure
puts the step's gradients and MoE load counts back and trains eagerly with one warning, exactly as
an eager run; the key is type-checked and refused under torchrun with one line. Slow (compiling
takes a minute or more on 2 cores): the compiled step's losses and gradients equal the eager
step's within rounding, and a compiled run killed and resumed has the uninterrupted run's losses.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import torch.nn.functional as F

import nanoseek.model.attention as attention
from nanoseek.errors import ConfigError
from nanoseek.model.attention import causal_attention
from nanoseek.model.moe import grouped_linear, grouped_linear_op
from nanoseek.train.metrics import events, read_metrics, step_records

from test_train_loop import losses, make_cfg, run
from train_helpers import CrashAt, StopAt


def test_training_forward_is_one_graph(tiny_model):
    """The forward with labels (main and MTP losses) reads nothing back from its tensors: RoPE's
    table size is the sequence length when the positions are the default 0..T-1, so dynamo traces
    the compiled training forward as one graph."""
    import torch._dynamo

    model = tiny_model(seed=0).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    explained = torch._dynamo.explain(model.forward)(ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def _graph_ops(fn, *args) -> set[str]:
    """The operators dynamo records for ``fn(*args)`` (a recording backend: nothing is compiled)."""
    import torch._dynamo

    seen: set[str] = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return seen


def _sdpa_in(ops: set[str]) -> bool:
    return any("scaled_dot_product_attention" in o for o in ops)


@pytest.mark.parametrize("attention_type", ["mla", "mha"])
def test_compiled_training_attention_on_a_cpu_is_explicit_math(tiny_model, attention_type, monkeypatch):
    """Compiled on a CPU, the no-cache (training) attention is matmuls and softmax over a constant
    mask table, not SDPA (whose in-graph decomposition runs slower); past MATH_CAUSAL_MAX_LEN, and
    in eager runs, it stays SDPA."""
    model = tiny_model(seed=0).train()
    if attention_type == "mha":
        model = tiny_model(seed=0, attention_type="mha",
                           num_key_value_heads=model.config.num_attention_heads).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ops = _graph_ops(lambda x: model(x, labels=x).loss, ids)
    assert not _sdpa_in(ops) and any("softmax" in o for o in ops)
    monkeypatch.setattr(attention, "MATH_CAUSAL_MAX_LEN", 8)          # 16 positions: beyond the table
    assert _sdpa_in(_graph_ops(lambda x: model(x, labels=x).loss, ids))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_causal_attention_equals_sdpa(dtype):
    """The compiled math path (inductor) gives SDPA's causal outputs and gradients, at lengths 1, 5
    and 300 (two query blocks, a table slice not a multiple of anything), with fp32 or bf16 inputs."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(causal_attention, dynamic=True)
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for T in (1, 5, 300):
        torch.manual_seed(T)
        q, k = (torch.randn(2, 3, T, 12, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(2, 3, T, 8, dtype=dtype, requires_grad=True)
        g = torch.randn(2, 3, T, 8, dtype=dtype)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        out = compiled(q, k, v, 0.3)
        grads = torch.autograd.grad(out, (q, k, v), g)
        assert out.dtype == ref.dtype
        assert torch.allclose(out.float(), ref.float(), **tol), T
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a.float(), b.float(), **tol), T
    torch._dynamo.reset()


def test_compiled_causal_attention_blocks_equal_sdpa():
    """The query blocks of the compiled math path (one or two; traced by dynamo, run by aot_eager:
    the graph's own arithmetic without inductor) give SDPA's outputs and gradients, at odd lengths
    on both sides of CAUSAL_BLOCK_MIN and at the table's end."""
    import torch._dynamo

    from nanoseek.model import attention

    torch._dynamo.reset()
    compiled = torch.compile(causal_attention, backend="aot_eager", dynamic=False)
    for T in (255, 256, 257, 531, attention.MATH_CAUSAL_MAX_LEN):
        torch.manual_seed(T)
        q, k = (torch.randn(1, 2, T, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
        v = torch.randn(1, 2, T, 4, dtype=torch.float64, requires_grad=True)
        g = torch.randn(1, 2, T, 4, dtype=torch.float64)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        out = compiled(q, k, v, 0.3)
        assert torch.allclose(out, ref.to(out.dtype), atol=1e-6), T
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert torch.allclose(a, b.to(a.dtype), atol=1e-6), T
    torch._dynamo.reset()


def test_compiled_causal_attention_of_a_dynamic_length_compiles_at_most_twice():
    """The block choice is one guard on a dynamic length (two blocks from CAUSAL_BLOCK_MIN on), so
    varying lengths (GRPO's updates) compile at most two graphs (a count of T // 128 blocks had one
    graph per 128 positions)."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    compiled = torch.compile(causal_attention, backend=backend, dynamic=True)
    for T in (100, 200, 300, 600, 900, 1000):
        q = torch.randn(1, 2, T, 6)
        assert torch.allclose(compiled(q, q, q[..., :4], 0.3),
                              F.scaled_dot_product_attention(q, q, q[..., :4], is_causal=True, scale=0.3), atol=1e-5)
    assert len(graphs) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("width", [16, 10])          # 16: torch._grouped_mm; 10 (unaligned rows): the loop
def test_grouped_linear_op_equals_the_eager_grouped_gemm(width):
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 4])                # an expert without rows too
    x0, w0 = torch.randn(20, width), torch.randn(4, 8, width)
    dy = torch.randn(20, 8)
    outs, grads = [], []
    for fn in (grouped_linear, grouped_linear_op):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = fn(x, w, counts)
        y.backward(dy)
        outs.append(y.detach())
        grads.append((x.grad, w.grad))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.count_nonzero(grads[1][1][1]) == 0     # no rows, no gradient


class FailsOnSecondCall(torch.nn.Module):
    """A stand-in for torch.compile(model): runs the model (its forward counts MoE load, its backward
    accumulates gradients) once, then raises as a compiler would on the step's second micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("InductorError: no C++ compiler here")
        return self.inner(*args, **kwargs)


def test_compile_failure_trains_eagerly_with_the_eager_runs_numbers(tmp_path, monkeypatch):
    steps = {"max_steps": 3, "eval_every": 0, "save_every": 0}
    run(make_cfg(tmp_path, "eager", train=steps))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: FailsOnSecondCall(model))
    with pytest.warns(RuntimeWarning, match=r"\[train\] compile = true: the compiled training step failed") as seen:
        trainer, res = run(make_cfg(tmp_path, "fallback", train={**steps, "compile": True}))
    assert res.status == "done" and len([w for w in seen if "compile" in str(w.message)]) == 1
    assert not trainer.compiler.active
    # the first micro-batch's gradient and load were dropped before the eager re-run: same numbers
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")
    load = {run: [r["expert_load"] for r in step_records(read_metrics(tmp_path / run)).values()]
            for run in ("eager", "fallback")}
    assert load["fallback"] == load["eager"]
    failed = events(read_metrics(tmp_path / "fallback"), "compile_failed")
    assert len(failed) == 1 and "no C++ compiler" in failed[0]["reason"]


def test_recompile_limit_trains_eagerly_and_says_so(monkeypatch):
    """Past dynamo's recompile limit a frame would run eagerly without a word while the run says
    compiled; the step fails instead and StepCompiler falls back visibly (the reason names the
    limit, which the trainer writes as its ``compile_failed`` event), with the eager step's gradients."""
    import torch._dynamo
    from torch import nn

    from nanoseek.train.compiled import StepCompiler

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, twin = nn.Linear(1, 1), nn.Linear(1, 1)
    twin.load_state_dict(model.state_dict())
    compiler = StepCompiler(model, True)
    with torch._dynamo.config.patch(recompile_limit=3):
        for rank in range(1, 6):        # a new rank is a new graph: no dynamic shape covers it
            x = torch.full([1] * rank, float(rank))
            model.zero_grad(), twin.zero_grad()
            compiler.run(lambda m: m(x).sum().backward(), list(model.parameters()))
            twin(x).sum().backward()
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad)
            assert compiler.active == (rank <= 3)
    torch._dynamo.reset()
    assert "recompile limit was hit (recompile_limit 3 graphs" in compiler.failure


def test_compile_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\] compile"):
        make_cfg(tmp_path, train={"compile": "yes"})
    assert make_cfg(tmp_path).train.compile is False         # the default: eager


def test_compile_is_refused_under_torchrun(tmp_path, monkeypatch):
    import nanoseek.train.loop as loop

    class TwoRanks(loop.ParallelRuntime):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.active = True

    monkeypatch.setattr(loop, "ParallelRuntime", TwoRanks)
    with pytest.raises(ConfigError, match=r"\[train\] compile = true compiles the step of one process"):
        run(make_cfg(tmp_path, train={"compile": True}))


def _one_step_grads(cfg):
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import build_pretraining
    model, task, _ = build_pretraining(cfg)
    tr = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, cfg.train.out_dir, quiet=True, progress=False)
    micro = tr._draw()
    loss, _, _ = tr.compiler.run(lambda m: tr._micro_steps(m, micro, 0.5, 0.5, None), tr.params)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, tr


@pytest.mark.slow
def test_compiled_step_equals_eager(tmp_path):
    le, ge, _ = _one_step_grads(make_cfg(tmp_path, "e"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no fallback
        lc, gc, tr = _one_step_grads(make_cfg(tmp_path, "c", train={"compile": True}))
    assert tr.compiler.active and tr.compiler.compile_seconds > 0
    assert lc == pytest.approx(le, rel=1e-5)
    assert ge.keys() == gc.keys()
    for n in ge:
        assert torch.allclose(gc[n], ge[n], rtol=1e-4, atol=1e-6), n
    steps = {"max_steps": 4, "eval_every": 0, "save_every": 0}
    run(make_cfg(tmp_path, "eager", train=steps))
    run(make_cfg(tmp_path, "compiled", train={**steps, "compile": True}))
    ref, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert got.keys() == ref.keys() and all(got[s] == pytest.approx(ref[s], rel=1e-4) for s in ref)
    assert len(events(read_metrics(tmp_path / "compiled"), "compiled")) == 1


@pytest.mark.slow
def test_compiled_run_resumes_exactly(tmp_path):
    steps = {"max_steps": 6, "eval_every": 3, "save_every": 4, "compile": True}
    run(make_cfg(tmp_path, "a", train=steps))
    ref = losses(tmp_path / "a")
    b = make_cfg(tmp_path, "b", train=steps)
    run(b, hooks=[StopAt(2)])
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(b, resume=True, hooks=[CrashAt(6)])
    run(b, resume=True)
    assert losses(tmp_path / "b") == ref                     # bitwise, as the eager trainer's resume
