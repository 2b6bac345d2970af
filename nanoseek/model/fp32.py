"""Tensors that stay exactly fp32 whatever dtype the model is cast to.

The router (``mlp.gate.weight``, ``e_score_correction_bias``), the per-expert load counters and
the RoPE inverse frequencies must keep full precision in a bf16 model: DeepSeek (and HF, with
``_keep_in_fp32_modules_strict``) run the router in fp32, the aux-loss-free bias moves in steps
of 0.001 that bf16 cannot resolve near 1, load counts above 256 are not exact in bf16, and bf16
inverse frequencies put the rotation angle off by radians at long positions.

A module pins its OWN parameters and buffers by overriding ``_apply``::

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

so ``model.to(torch.bfloat16)`` / ``.half()`` moves them between devices but never rounds them
(casting to bf16 and back would keep the fp32 dtype but lose the values).
"""

from __future__ import annotations

from typing import Callable

import torch


def keep_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``Module._apply`` function: fp32 tensors follow its device, never its dtype."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out
    return apply
