"""DeepSeek-V4 configuration: HF's ``DeepseekV4Config`` (transformers 5.24) as a typed dataclass.

Every field keeps the name, default and meaning it has in transformers, so a nanoseek V4
``config.json`` is one transformers loads and the other way round. Defaults are transformers'
(the V4-Flash sizes). :meth:`DeepseekV4Config.from_dict` resolves the schedule fields exactly as
transformers' ``__post_init__`` does and writes them out resolved:

* ``layer_types`` (one per layer, ``sliding_attention`` / ``compressed_sparse_attention`` /
  ``heavily_compressed_attention``): explicit, else from the legacy per-layer ``compress_ratios``
  (0 / 4 / 128, DeepSeek's own config.json; the list may have an extra entry for the MTP layer),
  else 2 HCA layers then CSA / HCA alternating;
* ``mlp_layer_types`` (``hash_moe`` / ``moe``): explicit, else the first ``num_hash_layers``
  (legacy key, default 3) hash-routed;
* ``compress_rates`` ``{"compressed_sparse_attention": m, "heavily_compressed_attention": m'}``
  (legacy ``compress_rate_csa`` / ``compress_rate_hca`` fold in);
* ``partial_rotary_factor`` (legacy ``qk_rope_head_dim / head_dim``), giving
  ``qk_rope_head_dim = int(head_dim * partial_rotary_factor)``;
* ``rope_parameters`` ``{"main": {...}, "compress": {...}}``: the main RoPE (base ``rope_theta``)
  of sliding-window layers and the compressed-branch RoPE (base ``compress_rope_theta``, with any
  YaRN settings given flat in ``rope_parameters`` / ``rope_scaling``; YaRN there gets
  ``attention_factor`` 1 unless given, as in DeepSeek's reference).

Fields transformers carries but never reads keep their transformers meaning, i.e. none:
``num_key_value_heads`` (V4 attention always has ONE shared key/value head), ``n_shared_experts``
(always one shared expert of width ``moe_intermediate_size``), ``norm_topk_prob`` (routing weights
are always normalised), ``attention_bias``. Unknown keys and bad values raise one
:class:`~nanoseek.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..config_fields import (HFConfigFile, check_int_ranges, check_token_ids, check_type, field_error,
                             preset_or_path)

MODEL_TYPE = "deepseek_v4"
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: CSA, 128: HCA}
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}
DEFAULT_NUM_HASH_LAYERS = 3
DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}

# Keys of released / transformers-written config.json files that carry nothing nanoseek needs.
IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "attention_dropout", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "use_return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "intermediate_size", "num_local_experts", "expert_dtype", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "add_cross_attention", "cross_attention_hidden_size",
    # DeepSeek's config.json: V3 routing keys that V4's learned layers fix (noaux_tc, no groups, no dense layers)
    "topk_method", "n_group", "topk_group", "first_k_dense_replace", "scale_fmt",
}
# Legacy (DeepSeek reference / older transformers) keys folded into the modern fields.
LEGACY_KEYS = {"compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
               "rope_scaling"}
COUNT_MAX = {"num_hidden_layers": 4096, "num_nextn_predict_layers": 64, "n_routed_experts": 65536,
             "num_attention_heads": 65536, "num_experts_per_tok": 65536, "hc_mult": 64, "hc_sinkhorn_iters": 10000,
             "o_groups": 65536, "index_n_heads": 65536}


@dataclass
class DeepseekV4Config(HFConfigFile):
    # --- sizes
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048          # each routed expert and the shared expert
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1               # carried, never read: one shared K=V head
    head_dim: int = 512
    q_lora_rank: int = 1024
    # --- MoE
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1                  # carried, never read: one shared expert
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True                # carried, never read: weights always normalised
    routed_scaling_factor: float = 1.5
    mlp_layer_types: list | None = None
    swiglu_limit: float = 10.0
    # --- positions
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    partial_rotary_factor: float | None = None
    rope_parameters: dict | None = None
    # --- hybrid attention
    layer_types: list | None = None
    compress_rates: dict | None = None
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # --- manifold-constrained hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MTP
    num_nextn_predict_layers: int = 1
    # --- misc
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False               # carried, never read
    mlp_bias: bool = False                     # biases of the shared expert
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = None
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        self.resolve()

    # ------------------------------------------------------------------ derived
    @property
    def model_type(self) -> str:
        return MODEL_TYPE

    @property
    def qk_rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def intermediate_size(self) -> int:
        """transformers' alias: the shared expert's width."""
        return self.moe_intermediate_size

    def compress_rate(self, layer_idx: int) -> int:
        """The layer's compression rate m (0 for sliding-window layers)."""
        t = self.layer_types[layer_idx]
        return 0 if t == "sliding_attention" else self.compress_rates[t]

    def layer_type(self, layer_idx: int) -> str:
        """Attention kind of layer ``layer_idx``; MTP blocks (index >= num_hidden_layers) are sliding-window."""
        return self.layer_types[layer_idx] if layer_idx < self.num_hidden_layers else "sliding_attention"

    def is_hash_layer(self, layer_idx: int) -> bool:
        return layer_idx < self.num_hidden_layers and self.mlp_layer_types[layer_idx] == "hash_moe"

    # ------------------------------------------------------------------ resolution (transformers' __post_init__)
    def resolve(self, legacy: dict[str, Any] | None = None) -> "DeepseekV4Config":
        legacy = legacy or {}
        n = self.num_hidden_layers if isinstance(self.num_hidden_layers, int) else 0
        if self.compress_rates is None:
            self.compress_rates = dict(DEFAULT_COMPRESS_RATES)
        else:
            self.compress_rates = dict(self.compress_rates)
        if legacy.get("compress_rate_csa") is not None:
            self.compress_rates[CSA] = legacy["compress_rate_csa"]
        if legacy.get("compress_rate_hca") is not None:
            self.compress_rates[HCA] = legacy["compress_rate_hca"]
        if self.layer_types is None and legacy.get("compress_ratios") is not None:
            ratios = legacy["compress_ratios"]
            if not isinstance(ratios, list) or any(r not in _RATIO_TO_LAYER_TYPE for r in ratios):
                raise ConfigError(f"config field 'compress_ratios' = {ratios!r}: must be a list of 0, 4 or 128")
            self.layer_types = [_RATIO_TO_LAYER_TYPE[r] for r in ratios][:n]
        if self.layer_types is None:
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        else:
            self.layer_types = list(self.layer_types)[:n] if n else list(self.layer_types)   # as transformers cuts
        if self.mlp_layer_types is None:
            k = legacy.get("num_hash_layers")
            k = DEFAULT_NUM_HASH_LAYERS if k is None else k
            self.mlp_layer_types = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
        else:
            self.mlp_layer_types = list(self.mlp_layer_types)[:n] if n else list(self.mlp_layer_types)
        if self.partial_rotary_factor is None:
            rd = legacy.get("qk_rope_head_dim")
            self.partial_rotary_factor = rd / self.head_dim if rd is not None else DEFAULT_PARTIAL_ROTARY_FACTOR
        rp = copy.deepcopy(self.rope_parameters or legacy.get("rope_scaling") or {})
        if not isinstance(rp, dict):
            raise ConfigError(f"config field 'rope_parameters' = {rp!r}: must be an object")
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            rp = {"main": rp["main"], "compress": rp["compress"]}
        else:
            yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            if "type" in yarn and "rope_type" not in yarn:
                yarn["rope_type"] = yarn.pop("type")
            yarn.pop("type", None)
            main = {"rope_type": "default", "rope_theta": self.rope_theta,
                    "partial_rotary_factor": self.partial_rotary_factor}
            compress = {**yarn, "rope_theta": self.compress_rope_theta,
                        "partial_rotary_factor": self.partial_rotary_factor}
            compress.setdefault("rope_type", "default")
            if compress["rope_type"] == "yarn":
                compress.setdefault("attention_factor", 1.0)
            rp = {"main": main, "compress": compress}
        for sub in rp.values():
            if "type" in sub and "rope_type" not in sub:
                sub["rope_type"] = sub.pop("type")
            sub.setdefault("rope_type", "default")
        self.rope_parameters = rp
        return self

    # ------------------------------------------------------------------ validation
    def validate(self) -> "DeepseekV4Config":
        def bad(name: str, why: str) -> ConfigError:
            return field_error(self, name, why)

        check_int_ranges(self, COUNT_MAX)
        for name in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "max_position_embeddings",
                     "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
                     "hc_mult"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name, lo_open in (("routed_scaling_factor", True), ("rope_theta", True), ("compress_rope_theta", True),
                              ("rms_norm_eps", True), ("hc_eps", False), ("initializer_range", False),
                              ("swiglu_limit", True)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (v <= 0 if lo_open else v < 0):
                raise bad(name, f"must be a finite number {'>' if lo_open else '>='} 0")
        if not isinstance(self.partial_rotary_factor, (int, float)) or not 0 < self.partial_rotary_factor <= 1:
            raise bad("partial_rotary_factor", "must be in (0, 1]")
        r = self.qk_rope_head_dim
        if r < 2 or r % 2:
            raise bad("partial_rotary_factor", f"gives a RoPE dim int(head_dim * factor) = {r}: must be even and >= 2")
        if self.index_head_dim < r:
            raise bad("index_head_dim", f"must be >= the RoPE dim {r} (the indexer rotates its last {r} dims)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads * head_dim = {self.num_attention_heads * self.head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be <= n_routed_experts = {self.n_routed_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"must be one of {', '.join(SCORING_FUNCS)}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is implemented")
        for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
            types = getattr(self, name)
            if len(types) != self.num_hidden_layers:
                raise bad(name, f"needs one entry per layer (num_hidden_layers = {self.num_hidden_layers}), "
                                f"got {len(types)}")
            wrong = sorted({str(t) for t in types if t not in allowed})
            if wrong:
                raise bad(name, f"entries must be one of {', '.join(allowed)}; got {', '.join(wrong)}")
        if set(self.compress_rates) != {CSA, HCA}:
            raise bad("compress_rates", f"must have exactly the keys {CSA!r} and {HCA!r}")
        for k, v in self.compress_rates.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65536:
                raise bad("compress_rates", f"rate of {k!r} must be an integer in [1, 65536]")
        for label in ("main", "compress"):
            sub = self.rope_parameters.get(label)
            if not isinstance(sub, dict):
                raise bad("rope_parameters", f"needs a '{label}' object")
            unknown = set(sub) - ROPE_KEYS
            if unknown:
                raise bad("rope_parameters", f"'{label}' has unknown key(s) {sorted(unknown)}")
            kind = sub.get("rope_type")
            if kind not in ("default", "yarn"):
                raise bad("rope_parameters", f"'{label}' rope_type {kind!r} is not supported (default or yarn)")
            for key in ("rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                        "mscale", "mscale_all_dim", "attention_factor"):
                v = sub.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                      or v < 0):
                    raise bad("rope_parameters", f"'{label}.{key}' must be a finite number >= 0")
            if not sub.get("rope_theta"):
                raise bad("rope_parameters", f"'{label}' needs a positive rope_theta")
            if sub.get("partial_rotary_factor", self.partial_rotary_factor) != self.partial_rotary_factor:
                raise bad("rope_parameters", f"'{label}.partial_rotary_factor' differs from partial_rotary_factor")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if not sub.get(key):
                        raise bad("rope_parameters", f"'{label}' YaRN needs a positive '{key}'")
        check_token_ids(self)
        return self

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "DeepseekV4Config":
        """Build from a config.json-style dict; unknown keys and wrong types name the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") in ("deepseek_v3", "deepseek_v32", "deepseek_v2"):   # V3's (a fine-tune's own type: registry)
            raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        legacy: dict[str, Any] = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = check_type(key, value, fields[key], source)
            elif key in LEGACY_KEYS:
                legacy[key] = value
            elif key not in IGNORED_KEYS:
                raise ConfigError(f"{source}: unknown field '{key}'. Valid fields: {', '.join(sorted(fields))}")
        try:
            cfg = cls.__new__(cls)
            for name, f in fields.items():
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                setattr(cfg, name, kwargs.get(name, copy.deepcopy(default)))
            cfg.resolve(legacy)
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    # fields whose value the resolved rope_parameters repeat: (field, rope_parameters branches, key)
    ROPE_FIELDS = (("rope_theta", ("main",), "rope_theta"), ("compress_rope_theta", ("compress",), "rope_theta"),
                   ("partial_rotary_factor", ("main", "compress"), "partial_rotary_factor"))

    @classmethod
    def rebase(cls, base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """``base`` (a :meth:`to_dict`) ready to take the override ``fields``: what the resolution
        derived from a field follows it: the RoPE bases and rotary fraction inside
        ``rope_parameters`` (its YaRN settings kept), and the layer schedules when there are more
        layers than they list (fewer: they are cut, as transformers cuts them)."""
        base = copy.deepcopy(base)
        rp = base.get("rope_parameters")
        if "rope_parameters" not in fields and isinstance(rp, dict):
            for name, branches, key in cls.ROPE_FIELDS:
                if name in fields:
                    for b in branches:
                        if isinstance(rp.get(b), dict):
                            rp[b][key] = fields[name]
        n = fields.get("num_hidden_layers")
        if isinstance(n, int):
            for key in ("layer_types", "mlp_layer_types"):
                if key not in fields and isinstance(base.get(key), list) and len(base[key]) < n:
                    base.pop(key)
        return base

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json content (with model_type/architectures so transformers loads it)."""
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return {"architectures": ["DeepseekV4ForCausalLM"], "model_type": MODEL_TYPE, **d}

    def replace(self, **changes: Any) -> "DeepseekV4Config":
        d = {**self.rebase(self.to_dict(), changes), **changes}
        if "num_hidden_layers" in changes:   # schedules re-derive unless given
            for key in ("layer_types", "mlp_layer_types"):
                if key not in changes:
                    d.pop(key)
        return type(self).from_dict(d)


# ---------------------------------------------------------------------- presets
def is_v4_config(d: Any) -> bool:
    """Whether a config.json-style dict describes a DeepSeek-V4 model (its model_type)."""
    return isinstance(d, dict) and d.get("model_type") == MODEL_TYPE


def load_v4_config(name_or_path: str | Path) -> DeepseekV4Config:
    """A preset name (``nanoseek/configs/models/NAME.json``), a config.json, or a checkpoint dir."""
    return DeepseekV4Config.from_json(preset_or_path(name_or_path))


__all__ = ["DeepseekV4Config", "load_v4_config", "is_v4_config", "LAYER_TYPES", "MLP_LAYER_TYPES", "CSA", "HCA"]
