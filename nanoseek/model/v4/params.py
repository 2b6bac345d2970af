"""Analytic parameter counts of a DeepSeek-V4 model (pure arithmetic on a ``DeepseekV4Config``).

Counted as transformers' ``DeepseekV4ForCausalLM`` holds them: parameters only (the router's
``e_score_correction_bias`` and the hash table ``tid2eid`` are buffers), MTP modules apart
(transformers builds none; the published totals exclude them, as for V3). *Activated* per token
is everything a token's forward touches except the routed experts it is not sent to, the input
embedding included (nanoseek's V3 convention). Tests pin these against the instantiated module
and against transformers' meta-device model for the published V4-Flash and V4-Pro configs.
"""

from __future__ import annotations

from ..params import ParamCount
from .config import CSA, HCA, DeepseekV4Config


def attention_params(c: DeepseekV4Config, kind: str) -> dict[str, int]:
    d, H, D, q = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    out = {"attention": d * q + q + q * H * D + d * D + D + c.o_lora_rank * H * D + c.o_groups * c.o_lora_rank * d + H}
    if kind == HCA:
        m = c.compress_rates[HCA]
        out["compressor"] = 2 * d * D + m * D + D
    elif kind == CSA:
        m, Di, Hi = c.compress_rates[CSA], c.index_head_dim, c.index_n_heads
        out["compressor"] = 4 * d * D + 2 * m * D + D
        out["indexer"] = 4 * d * Di + 2 * m * Di + Di + q * Hi * Di + d * Hi
    return out


def hyper_params(c: DeepseekV4Config) -> int:
    """Both mHC modules of a layer: fn, base, scale each."""
    n = c.hc_mult
    return 2 * ((2 + n) * n * n * c.hidden_size + (2 + n) * n + 3)


def layer_params(c: DeepseekV4Config, layer_idx: int) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) parameters of decoder layer ``layer_idx`` by component (MTP blocks: >= L)."""
    d, E, I = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    tot = attention_params(c, c.layer_type(layer_idx))
    tot["norms"] = 2 * d
    tot["hyper_connections"] = hyper_params(c)
    tot["router"] = E * d
    tot["shared_experts"] = 3 * d * I + (2 * I + d if c.mlp_bias else 0)
    tot["routed_experts"] = E * 3 * d * I
    act = dict(tot)
    act["routed_experts"] = c.num_experts_per_tok * 3 * d * I
    return tot, act


def count_params(c: DeepseekV4Config) -> ParamCount:
    d, v, n = c.hidden_size, c.vocab_size, c.hc_mult
    tot: dict[str, int] = {"embedding": v * d, "lm_head": 0 if c.tie_word_embeddings else v * d,
                           "norms": d, "hyper_connections": n * n * d + n + 1}
    act = dict(tot)
    for i in range(c.num_hidden_layers):
        lt, la = layer_params(c, i)
        for k, x in lt.items():
            tot[k] = tot.get(k, 0) + x
        for k, x in la.items():
            act[k] = act.get(k, 0) + x
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        lt, _ = layer_params(c, c.num_hidden_layers + k)
        mtp += 2 * d * d + 3 * d + (n * n * d + n + 1) + sum(lt.values())   # e/h_proj, 3 norms, hc_head, block
    return ParamCount(total=sum(tot.values()), active=sum(act.values()), breakdown=tot, active_breakdown=act, mtp=mtp)


def kv_cache_values(c: DeepseekV4Config, context: int) -> dict[str, int]:
    """Values a sequence of ``context`` tokens keeps cached, summed over the main layers by kind:
    every layer its window ring (min(context, sliding_window) keys of head_dim), HCA layers
    context // m' entries of head_dim, CSA layers context // m entries of head_dim plus as many
    indexer keys of index_head_dim (the rings of not-yet-complete windows, < 2m tokens, are left out).
    Multiply by the bytes per value for bytes; divide by ``context`` for the per-token figure."""
    out = {"sliding_attention": 0, CSA: 0, HCA: 0}
    for i in range(c.num_hidden_layers):
        kind = c.layer_types[i]
        n = min(context, c.sliding_window) * c.head_dim
        if kind == HCA:
            n += context // c.compress_rates[HCA] * c.head_dim
        elif kind == CSA:
            n += context // c.compress_rates[CSA] * (c.head_dim + c.index_head_dim)
        out[kind] += n
    return out


def cache_bytes(c: DeepseekV4Config, batch: int, seq_len: int, dtype_bytes: int = 4, with_mtp: bool = True) -> int:
    """Lower bound of the bytes of an inference cache of ``batch`` rows x ``seq_len`` positions:
    :func:`kv_cache_values` of the main layers, plus each MTP layer's sliding window with ``with_mtp``."""
    ctx = int(seq_len) + 1
    values = sum(kv_cache_values(c, ctx).values())
    if with_mtp:
        values += c.num_nextn_predict_layers * min(ctx, c.sliding_window) * c.head_dim
    return int(batch) * values * dtype_bytes


__all__ = ["count_params", "layer_params", "attention_params", "hyper_params", "kv_cache_values", "cache_bytes"]
