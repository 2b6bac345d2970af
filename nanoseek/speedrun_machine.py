"""How the speedrun's pre-training step runs on this machine: compiled, and in bf16 where the CPU
multiplies bf16 natively, unless the recipe says otherwise.

The pre-training stage is the main job's bottleneck (every token more in its minutes is a better
base model), and at the speedrun's size a step is hundreds of small operators: ``[train] compile =
true`` fuses them (1.4x the eager step), and bf16 autocast on a CPU with native bf16 matmuls (AMX,
ARM's BF16) adds to it (1.6x), with the same validation loss per token as eager fp32 over a fixed
4,000-step pre-training (0.516 against 0.523; README, Performance). Neither is the trainer's default,
for reasons that hold here only in part: compiling costs a minute or two before the first step
(44-84 s cold on 2 cores, seconds with inductor's cache warm), which a short stage never wins back,
and bf16 on a CPU that emulates it runs ~50x slower than fp32. So :func:`pretrain_step_settings`
decides, once per run (run.json records the choice on the pre-training stage and a resumed run
keeps it):

* the recipe (or ``--set``) writes ``[pretrain.train] compile`` or ``dtype``: those, nothing added;
* the stage is shorter than ``FAST_MINUTES``, or trains on a GPU (not measured there): the
  trainer's defaults (eager, fp32);
* otherwise ``compile = true``, plus ``dtype = "bfloat16"`` where a bf16 matmul runs at least half
  as fast as an fp32 one (:func:`nanoseek.train.metrics.measure_matmul_peak`, ~1 s).
"""

from __future__ import annotations

from typing import Any

import torch

FAST_MINUTES = 5.0          # below it, a cold compile costs more steps than the compiled step saves
NATIVE_BF16 = 0.5           # bf16 matmul rate / fp32 rate at or above which the CPU multiplies bf16 natively


def pretrain_step_settings(written: dict[str, Any], minutes: float) -> tuple[dict[str, Any], str]:
    """(the ``[pretrain.train]`` keys to add to ``written`` (the table as the recipe writes it), why).
    ``minutes``: the pre-training stage's budget."""
    if "compile" in written or "dtype" in written:
        return {}, "compile and dtype as the recipe writes them"
    if minutes < FAST_MINUTES:
        return {}, f"eager fp32: {minutes:.1f} min is too short to win back compiling ({FAST_MINUTES:g} min and up compile)"
    device = str(written.get("device", "auto"))
    if device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return {}, "eager fp32: the compiled bf16 default is measured on CPUs only; set compile and dtype to choose"
    from nanoseek.train.metrics import measure_matmul_peak

    fp32, bf16 = measure_matmul_peak("cpu", "float32"), measure_matmul_peak("cpu", "bfloat16")
    ratio = bf16 / fp32
    if ratio >= NATIVE_BF16:
        return ({"compile": True, "dtype": "bfloat16"},
                f"compiled, bf16 autocast (this CPU multiplies bf16 at {ratio:.1f}x its fp32 rate)")
    return {"compile": True}, f"compiled fp32 (bf16 runs at {ratio:.2f}x fp32 here: emulated, so not used)"


__all__ = ["FAST_MINUTES", "NATIVE_BF16", "pretrain_step_settings"]
