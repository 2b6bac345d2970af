"""Multi-head Latent Attention (MLA), and the standard MHA/GQA baseline for ablations.

MLA (DeepSeek-V2/V3), per token x [d]:
  query  q = W_qb · RMSNorm(W_qa · x)   (or W_q · x when q_lora_rank is null), per head [nope | rope]
  kv     [c_KV | k_rope] = W_kva · x ; c_KV = RMSNorm(c_KV)   (latent kv_lora_rank, ONE rope head)
  naive  [k_nope | v] per head = W_kvb · c_KV ; k = [k_nope | RoPE(k_rope)] for every head
Two code paths compute the same function (tests check they agree):

* ``naive``: materialise per-head K and V from the latent and run SDPA. Used for training and
  prefill, where the matmuls are large and the per-head K/V are transient.
* ``absorbed``: fold W_UK (the k_nope rows of W_kvb) into the query, giving a kv_lora_rank-dim
  query per head, attend directly over the cached latent (plus the rope part), and fold W_UV
  into the output. Only ``c_KV`` and ``RoPE(k_rope)`` are cached: MQA with a 576-dim key and a
  512-dim value for DeepSeek-V3. Used for decoding.

With a cache, which slots each query may see is computed once per forward (:class:`CacheMask`)
and shared by every layer. The absorbed path is three batched matmuls per layer: the query
``[W_UK^T q_nope | q_rope]`` (one ``bmm`` over heads) against the whole cached slot
``[c_KV | k_rope]`` (heads folded into the query rows, since all heads share the one latent
key; the mask enters as an additive bias of the same ``baddbmm``), softmax, the probabilities
times ``c_KV``, then W_UV (one ``bmm`` over heads) before ``o_proj``.

DeepSeek-V3.2 (``index_n_heads > 0``, :mod:`.dsa`): the layer's lightning indexer picks the keys
each query attends to (:class:`Selection`); training and prefill mask the others out of the same
attention, and decode steps (one token, or MTP's draft and its check) gather each query's
``index_topk`` selected slots of the cache, so their attention costs O(index_topk) whatever the
context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .dsa import Indexer, indexer_kl
from .kmajor import Linear
from .norm import RMSNorm
from .rope import apply_rope


# V3.2 decode steps of at most this many queries per row (one token, or MTP's draft and its check)
# attend over each query's gathered top-k slots; longer steps mask the selection into the cache
SPARSE_GATHER_MAX_QUERIES = 4


# Compiled causal attention on a CPU over at most this many positions runs as explicit matmuls and
# softmax with a precomputed additive mask (:func:`causal_attention`); its table is this size squared
# (fp32, 4 MiB)
MATH_CAUSAL_MAX_LEN = 1024
# 0 on and below the diagonal, -inf above: built at import, outside any graph, so compiled code reads
# it as an input (a mask built in the graph from indices compiles into scalar, not vector, kernels:
# attention 1.3-1.6x slower)
_CAUSAL_TABLE = torch.full((MATH_CAUSAL_MAX_LEN, MATH_CAUSAL_MAX_LEN), float("-inf")).triu_(1)
# ... in two query blocks from this many positions on
CAUSAL_BLOCK_MIN = 256


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v over [B, H, T, d] (the keys are the queries' own positions).

    SDPA, except under ``torch.compile`` on a CPU for T <= MATH_CAUSAL_MAX_LEN: there inductor
    replaces SDPA by its math decomposition with an in-graph mask, which runs slower than the same
    math written here against a constant mask table (fp32 scores and softmax, the probabilities in
    the values' dtype, as an eager reference attention does); at the speedrun's 2 x 4 heads x 256
    positions, forward and backward 2.4-3.0 ms against 3.8-4.8 (one thread; the whole compiled
    training step: benchmarks/bench_train_small.py). From CAUSAL_BLOCK_MIN positions on, the
    queries go in two halves, each against the keys up to its last row only: the fully masked
    upper-right quarter is never computed (3/4 of the score and value products: the compiled fp32
    training step at 256 positions 1.14x faster; four blocks measured 1.15x, but a block count that
    grows with the length recompiles a dynamic-length graph at every step of it). Each row's softmax
    is over the same visible keys, so the result is the one-block result. Eager runs and other
    devices keep SDPA's fused kernels."""
    T = q.shape[-2]
    if torch.compiler.is_compiling() and q.device.type == "cpu" and T <= MATH_CAUSAL_MAX_LEN:
        # two blocks or one: the choice is a guard on a dynamic length (one more graph where GRPO's
        # update lengths straddle it; a block count of T // 128 recompiled every 128 positions)
        bounds = [0, T // 2, T] if T >= CAUSAL_BLOCK_MIN else [0, T]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):       # queries [a, b) see keys [0, b)
            scores = torch.matmul(q[..., a:b, :], k[..., :b, :].transpose(-1, -2)).float() * scale
            p = torch.softmax(scores + _CAUSAL_TABLE[a:b, :b], dim=-1).to(v.dtype)
            outs.append(torch.matmul(p, v[..., :b, :]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _cache_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, S] bool: key slot j is visible to the query at position p iff j <= p."""
    slots = torch.arange(length, device=positions.device)
    return slots[None, None, :] <= positions[:, :, None]


class CacheMask:
    """The slots [0, length) a cached step attends over and which of them each query sees.

    Built once per forward (by the model, or by a layer called on its own) and shared by every
    layer: ``visible`` [B, T, S] bool for SDPA, ``bias(H)`` the additive fp32 form (0 visible,
    -inf hidden) laid out for the absorbed path's [B, T*H, S] scores.
    """

    def __init__(self, positions: torch.Tensor, length: int):
        self.length = length
        self.visible = _cache_mask(positions, length)                        # [B, T, S]
        self._bias: dict[int, torch.Tensor] = {}

    def bias(self, heads: int) -> torch.Tensor:
        """[B, T*heads, S] fp32 (a broadcastable [B, 1, S] when T == 1)."""
        if heads not in self._bias:
            B, T, S = self.visible.shape
            bias = torch.zeros(B, T, S, device=self.visible.device).masked_fill_(~self.visible, float("-inf"))
            if T > 1:
                bias = bias[:, :, None, :].expand(B, T, heads, S).reshape(B, T * heads, S)
            self._bias[heads] = bias
        return self._bias[heads]


class Selection:
    """The keys a V3.2 layer's queries attend to in one forward (see :mod:`.dsa`).

    ``chosen`` [B, T, S] bool: the indexer's top-k among the ``visible`` keys (``index`` [B, T, k]
    their slots, None when every key is kept). ``attend`` is what attention uses: ``chosen``, or
    every visible key in the dense warm-up. ``scores`` (the indexer's I, with gradient) is kept only
    while the indexer trains.
    """

    def __init__(self, chosen: torch.Tensor, index: torch.Tensor | None, visible: torch.Tensor,
                 scores: torch.Tensor | None, dense: bool):
        self.chosen, self.visible, self.scores = chosen, visible, scores
        self.attend = visible if dense else chosen
        self.index = None if dense else index

    def gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's selected slots of kv [B, S, C] -> [B*T, k, C], and the additive fp32 bias
        [B*T, 1, k] that hides any selected slot the query may not see (fewer visible than k)."""
        B, T, k = self.index.shape
        seen = self.attend.gather(-1, self.index).reshape(B * T, 1, k)
        bias = torch.zeros(seen.shape, device=kv.device).masked_fill_(~seen, float("-inf"))
        rows = torch.arange(B, device=kv.device)[:, None, None]
        return kv[rows, self.index].reshape(B * T, k, kv.shape[-1]), bias

    def bias(self, heads: int) -> torch.Tensor:
        """[B, T*heads, S] fp32 additive form of ``attend`` for the absorbed path."""
        B, T, S = self.attend.shape
        bias = torch.zeros(B, T, S, device=self.attend.device).masked_fill_(~self.attend, float("-inf"))
        return bias[:, :, None, :].expand(B, T, heads, S).reshape(B, T * heads, S)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = c.qk_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        self.interleave = c.rope_interleave
        self.absorb = False  # switched on by the inference engine for decoding
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=1e-6)
            self.q_b_proj = Linear(c.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(c.hidden_size, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        # DeepSeek-V3.2: the lightning indexer picks the keys each query attends to (dsa.py)
        self.indexer = Indexer(c) if c.index_n_heads else None
        self.dsa_stage: str | None = None   # "dense" / "sparse" while the indexer trains (set_dsa_stage)
        self.indexer_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                mask: CacheMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        else:
            q = self.q_proj(x)
        q = q.view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)                    # [B, T, H, rope]

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                  # [B, T, kv_lora_rank]
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)                    # [B, T, rope]

        if cache is not None:
            if mask is None:
                mask = CacheMask(positions, cache.check_positions(positions))
            cache.write_slot(self.layer_idx, positions, torch.cat([latent, k_pe], dim=-1), rows)
            kv = cache.read_slots(self.layer_idx, mask.length, rows, batch=B).to(x.dtype)   # [B, S, c + r]
            latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        elif self.absorb:
            kv = torch.cat([latent, k_pe], dim=-1)                            # [B, T, c + r]

        select = None
        if self.indexer is not None:
            select = self._select(x, q_latent, cos, sin, positions, cache, rows, mask)
        if self.absorb:
            out = self._absorbed(q_nope, q_pe, kv, mask, select)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask, select)
        return self.o_proj(out.reshape(B, T, H * self.v_head_dim))

    def _select(self, x, q_latent, cos, sin, positions, cache, rows, mask) -> "Selection":
        """Run the indexer: which keys each query attends to (and its scores, while it trains)."""
        B, T, _ = x.shape
        training = self.dsa_stage is not None
        xi, qi = (x.detach(), q_latent.detach()) if training else (x, q_latent)
        keys = self.indexer.keys(xi, cos, sin)
        if cache is not None:
            cache.write_index_keys(self.layer_idx, positions, keys, rows)
            keys = cache.read_index_keys(self.layer_idx, mask.length, rows, batch=B).to(keys.dtype)
            visible = mask.visible
        else:
            visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, T, T)
        if training:
            scores = self.indexer.scores(xi, qi, keys, cos, sin)
        else:
            with torch.no_grad():
                scores = self.indexer.scores(xi, qi, keys, cos, sin)
        chosen, index = self.indexer.select(scores, visible)
        return Selection(chosen, index, visible, scores if training else None, dense=self.dsa_stage == "dense")

    def _naive(self, q_nope, q_pe, latent, k_pe, mask: CacheMask | None, select: "Selection | None" = None):
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # [B, H, T|S, .]
        if select is not None and select.scores is not None:   # the indexer trains: explicit probabilities
            attend = select.attend
            logits = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
            p = logits.masked_fill(~attend[:, None], float("-inf")).softmax(-1)   # [B, H, T, S]
            self.indexer_loss = indexer_kl(select.scores, p, attend)
            return torch.matmul(p.to(v.dtype), v).transpose(1, 2)
        if select is None and mask is None:
            return causal_attention(q, k, v, self.softmax_scale).transpose(1, 2)
        attn_mask = select.attend[:, None] if select is not None else mask.visible[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.softmax_scale)  # [B, H, T, v]
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, kv, mask: CacheMask | None, select: "Selection | None" = None):
        B, T, H, dn = q_nope.shape
        S, c = kv.shape[1], self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, dn + self.v_head_dim, c)
        w_uk, w_uv = w[:, :dn], w[:, dn:]                                     # [H, nope, c], [H, v, c]
        q_lat = torch.bmm(q_nope.reshape(B * T, H, dn).transpose(0, 1), w_uk)  # [H, B*T, c]
        q = torch.cat([q_lat.transpose(0, 1).view(B, T, H, c), q_pe], dim=-1).view(B, T * H, -1)
        if mask is None:   # no cache: causal over the sequence itself
            mask = CacheMask(torch.arange(T, device=kv.device).expand(B, T), S)
        if select is not None and select.index is not None and T <= SPARSE_GATHER_MAX_QUERIES:
            kv, bias = select.gather(kv)            # decode: each query over its k selected slots only
            q = q.view(B * T, H, -1)
        elif select is not None:
            bias = select.bias(H)
        else:
            bias = mask.bias(H)                                               # [B, T*H, S] (or [B, 1, S])
        if q.dtype == torch.float32:
            scores = torch.baddbmm(bias, q, kv.transpose(1, 2), alpha=self.softmax_scale)
        else:   # scale and mask in fp32
            scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.softmax_scale + bias
        p = scores.softmax(dim=-1).to(kv.dtype)                               # [B, T*H, S] (gathered: [B*T, H, k])
        o_lat = torch.bmm(p, kv[..., :c])                                     # [B, T*H, c] (gathered: [B*T, H, c])
        out = torch.bmm(o_lat.view(B * T, H, c).transpose(0, 1), w_uv.transpose(1, 2))   # [H, B*T, v]
        return out.transpose(0, 1).view(B, T, H, self.v_head_dim)


class MHA(nn.Module):
    """Standard attention (GQA when num_key_value_heads < heads), RoPE on the last rope dims."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = c.qk_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        self.interleave = c.rope_interleave
        self.absorb = False  # no latent to absorb; kept for a uniform interface
        b = c.attention_bias
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.qk_head_dim, bias=b)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.qk_head_dim, bias=b)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.v_head_dim, bias=b)
        self.o_proj = Linear(self.n_heads * self.v_head_dim, c.hidden_size, bias=b)

    def _rope(self, t, cos, sin):
        nope, pe = t.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([nope, apply_rope(pe, cos, sin, self.interleave)], dim=-1)

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, rows=None,
                mask: CacheMask | None = None):
        B, T, _ = x.shape
        q = self._rope(self.q_proj(x).view(B, T, self.n_heads, self.qk_head_dim), cos, sin)
        k = self._rope(self.k_proj(x).view(B, T, self.n_kv, self.qk_head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.v_head_dim)
        if cache is not None:
            if mask is None:
                mask = CacheMask(positions, cache.check_positions(positions))
            cache.write(self.layer_idx, positions, k, v, rows)
            k, v = cache.read(self.layer_idx, mask.length, rows, batch=B)
            k, v = k.to(x.dtype), v.to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None and self.n_kv == self.n_heads:
            out = causal_attention(q, k, v, self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.visible[:, None],
                is_causal=mask is None, scale=self.softmax_scale, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))
