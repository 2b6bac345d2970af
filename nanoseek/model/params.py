"""Analytic sizes of a DeepSeek-V3-style model: parameter counts and KV-cache bytes.

Pure arithmetic on a :class:`ModelConfig`, no tensors, so it works for the 671B config in a
microsecond; tests check it against the instantiated module tensor by tensor on small configs
and against the meta-device model for the published configs (V3 and V3.2, the latter also
against transformers' ``DeepseekV32ForCausalLM``). ``nanoseek estimate`` builds on it.

DeepSeek-V3.2 (``index_n_heads > 0``) adds a lightning indexer to every MLA layer, MTP blocks
included (:mod:`.dsa`): ``wq_b`` [q_lora_rank -> H_I x D_I], ``wk`` [d -> D_I], ``k_norm`` (a
LayerNorm: weight and bias, D_I each) and ``weights_proj`` [d -> H_I]: 13,959,424 parameters per
layer for the published config, 851.5M in its 61 layers (671.88B in all, without MTP). Every
token runs it, so it is activated in full; it is its own component (``indexer``) in the
breakdowns.

KV cache (:func:`kv_cache_parts`): per token and layer, MLA caches its normalised latent
(``kv_lora_rank``) and the shared rope key (``qk_rope_head_dim``); a V3.2 layer also the rotated
indexer key (``index_head_dim``). How many bytes each value takes is a :class:`KVFormat`
(:data:`KV_FORMATS`): nanoseek's own :class:`~.cache.KVCache` stores every part in the model's
dtype (``fp32`` on CPU, ``bf16``); DeepSeek's V3.2 inference code keeps the latent and rope key
in bf16 and the indexer key in FP8 with one fp32 scale per 128 values (``bf16-fp8-index``), and
its FP8 sparse decode kernel (FlashMLA) stores the latent in FP8 too (``fp8-flashmla``).

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


def indexer_params(c: ModelConfig) -> int:
    """DeepSeek-V3.2's lightning indexer of one layer: wq_b, wk, k_norm (weight + bias),
    weights_proj; 0 for a model without one (``index_n_heads == 0``)."""
    if not c.index_n_heads:
        return 0
    h, dim, d = c.index_n_heads, c.index_head_dim, c.hidden_size
    return (c.q_lora_rank or 0) * h * dim + d * dim + 2 * dim + d * h


def expert_params(c: ModelConfig) -> int:
    """One routed expert: gate, up and down projections of a SwiGLU with moe_intermediate_size."""
    return 3 * c.hidden_size * c.moe_intermediate_size


def _layer(c: ModelConfig, moe: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) parameter counts of one decoder layer, by component."""
    d = c.hidden_size
    tot = {"attention": attention_params(c), "norms": 2 * d}
    if c.index_n_heads:
        tot["indexer"] = indexer_params(c)
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
    indexer for V3.2, norms, dense_mlp or router/shared_experts/routed_experts). Indices >=
    num_hidden_layers are MTP blocks. Used by ``nanoseek estimate`` for per-layer FLOPs and pipeline-stage memory."""
    return _layer(c, c.is_moe_layer(layer_idx))


def count_params(c: ModelConfig) -> ParamCount:
    d, v = c.hidden_size, c.vocab_size
    tot: dict[str, int] = {"embedding": v * d, "attention": 0, "indexer": 0, "dense_mlp": 0, "router": 0,
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


@dataclass(frozen=True)
class KVFormat:
    """How a KV cache stores each part of a token's entry: bytes per value, and the fp32 scales
    of the parts kept in one byte (one per ``scale_block`` values; 0: scales not counted)."""
    name: str
    latent: float           # MLA's latent c_KV; MHA/GQA keys and values
    rope: float             # MLA's shared rope key
    index: float            # V3.2's indexer key
    scale_block: int = 0
    about: str = ""

    def part_bytes(self, part: str, values: int) -> float:
        """Bytes of ``values`` values of ``part`` ("latent", "rope" or "index"), scales included."""
        per = getattr(self, part)
        scales = 4 * -(-values // self.scale_block) if (per == 1 and self.scale_block) else 0
        return values * per + scales


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("fp32", 4, 4, 4, about="nanoseek's KVCache in fp32 (the default on CPU): every part in fp32"),
    KVFormat("bf16", 2, 2, 2, about="nanoseek's KVCache in bf16: every part in bf16"),
    KVFormat("fp8", 1, 1, 1, about="every value in one byte, scales not counted (a lower bound)"),
    KVFormat("bf16-fp8-index", 2, 2, 1, scale_block=128,
             about="DeepSeek-V3.2-Exp's inference code: latent and rope key in bf16, the indexer key "
                   "in FP8 with one fp32 scale per 128 values"),
    KVFormat("fp8-flashmla", 1, 2, 1, scale_block=128,
             about="FlashMLA's FP8 sparse decode cache (latent in FP8 with one fp32 scale per 128 "
                   "values, rope key in bf16: 656 B per MLA entry) with DeepSeek's FP8 indexer key"),
)}


def get_kv_format(fmt: "str | KVFormat | int") -> KVFormat:
    """A :class:`KVFormat` by name (or a uniform number of bytes per value, as a plain dtype size)."""
    if isinstance(fmt, KVFormat):
        return fmt
    if isinstance(fmt, (int, float)) and not isinstance(fmt, bool):
        return KVFormat(f"{fmt:g} B", fmt, fmt, fmt, about=f"every value in {fmt:g} bytes")
    if fmt not in KV_FORMATS:
        raise ValueError(f"unknown KV-cache format '{fmt}'; choose from {', '.join(KV_FORMATS)}")
    return KV_FORMATS[fmt]


def kv_cache_parts(c: ModelConfig, fmt: "str | KVFormat | int" = "bf16",
                   absorbed: bool = True) -> dict[str, float]:
    """Bytes one token occupies in one layer's cache, by part.

    MLA absorbed: ``latent`` (kv_lora_rank) and ``rope_key`` (qk_rope_head_dim); MLA naive: per-head
    ``keys`` (qk_head_dim) and ``values`` (v_head_dim); MHA/GQA: num_key_value_heads keys and values.
    A V3.2 model adds the ``indexer_key`` (index_head_dim) in every case.
    """
    f = get_kv_format(fmt)
    if c.attention_type == "mha":
        kvh = c.num_key_value_heads
        parts = {"keys": f.part_bytes("latent", kvh * c.qk_head_dim),
                 "values": f.part_bytes("latent", kvh * c.v_head_dim)}
    elif absorbed:
        parts = {"latent": f.part_bytes("latent", c.kv_lora_rank),
                 "rope_key": f.part_bytes("rope", c.qk_rope_head_dim)}
    else:
        h = c.num_attention_heads
        parts = {"keys": f.part_bytes("latent", h * c.qk_head_dim),
                 "values": f.part_bytes("latent", h * c.v_head_dim)}
    if c.index_n_heads:
        parts["indexer_key"] = f.part_bytes("index", c.index_head_dim)
    return parts


def kv_cache_values_per_token(c: ModelConfig, absorbed: bool = True) -> int:
    """Cached values per token per layer.

    MLA absorbed: the normalised latent plus the shared rope key (kv_lora_rank + qk_rope_head_dim).
    MLA naive: per-head keys (qk_head_dim) and values (v_head_dim).
    MHA/GQA: num_key_value_heads keys and values.
    DeepSeek-V3.2 adds the indexer key (index_head_dim) to each.
    """
    return int(sum(kv_cache_parts(c, 1, absorbed).values()))


def cache_bytes(c: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 4, with_mtp: bool = True) -> int:
    """Lower bound of the bytes of an inference cache of ``batch`` rows x ``seq_len`` positions
    (the engine's: one latent per layer and position, MTP layers included with ``with_mtp``)."""
    layers = c.num_hidden_layers + (c.num_nextn_predict_layers if with_mtp else 0)
    per_layer = kv_cache_bytes_per_token(c, dtype_bytes, per_layer=True)
    return int(batch) * (int(seq_len) + 1) * per_layer * max(layers, 1)


def kv_cache_bytes_per_token(c: ModelConfig, dtype_bytes: "int | str | KVFormat" = 2, absorbed: bool = True,
                             per_layer: bool = False) -> float:
    """Bytes per token of the KV cache (all ``num_hidden_layers`` layers, or one with ``per_layer``).
    ``dtype_bytes``: a number of bytes for every value (nanoseek's cache: its dtype's size) or a
    :data:`KV_FORMATS` name."""
    n = sum(kv_cache_parts(c, dtype_bytes, absorbed).values())
    n = int(n) if float(n).is_integer() else n
    return n if per_layer else n * c.num_hidden_layers
