"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer and its top-k selection.

Each MLA layer of a V3.2 model (``index_n_heads > 0``) owns a small indexer. Per query token t
and key token s, with x the layer's (normed) input and c_Q = RMSNorm(W_qa x) MLA's query latent::

    q_{t,h} = W_qb^I c_Q,t               [H_I heads x index_head_dim]   (``wq_b``)
    k_s     = LayerNorm(W_k^I x_s)       [index_head_dim], one key shared by the heads (``wk``, ``k_norm``)
    w_{t,h} = (W_w x_t)_h / sqrt(H_I)    per-head weights (``weights_proj``)
    I(t, s) = sum_h w_{t,h} ReLU(q_{t,h} . k_s / sqrt(index_head_dim))

with RoPE on the first ``qk_rope_head_dim`` dims of q and k, in the half-split layout (MLA itself
rotates interleaved pairs). The ``index_topk`` keys of highest I(t, .) among those t may see are
the only keys MLA attends to; with no more visible keys than that, attention is dense. The
scores are computed with the same operations, in the same order, as transformers'
``DeepseekV32Indexer`` (fp32 matmuls); equal scores are ranked by position (:meth:`Indexer.select`).

The selection is discrete and carries no gradient. The indexer learns from its own loss
(:func:`indexer_kl`, the paper's two stages): the KL divergence from the main attention's
distribution (summed over heads, L1-normalised, detached) to softmax(I(t, .)), over every visible
key in the dense warm-up (MLA dense, only the indexer trained) and over the selected keys in
sparse training. The indexer's input is detached, so that loss trains only the indexer and the
language-model loss never reaches it (the paper: "we detach the indexer input from the
computational graph for separate optimization").

Cached decoding keeps one more tensor per layer, the rotated indexer key k_s
(:class:`~nanoseek.model.cache.KVCache` ``index_k``), next to MLA's latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp32 import fp32_linear, fp32_matmul, keep_fp32
from .kmajor import Linear
from .rope import apply_rope


class FP32Linear(nn.Linear):
    """A bias-free projection whose weight stays exactly fp32 in a bf16 model (HF keeps the
    indexer's ``weights_proj`` fp32 too: ``_keep_in_fp32_modules``)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)


class Indexer(nn.Module):
    """The lightning indexer of one layer: scores every visible key, selects the top ``index_topk``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.rope_dim = c.qk_rope_head_dim
        self.wq_b = Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(c.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = FP32Linear(c.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(pe, cos, sin, interleave=False), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotated indexer keys of x [B, T, d] -> [B, T, index_head_dim] (what the cache stores)."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """I(t, s) [B, T, S] fp32 for queries x [B, T, d] (MLA's q latent [B, T, q_lora]) and keys [B, S, D]."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), cos, sin)
        s = fp32_matmul(q, keys.transpose(-1, -2).unsqueeze(1)) * self.softmax_scale
        s = F.relu(s)                                                         # [B, T, H, S]
        w = fp32_linear(x, self.weights_proj.weight) * self.n_heads ** -0.5                # [B, T, H] fp32
        return fp32_matmul(w.unsqueeze(-2), s).squeeze(-2)                   # [B, T, S]

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The top-``index_topk`` visible keys of each query: :func:`top_k_visible`."""
        return top_k_visible(scores, visible, self.topk)


def top_k_visible(scores: torch.Tensor, visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``k`` visible keys of highest score per query (every visible one if fewer): ([B, T, S]
    bool, their slots [B, T, k] or None when k >= S and every visible key is kept). V3.2's
    indexer and V4's compressed-sparse attention both select with it.

    Equal scores are ranked by position, earliest first, so the selection is a function of the
    visible keys' scores alone. ``torch.topk`` (what transformers calls) breaks ties in an order
    that depends on the row's length, so a query decoded over its cache (a row of t + 1 keys)
    and the same query in a full forward (a row of T keys) could keep different keys; exact ties
    are common with few indexer heads (the ReLU zeroes every head's term for many keys). Where
    the k-th score is not tied the set is the same as transformers'.
    """
    scores = scores.detach().masked_fill(~visible, float("-inf"))
    if k >= scores.shape[-1]:
        return visible, None
    kth = scores.topk(k, dim=-1).values[..., -1:]                            # the k-th largest value
    above, tied = scores > kth, scores == kth
    room = k - above.sum(-1, keepdim=True)                                   # tied slots still to take
    chosen = above | (tied & (tied.cumsum(-1) <= room))                      # exactly k, earliest ties first
    index = chosen.to(torch.uint8).topk(k, dim=-1).indices
    return chosen & visible, index


def indexer_kl(scores: torch.Tensor, attn_probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p_t || softmax(I_t)) restricted to the keys ``keep`` [B, T, S].

    ``attn_probs`` [B, H, T, S] are the main attention's probabilities (their sum over heads,
    L1-normalised over ``keep``, is the detached target p_t); ``scores`` [B, T, S] the indexer's I.
    """
    target = attn_probs.detach().float().sum(1).masked_fill(~keep, 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q = scores.float().masked_fill(~keep, float("-inf")).log_softmax(-1).masked_fill(~keep, 0.0)
    kl = target * (target.clamp_min(1e-30).log() - log_q)                # 0 where the target is 0
    return kl.sum(-1).mean()
