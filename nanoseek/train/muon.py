"""Muon: momentum orthogonalised by Newton-Schulz, for the hidden weight matrices (``[optim] optimizer = "muon"``).

Muon (Keller Jordan, 2024) treats a weight matrix W [A, B] as a linear map and steps along the
orthogonalised momentum; Moonshot's "Muon is Scalable for LLM Training" (2025) added decoupled
weight decay and an update scale matching AdamW's update RMS, and trained Moonlight and Kimi K2
with it; DeepSeek-V4 trained with Muon too. Per matrix, with momentum mu, lr gamma, decay lambda::

    M_t = mu M_{t-1} + (1 - mu) g_t                       momentum (an EMA; the scale cancels below)
    U_t = (1 - mu) g_t + mu M_t   (nesterov)   or   M_t
    O_t = NS_k(U_t)                                        ~ U V^T of U_t = U S V^T (k quintic Newton-Schulz
                                                             steps in bf16, coefficients 3.4445, -4.7750, 2.0315)
    W_t = (1 - gamma lambda) W_{t-1} - gamma s(A, B) O_t

``s`` is ``adjust_lr_fn``: "match_rms_adamw" ``0.2 sqrt(max(A, B))`` (Moonshot's: the update has
AdamW's typical RMS of about 0.2, so AdamW's lr and weight decay carry over, which is what
nanoseek defaults to) or "original" ``sqrt(max(1, A / B))`` (Keller Jordan's, tuned with a
Muon lr near 0.02).

This is ``torch.optim.Muon``'s algorithm (its iteration, coefficients, eps, bf16 arithmetic and
lr adjustment), generalised in one way: torch's takes 2-D parameters only, and nanoseek stacks
its routed experts (``gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``). Here a parameter of
shape ``[..., A, B]`` is a batch of ``A x B`` matrices, each orthogonalised on its own (batched
matmuls), and ``row_blocks[p] = k`` splits each matrix's rows into k matrices of ``A/k`` rows: the
fused SwiGLU ``gate_up_proj`` is the gate and the up projection, two matrices as in DeepSeek's
own checkpoints (``gate_proj``, ``up_proj``) and in Moonshot's Muon. On a 2-D parameter a step is
``torch.optim.Muon``'s bit for bit; on a stacked one, each matrix's update is torch's on that
matrix up to the rounding of batched bf16 matmuls, which are mostly bit-identical to one-by-one
ones (tests/test_train_muon.py). The momentum buffer has the parameter's shape, so the
distributed checkpoint code gathers and shards it like an AdamW moment (expert parallelism
works; FSDP's sharded matrices cannot be orthogonalised locally and are refused in ``optim.py``).

Left out: Kimi K2's MuonClip (QK-clip of attention logits) and DeepSeek-V4's two-stage
Newton-Schulz coefficients; the distributed Muon variants that gather sharded matrices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # torch.optim.Muon's (Keller Jordan's) quintic
NS_EPS = 1e-7                                   # the Frobenius-norm floor before the iteration


def orthogonalize(G: Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> Tensor:
    """``[..., A, B]`` -> bf16 ``[..., A, B]``: each matrix's Newton-Schulz orthogonalisation (torch's)."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT                                                   # iterate on the wide side: [m, n], m <= n
    if X.ndim == 2:                                                # exactly torch.optim.Muon's operations
        X = X / X.norm().clamp(min=eps)                            # spectral norm <= Frobenius norm <= 1
        for _ in range(steps):
            gram = X @ X.T                                         # [m, m]
            X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    else:
        shape = X.shape
        X = X.reshape(-1, *shape[-2:])                             # [n_matrices, m, n]
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = X @ X.mT                                        # [n_matrices, m, m]
            X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
        X = X.reshape(shape)
    return X.mT if tall else X


def adjusted_lr(lr: float, adjust_lr_fn: str, rows: int, cols: int) -> float:
    """The lr of one ``rows x cols`` matrix's orthogonalised update (torch.optim.Muon's adjustment)."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    raise ValueError(f"adjust_lr_fn must be 'match_rms_adamw' or 'original', got {adjust_lr_fn!r}")


class Muon(torch.optim.Optimizer):
    """Muon over parameters of shape ``[..., A, B]`` (see the module docstring).

    ``row_blocks``: {parameter: k}, a parameter whose matrices are k matrices of ``A/k`` rows
    stacked (1 for any other). State per parameter: ``momentum_buffer``, the parameter's shape.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str = "original",
                 row_blocks: dict[Tensor, int] | None = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be in [1, 99], got {ns_steps}")
        adjusted_lr(1.0, adjust_lr_fn, 1, 1)                       # refuses an unknown adjust_lr_fn
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        self.row_blocks = dict(row_blocks or {})
        for group in self.param_groups:
            for p in group["params"]:
                k = self.row_blocks.get(p, 1)
                if p.ndim < 2 or k < 1 or p.shape[-2] % k:
                    raise ValueError(f"Muon takes matrices [..., A, B] (A divisible by its {k} row blocks), "
                                     f"got a parameter of shape {tuple(p.shape)}")

    def matrix_shape(self, p: Tensor) -> tuple[int, int]:
        """(rows, cols) of each matrix Muon orthogonalises in ``p``."""
        return p.shape[-2] // self.row_blocks.get(p, 1), p.shape[-1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                rows, cols = self.matrix_shape(p)
                if rows != p.shape[-2]:                            # [..., k*rows, cols] -> [..., k, rows, cols]
                    update = update.reshape(*p.shape[:-2], -1, rows, cols)
                update = orthogonalize(update, group["ns_steps"]).reshape(p.shape)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], rows, cols))
        return loss


__all__ = ["Muon", "orthogonalize", "adjusted_lr", "NS_COEFFICIENTS", "NS_EPS"]
