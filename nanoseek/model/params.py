"""Analytic sizes of a DeepSeek-V3-style model: parameter counts and KV-cache bytes.

Pure arithmetic on a :class:`ModelConfig`, no tensors, so it works for the 671B config in a
microsecond; tests check it against the instantiated module tensor by tensor on small configs
and against the meta-device model for the published config. ``nanoseek estimate`` builds on it.

What counts as *activated* per token: every parameter the token's forward pass touches except
the routed experts it was not sent to. The embedding table counts in full (as the published
"37B activated" does: 37.55B with the input embedding, 36.63B without), as do the router weights
and the ``e_score_correction_bias``. MTP modules are counted separately (``mtp``) and are not part
of ``total`` / ``active``, matching the 671B figure, which excludes the 14B of MTP weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig


@dataclass
class ParamCount:
    total: int                          # without MTP
    active: int                         # per token, without MTP
    breakdown: dict[str, int] = field(default_factory=dict)          # total by component
    active_breakdown: dict[str, int] = field(default_factory=dict)   # activated by component
    mtp: int = 0                        # unique MTP parameters (embedding and head are shared)

    @property
    def active_without_embedding(self) -> int:
        return self.active - self.breakdown.get("embedding", 0)


def attention_params(c: ModelConfig) -> int:
    d, h = c.hidden_size, c.num_attention_heads
    b = int(c.attention_bias)
    if c.attention_type == "mha":
        kvh = c.num_key_value_heads
        return (d * h * c.qk_head_dim + d * kvh * c.qk_head_dim + d * kvh * c.v_head_dim
                + (h * c.v_head_dim) * d + b * (h * c.qk_head_dim + kvh * (c.qk_head_dim + c.v_head_dim) + d))
    if c.q_lora_rank:
        q = d * c.q_lora_rank + b * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    else:
        q = d * h * c.qk_head_dim
    kv_a = d * (c.kv_lora_rank + c.qk_rope_head_dim) + b * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv_norm = c.kv_lora_rank
    kv_b = c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    o = h * c.v_head_dim * d + b * d
    return q + kv_a + kv_norm + kv_b + o


def expert_params(c: ModelConfig) -> int:
    """One routed expert: gate, up and down projections of a SwiGLU with moe_intermediate_size."""
    return 3 * c.hidden_size * c.moe_intermediate_size


def _layer(c: ModelConfig, moe: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) parameter counts of one decoder layer, by component."""
    d = c.hidden_size
    tot = {"attention": attention_params(c), "norms": 2 * d}
    if not moe:
        tot["dense_mlp"] = 3 * d * c.intermediate_size
        return tot, dict(tot)
    e = c.n_routed_experts
    tot["router"] = e * d + (e if c.topk_method == "noaux_tc" else 0)
    tot["shared_experts"] = 3 * d * c.moe_intermediate_size * (c.n_shared_experts or 0)
    tot["routed_experts"] = e * expert_params(c)
    act = dict(tot)
    act["routed_experts"] = c.num_experts_per_tok * expert_params(c)
    return tot, act


def layer_params(c: ModelConfig, layer_idx: int) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) parameters of decoder layer ``layer_idx`` by component (attention,
    norms, dense_mlp or router/shared_experts/routed_experts). Indices >= num_hidden_layers are
    MTP blocks. Used by ``nanoseek estimate`` for per-layer FLOPs and pipeline-stage memory."""
    return _layer(c, c.is_moe_layer(layer_idx))


def count_params(c: ModelConfig) -> ParamCount:
    d, v = c.hidden_size, c.vocab_size
    tot: dict[str, int] = {"embedding": v * d, "attention": 0, "dense_mlp": 0, "router": 0,
                           "shared_experts": 0, "routed_experts": 0, "norms": d,
                           "lm_head": 0 if c.tie_word_embeddings else v * d}
    act = dict(tot)
    for i in range(c.num_hidden_layers):
        lt, la = _layer(c, c.is_moe_layer(i))
        for k, n in lt.items():
            tot[k] += n
        for k, n in la.items():
            act[k] += n
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        lt, _ = _layer(c, c.is_moe_layer(c.num_hidden_layers + k))
        # enorm + hnorm + eh_proj + block + shared_head.norm (embedding and head shared)
        mtp += 2 * d + 2 * d * d + sum(lt.values()) + d
    return ParamCount(total=sum(tot.values()), active=sum(act.values()), breakdown=tot,
                      active_breakdown=act, mtp=mtp)


def kv_cache_values_per_token(c: ModelConfig, absorbed: bool = True) -> int:
    """Cached values per token per layer.

    MLA absorbed: the normalised latent plus the shared rope key (kv_lora_rank + qk_rope_head_dim).
    MLA naive: per-head keys (qk_head_dim) and values (v_head_dim).
    MHA/GQA: num_key_value_heads keys and values.
    """
    if c.attention_type == "mha":
        return c.num_key_value_heads * (c.qk_head_dim + c.v_head_dim)
    if absorbed:
        return c.kv_lora_rank + c.qk_rope_head_dim
    return c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)


def kv_cache_bytes_per_token(c: ModelConfig, dtype_bytes: int = 2, absorbed: bool = True,
                             per_layer: bool = False) -> int:
    n = kv_cache_values_per_token(c, absorbed) * dtype_bytes
    return n if per_layer else n * c.num_hidden_layers
