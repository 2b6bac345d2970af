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

The same computations must also stay fp32 under bf16 *autocast* (``[train] dtype = "bfloat16"``),
which runs every linear and matmul in bf16 whatever its inputs' dtype: ``F.linear(x.float(),
w.float())`` there gives bf16 scores. :func:`fp32_linear` and :func:`fp32_matmul` are the fp32
products with autocast off around them, used by the routers and the other places that compute in
fp32 on purpose (DeepSeek-V3's mixed-precision training keeps the gating, norms and attention out
of its low-precision GEMMs).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


def keep_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``Module._apply`` function: fp32 tensors follow its device, never its dtype."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out
    return apply


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A region where autocast is off (nothing to do on a device without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in fp32, also under autocast: [..., in], [out, in] -> [..., out] fp32."""
    with no_autocast(x.device.type):
        return F.linear(x.float(), weight.float())


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32, also under autocast."""
    with no_autocast(a.device.type):
        return torch.matmul(a.float(), b.float())
