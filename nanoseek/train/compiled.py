"""The compiled training step (``[train] compile = true``): each micro-batch's forward, loss and
backward through ``torch.compile``, with the eager step as the fallback.

A small model's step is hundreds of small operators (RMSNorm, RoPE, SwiGLU, routing, the loss),
each a dispatch and a pass over memory; inductor fuses the elementwise ones into a few kernels
(and AOTAutograd does the same for the backward). The MoE experts stay one grouped GEMM per
projection (``nanoseek::grouped_linear``, :mod:`nanoseek.model.moe`), so the compiled step does the
same arithmetic as the eager one: losses and gradients agree to rounding (tests/test_train_compile.py).

:class:`StepCompiler` wraps the model once (``torch.compile(model)``: the same parameters, buffers
and state dict; only the trainer's training micro-batches call it, while evaluation, the spike
guard's reference pass and checkpoints use the eager model). It compiles on the first step (the
time is logged as ``compile_seconds`` in the run's ``compiled`` event; the step's wall time counts
against ``max_minutes`` like any other). If compiling or running the compiled step raises (no C++
compiler, an operator the compiler does not support, a V3.2 indexer...), the step's gradients,
the model's buffers (the MoE load counts) and the RNG are put back, one warning line says why, and
the step and the rest of the run go eager. That includes dynamo's recompile limit: past
``torch._dynamo.config.recompile_limit`` graphs for one function (new shapes dynamic shapes could
not cover; dynamo counts per code object, so other models of the same class compiled earlier in
the process count too) dynamo would otherwise run the frame eagerly without a word while the run's
events say compiled; the step runs with ``fail_on_recompile_limit_hit`` so that it fails and falls back
visibly (:func:`recompile_limit_fails`, which the engine's compiled decode uses too).

Deliberately left out: compiling the optimizer step (the foreach AdamW is a few dozen kernels over
all parameters: measured ~5% of the speedrun's step, benchmarks/bench_train_small.py), and
compiling under torchrun (DDP, FSDP and the pipeline wrap the model in hooks the compiled graph
would have to honour; the trainer refuses the combination).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def dynamo_settings(**settings: Any) -> Iterator[None]:
    """``torch._dynamo.config`` values for the calls inside, restored after (set by hand:
    ``config.patch`` costs ~18 us a call, a compiled decode step ~1.5 ms)."""
    import torch._dynamo

    config = torch._dynamo.config
    before = {name: getattr(config, name) for name in settings}
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


def recompile_limit_fails(**settings: Any) -> contextlib.AbstractContextManager:
    """Compiled calls inside raise when a frame reaches dynamo's recompile limit, instead of
    silently running that frame eagerly from then on (dynamo's default); the caller falls back
    and says so. ``settings``: more dynamo settings for the same calls (:func:`dynamo_settings`)."""
    return dynamo_settings(fail_on_recompile_limit_hit=True, **settings)


def failure_reason(e: BaseException) -> str:
    """One line saying why a compiled call failed (the recompile limit named as such)."""
    if type(e).__name__ == "FailOnRecompileLimitHit":
        import torch._dynamo

        c = torch._dynamo.config
        return (f"dynamo's recompile limit was hit (recompile_limit {c.recompile_limit} graphs per function, "
                f"accumulated_recompile_limit {c.accumulated_recompile_limit}): shapes or values one graph "
                "could not cover, or other models with the same forward compiled earlier in this process")
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


class StepCompiler:
    """The module a training micro-batch runs through: compiled when ``enabled``, else the model."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model = model
        self.compiled: nn.Module | None = torch.compile(model) if enabled else None
        self.compile_seconds: float | None = None      # the first compiled step's wall time
        self.failure: str | None = None                # why the run went eager, if it did

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def run(self, fn: Callable[[nn.Module], Any], params: list[torch.Tensor]) -> Any:
        """``fn(module)``: the step's forward + backward over its micro-batches. Compiled, it runs
        guarded: on an exception the gradients of ``params``, the buffers and the RNG are put back
        and ``fn`` runs again on the eager model (for this and every later step)."""
        if self.compiled is None:
            return fn(self.model)
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        rng = torch.get_rng_state()
        t0 = time.perf_counter()
        try:
            with recompile_limit_fails():
                out = fn(self.compiled)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly, never fail the run
            self.failure = failure_reason(e)
            warnings.warn(f"[train] compile = true: the compiled training step failed ({self.failure}); "
                          "training eagerly from here", RuntimeWarning, stacklevel=2)
            self.compiled = None
            for p in params:
                p.grad = None
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
            torch.set_rng_state(rng)
            return fn(self.model)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        return out


__all__ = ["StepCompiler", "dynamo_settings", "recompile_limit_fails", "failure_reason"]
