"""How the speedrun's pre-training step runs on this machine: compiled, when the stage is long enough
to win back compiling, unless the recipe says otherwise.

The pre-training stage is the main job's bottleneck (every token more in its minutes is a better
base model), and at the speedrun's size a step is hundreds of small operators: ``[train] compile =
true`` fuses them (1.46-1.48x the eager step, benchmarks/bench_train_small.py) and does the eager step's
arithmetic (losses equal to ~1e-6 per step; tests/test_train_compile.py), so it is as good per
token. It is not the trainer's default because compiling costs a minute or two before the first
step (84-108 s cold on 2 cores, seconds with inductor's cache warm), which a short stage never wins
back. So :func:`pretrain_step_settings` decides, once per run (run.json records the choice on the
pre-training stage and a resumed run keeps it):

* the recipe (or ``--set``) writes ``[pretrain.train] compile`` or ``dtype``: those, nothing added;
* the stage is shorter than ``FAST_MINUTES``, or trains on a GPU (not measured there): the
  trainer's defaults (eager);
* otherwise ``compile = true``.

bf16 autocast is not part of the default, though it is faster still on CPUs that multiply bf16
natively (1.12-1.24x the compiled fp32 step): it is not shown to be as good per token. Three seeds
of a fixed 6,000-step pre-training of the recipe (the routers in fp32 under autocast) ended at the
same mean validation loss as compiled fp32 (0.508 both) with the two runs of a seed up to 0.04
apart either way, so no difference below ~0.1 could be seen; before the routers were fp32, the
30-minute recipe's seed 1 had compiled bf16 trailing fp32 (0.513 against 0.455 at step 7,000) and
its base scoring 24.7% (README, Performance; docs/speedrun-history.md).
``--set pretrain.train.dtype=bfloat16`` chooses it.
"""

from __future__ import annotations

from typing import Any

import torch

FAST_MINUTES = 5.0          # below it, a cold compile costs more steps than the compiled step saves


def pretrain_step_settings(written: dict[str, Any], minutes: float) -> tuple[dict[str, Any], str]:
    """(the ``[pretrain.train]`` keys to add to ``written`` (the table as the recipe writes it), why).
    ``minutes``: the pre-training stage's budget."""
    if "compile" in written or "dtype" in written:
        return {}, "compile and dtype as the recipe writes them"
    if minutes < FAST_MINUTES:
        return {}, f"eager: {minutes:.1f} min is too short to win back compiling ({FAST_MINUTES:g} min and up compile)"
    device = str(written.get("device", "auto"))
    if device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return {}, "eager: compiling by default is measured on CPUs only; set compile to choose"
    return {"compile": True}, "compiled (torch.compile; the eager step's arithmetic)"


__all__ = ["FAST_MINUTES", "pretrain_step_settings"]
