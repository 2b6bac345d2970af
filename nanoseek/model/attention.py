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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


def _cache_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, S] bool: key slot j is visible to the query at position p iff j <= p."""
    slots = torch.arange(length, device=positions.device)
    return slots[None, None, :] <= positions[:, :, None]


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
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)                    # [B, T, H, rope]

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                  # [B, T, kv_lora_rank]
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)                    # [B, T, rope]

        mask = None
        if cache is not None:
            cache.write(self.layer_idx, positions, latent, k_pe, rows)
            S = int(positions.max()) + 1
            latent, k_pe = cache.read(self.layer_idx, S, rows, batch=B)      # [B, S, ...]
            latent, k_pe = latent.to(x.dtype), k_pe.to(x.dtype)
            mask = _cache_mask(positions, S)                                  # [B, T, S]

        if self.absorb:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_head_dim))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None, scale=self.softmax_scale)                # [B, H, T, v]
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                 # [B, T, H, kv_lora_rank]
        scores = (torch.bmm(q_lat.reshape(B, T * H, -1), latent.transpose(1, 2))
                  + torch.bmm(q_pe.reshape(B, T * H, -1), k_pe.transpose(1, 2)))  # [B, T*H, S]
        scores = scores.view(B, T, H, S).float() * self.softmax_scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)[None]
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(latent.dtype)
        o_lat = torch.bmm(p.view(B, T * H, S), latent).view(B, T, H, -1)      # [B, T, H, kv_lora_rank]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)                   # [B, T, H, v]


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
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.qk_head_dim, bias=b)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.qk_head_dim, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.v_head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, c.hidden_size, bias=b)

    def _rope(self, t, cos, sin):
        nope, pe = t.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([nope, apply_rope(pe, cos, sin, self.interleave)], dim=-1)

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, rows=None):
        B, T, _ = x.shape
        q = self._rope(self.q_proj(x).view(B, T, self.n_heads, self.qk_head_dim), cos, sin)
        k = self._rope(self.k_proj(x).view(B, T, self.n_kv, self.qk_head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.v_head_dim)
        mask = None
        if cache is not None:
            cache.write(self.layer_idx, positions, k, v, rows)
            S = int(positions.max()) + 1
            k, v = cache.read(self.layer_idx, S, rows, batch=B)
            k, v = k.to(x.dtype), v.to(x.dtype)
            mask = _cache_mask(positions, S)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=self.softmax_scale, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))
