"""Manifold-constrained hyper-connections (mHC), DeepSeek-V4's replacement for residuals.

The residual stream is widened to ``hc_mult`` = n parallel streams ``X [B, T, n, d]`` (the
embedding copied n times). Around each block (attention, then the MoE) one
:class:`HyperConnection` (HF names ``attn_hc`` / ``ffn_hc``: ``fn [(2+n)n, n d]``, ``base
[(2+n)n]``, ``scale [3]``) reads all streams and computes, per token, in fp32:

  x' = RMSNorm_unweighted(flatten(X))                        [B, T, n d]
  [a_pre | a_post | a_comb] = x' fn^T                         n, n, n*n
  pre  = sigmoid(a_pre  * scale_0 + base_pre) + eps           [B, T, n]   collapse weights
  post = 2 sigmoid(a_post * scale_1 + base_post)              [B, T, n]   expand weights
  comb = Sinkhorn(softmax_rows(a_comb * scale_2 + base_comb) + eps)   [B, T, n, n]
  block input  u = sum_j pre_j X_j                            [B, T, d]
  new streams  X'_k = post_k * Block(u) + sum_j comb_jk X_j   (comb^T X)

Sinkhorn-Knopp (``hc_sinkhorn_iters`` t) alternately normalises columns and rows towards a
doubly-stochastic matrix, so the stream mixing is non-expansive: one column normalisation, then
t - 1 (row, column) rounds, each divided by (sum + eps), as transformers does.

The output head collapses the streams with :class:`HyperHead` (HF ``hc_head``: ``hc_fn [n, n
d]``, ``hc_base [n]``, ``hc_scale [1]``): ``sum_j (sigmoid(a_j * scale + base_j) + eps) X_j``.

All mHC parameters stay fp32 whatever dtype the model is cast to (transformers'
``_keep_in_fp32_modules_strict``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..fp32 import fp32_linear, keep_fp32


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, the scale computed in fp32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Column-normalise, then (iters - 1) row+column rounds; m [..., n, n] positive."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    def __init__(self, hc_mult: int, hidden_size: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        n = hc_mult
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, T, n, d] -> (post [B, T, n] fp32, comb [B, T, n, n] fp32, block input [B, T, d])."""
        B, T, n, _ = streams.shape
        a = fp32_linear(unweighted_rms_norm(streams.reshape(B, T, -1).float(), self.norm_eps), self.fn)
        a_pre, a_post, a_comb = a.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(a_pre * s_pre + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(a_post * s_post + b_post)
        comb = torch.softmax(a_comb.reshape(B, T, n, n) * s_comb + b_comb.reshape(n, n), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed


def hc_merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * out + sum_j comb_jk X_j: streams [B, T, n, d], out [B, T, d] -> [B, T, n, d]."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    def __init__(self, hc_mult: int, hidden_size: int, hc_eps: float, norm_eps: float):
        super().__init__()
        n = hc_mult
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B, T, n, d] -> [B, T, d]."""
        flat = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps)
        a = fp32_linear(flat, self.hc_fn)
        pre = torch.sigmoid(a * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


__all__ = ["HyperConnection", "HyperHead", "hc_merge", "sinkhorn", "unweighted_rms_norm"]
