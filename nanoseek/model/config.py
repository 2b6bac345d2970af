"""Model configuration: HuggingFace DeepSeek-V3 ``config.json`` as a typed dataclass.

Every field keeps the exact name and meaning it has in HF's ``DeepseekV3Config`` (and in the
``config.json`` DeepSeek released), so a nanoseek checkpoint is a DeepSeek-V3 checkpoint and a
DeepSeek-V3 ``config.json`` loads here unchanged. Defaults are those of the published 671B model.

DeepSeek-V3.2 is this config with ``index_n_heads > 0`` (its lightning indexer: ``index_n_heads``,
``index_head_dim``, ``index_topk``, as in HF's ``DeepseekV32Config``); it is written as
``model_type: deepseek_v32`` and a ``deepseek_v32`` config.json loads with HF's defaults for them.
DeepSeek-V2's router (softmax scores, ``topk_method`` greedy or group_limited_greedy) is written as
``model_type: deepseek_v2``, the type transformers routes that way; a ``deepseek_v2`` config.json
without ``scoring_func`` (transformers' ``DeepseekV2Config`` has none) routes by softmax. Choices
transformers cannot express (``ModelConfig.transformers_differences``) are written all the same and
warned about when a model is saved.

Two nanoseek extensions exist for ablations, both off by default and written to ``config.json``
only when they differ from the default:

* ``attention_type``: ``"mla"`` (DeepSeek's multi-head latent attention) or ``"mha"``, standard
  attention with ``num_key_value_heads`` key/value heads (equal to the heads: multi-head attention;
  fewer: grouped-query attention). The q/k head dim is ``qk_nope_head_dim + qk_rope_head_dim``
  with RoPE on the last ``qk_rope_head_dim`` dims, the value head dim ``v_head_dim``.
* A dense model is ``n_routed_experts: 0`` or ``first_k_dense_replace == num_hidden_layers``.

Unknown keys and inconsistent values raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config_fields import (PRESET_DIR, SIZE_MAX, HFConfigFile, check_int_ranges, check_token_ids, check_type,
                            field_error, list_presets, preset_or_path)


# Keys that appear in released DeepSeek / HF config.json files but carry no architecture
# information nanoseek needs. They are accepted (and dropped) so every real config loads.
IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "ep_size", "pretraining_tp", "use_cache", "seq_aux", "aux_loss_alpha", "attention_dropout",
    "output_router_logits", "router_aux_loss_coef", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "rope_parameters",
    "mlp_layer_types", "sliding_window", "is_encoder_decoder", "tie_encoder_decoder", "layer_types",
}
# Keys of HF configs for options nanoseek does not implement: accepted only at the value that means "off"
OFF_KEYS = {"mlp_bias": False}

# Fields nanoseek accepts as null, written as the int they mean (transformers' strict configs refuse null)
NULL_AS_INT = {
    "n_routed_experts": lambda c: 0,
    "n_shared_experts": lambda c: 0,
    "n_group": lambda c: 1,
    "topk_group": lambda c: c.n_group or 1,
    "num_experts_per_tok": lambda c: 1 if c.n_routed_experts else 0,
}

# DeepSeek-V2's router, which HF's DeepseekV2Config has no fields for (softmax scores) or defaults
# other than V3's: what a deepseek_v2 config.json that leaves them out means
V2_DEFAULTS = {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
               "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0}
# HF's DeepseekV32Config defaults for the indexer (a deepseek_v32 config.json may leave them out)
V32_INDEXER_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
# Fields HF's DeepseekV32Config does not have: a V3.2 model must hold them at these values
V32_FIXED = {"rope_interleave": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
             "attention_type": "mla"}

# Keys transformers derives and writes back; accepted when consistent with the fields they derive from.
DERIVED_KEYS = {
    "qk_head_dim": lambda c: c.qk_nope_head_dim + c.qk_rope_head_dim,
    "head_dim": lambda c: c.qk_rope_head_dim,  # HF's DeepseekV3Config sets head_dim = qk_rope_head_dim
}

# Ranges of the float fields: name -> (low, high or None, low excluded).
FLOAT_RANGES = {
    "routed_scaling_factor": (0.0, None, True),
    "rope_theta": (0.0, None, True),
    "rms_norm_eps": (0.0, 1.0, True),
    "initializer_range": (0.0, None, False),
}
# Counts the model builds one module (or one Python loop step) per: far above any real model
# (DeepSeek-V3: 61 layers, 256 experts, 128 heads), low enough that a typo cannot hang validation.
COUNT_MAX = {"num_hidden_layers": 4096, "num_nextn_predict_layers": 64, "n_routed_experts": 65536,
             "n_shared_experts": 65536, "num_attention_heads": 65536, "num_key_value_heads": 65536,
             "n_group": 65536, "topk_group": 65536, "num_experts_per_tok": 65536, "moe_layer_freq": 4096,
             "first_k_dense_replace": 4096, "index_n_heads": 65536}

ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "rope_theta",
}


@dataclass
class ModelConfig(HFConfigFile):
    # to_dict() keys derived from the fields (the V3 / V3.2 type, the layer layout): dropped before
    # a field override is applied, so they follow it (rebase; nanoseek.model.registry.with_fields)
    DERIVED_KEYS = ("model_type", "architectures", "mlp_layer_types")
    # --- sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU layers
    moe_intermediate_size: int = 2048       # each routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128          # only used by attention_type="mha" (GQA when smaller)
    # --- MLA
    q_lora_rank: int | None = 1536          # None: one full-rank query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # --- DeepSeek Sparse Attention (V3.2's lightning indexer; 0 heads: none, a DeepSeek-V3 model)
    index_n_heads: int = 0                  # 64 in DeepSeek-V3.2
    index_head_dim: int = 128
    index_topk: int = 2048                  # keys each query attends to
    # --- DeepSeekMoE
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"           # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"           # "noaux_tc" (V3), "group_limited_greedy" or "greedy" (V2)
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # --- MTP
    num_nextn_predict_layers: int = 1
    # --- positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # YaRN: {"type": "yarn", "factor", ...}
    rope_interleave: bool = True
    # --- misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006        # the V3 report's init std (HF's default is 0.02)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = None
    quantization_config: dict | None = None
    # --- nanoseek extension (ablations)
    attention_type: str = "mla"

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from layer ``first_k_dense_replace`` on, every ``moe_layer_freq``."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 when YaRN extends the context (V3 reference code)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and _rope_type(rs) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            factor = rs["factor"]
            if mscale_all_dim:
                m = yarn_get_mscale(factor, mscale_all_dim)
                scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        def bad(name: str, why: str) -> ConfigError:
            return field_error(self, name, why)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
            if getattr(self, name) > SIZE_MAX:
                raise bad(name, f"must be <= {SIZE_MAX:,}")
        check_int_ranges(self, COUNT_MAX)
        for name, (lo, hi, lo_open) in FLOAT_RANGES.items():
            v = getattr(self, name)
            if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
                raise bad(name, f"must be a finite number {'>' if lo_open else '>='} {lo}"
                                + (f" and <= {hi}" if hi is not None else ""))
        check_token_ids(self)
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.qk_nope_head_dim < 0:
            raise bad("qk_nope_head_dim", "must be >= 0")
        if self.attention_type not in ("mla", "mha"):
            raise bad("attention_type", "must be 'mla' or 'mha'")
        if self.attention_type == "mla":
            if self.kv_lora_rank <= 0:
                raise bad("kv_lora_rank", "must be positive for MLA")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise bad("q_lora_rank", "must be positive or null")
        else:
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                raise bad("num_key_value_heads", "must divide num_attention_heads")
        if self.index_n_heads:
            for name, value in V32_FIXED.items():
                if getattr(self, name) != value:
                    raise bad(name, f"a DeepSeek-V3.2 model (index_n_heads > 0) has {name} = {value!r}")
            if self.q_lora_rank is None:
                raise bad("q_lora_rank", "DeepSeek-V3.2's indexer reads MLA's query latent: needs a q_lora_rank")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise bad("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its RoPE part)")
            if self.index_topk < 1:
                raise bad("index_topk", "must be >= 1")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.moe_layer_freq < 1:
            raise bad("moe_layer_freq", "must be >= 1")
        if self.num_moe_layers < self.num_hidden_layers and self.intermediate_size <= 0:
            raise bad("intermediate_size", "must be positive when there are dense layers")
        if self.n_routed_experts:
            e = self.n_routed_experts
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive")
            k = self.num_experts_per_tok or 0
            if not 1 <= k <= e:
                raise bad("num_experts_per_tok", f"must be in [1, n_routed_experts={e}]")
            g = self.n_group or 1
            if e % g:
                raise bad("n_group", f"must divide n_routed_experts={e}")
            tg = self.topk_group or g
            if not 1 <= tg <= g:
                raise bad("topk_group", f"must be in [1, n_group={g}]")
            if self.topk_method == "noaux_tc" and g > 1 and e // g < 2:
                raise bad("n_group", "noaux_tc scores each group by its top-2 experts: needs >= 2 experts per group")
            if k > tg * (e // g):
                raise bad("num_experts_per_tok", f"exceeds the experts in topk_group={tg} groups ({tg * (e // g)})")
            if self.scoring_func not in ("sigmoid", "softmax"):
                raise bad("scoring_func", "must be 'sigmoid' (V3) or 'softmax' (V2)")
            if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
                raise bad("topk_method", "must be 'noaux_tc', 'group_limited_greedy' or 'greedy'")
            if (self.n_shared_experts or 0) < 0:
                raise bad("n_shared_experts", "must be >= 0")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is implemented")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                raise bad("rope_scaling", "must be a table/object or null")
            unknown = set(rs) - ROPE_SCALING_KEYS
            if unknown:
                raise ConfigError(f"config field 'rope_scaling' has unknown key(s) {sorted(unknown)}; "
                                  f"valid: {sorted(ROPE_SCALING_KEYS)}")
            kind = _rope_type(rs)
            if kind not in ("yarn", "default", None):
                raise bad("rope_scaling", f"type '{kind}' is not supported (only 'yarn')")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"config field 'rope_scaling' needs '{key}' for YaRN")
                for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                            "mscale_all_dim"):
                    v = rs.get(key, 1)
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                        raise ConfigError(f"config field 'rope_scaling.{key}' must be a finite number >= 0, got {v!r}")
                if rs["factor"] < 1:
                    raise ConfigError("config field 'rope_scaling.factor' must be >= 1")
        if self.tie_word_embeddings and self.num_nextn_predict_layers:
            pass  # allowed: MTP shares the (tied) embedding and head
        return self

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a config.json-style dict; unknown keys and wrong types name the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object / TOML table, got {type(d).__name__}")
        if d.get("model_type") == "deepseek_v4":   # another family (nanoseek.model.registry reads every one)
            raise ConfigError(f"{source}: model_type 'deepseek_v4' (DeepSeek-V4) is not supported here: this reads "
                              "DeepSeek-V2/V3/V3.2 configs only")
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in names:
                kwargs[key] = check_type(key, value, names[key], source)
            elif key in IGNORED_KEYS or key in DERIVED_KEYS:
                continue
            elif key in OFF_KEYS:
                if value != OFF_KEYS[key]:
                    raise ConfigError(f"{source}: field '{key}' = {value!r} is not supported (only {OFF_KEYS[key]!r})")
            else:
                raise ConfigError(
                    f"{source}: unknown field '{key}'. Valid fields: {', '.join(sorted(names))}")
        # transformers >= 5 may write rope settings as rope_parameters {rope_type, rope_theta, ...}
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp and "rope_theta" not in d:
                kwargs["rope_theta"] = float(rp["rope_theta"])
            if rp.get("rope_type", "default") != "default" and "rope_scaling" not in d:
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if d.get("model_type") == "deepseek_v32":
            for key, value in V32_INDEXER_DEFAULTS.items():
                kwargs.setdefault(key, value)
            if not kwargs["index_n_heads"]:
                raise ConfigError(f"{source}: field 'index_n_heads' = {kwargs['index_n_heads']!r}: a deepseek_v32 model "
                                  "has a lightning indexer (> 0 heads); one without is model_type deepseek_v3")
        # more leading dense layers than layers (transformers' and DeepSeek's code accept it): all dense
        fk, layers = kwargs.get("first_k_dense_replace"), kwargs.get("num_hidden_layers", 61)
        if isinstance(fk, int) and isinstance(layers, int) and 0 <= layers < fk <= COUNT_MAX["first_k_dense_replace"]:
            kwargs["first_k_dense_replace"] = layers
        # DeepSeek-V2 configs predate MTP (no num_nextn_predict_layers means none, not V3's one) and
        # route by softmax, which transformers' DeepseekV2Config does not write (it has no scoring_func)
        if d.get("model_type") == "deepseek_v2":
            for key, value in V2_DEFAULTS.items():
                kwargs.setdefault(key, value)
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass arity errors
            raise ConfigError(f"{source}: {e}") from None
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        layer_types = d.get("mlp_layer_types")
        if layer_types is not None:
            want = ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]
            if layer_types != want:
                raise ConfigError(f"{source}: field 'mlp_layer_types' = {layer_types!r} is not the layout "
                                  f"first_k_dense_replace / moe_layer_freq give ({want}); nanoseek builds "
                                  "MoE layers from those two fields")
        for key, derive in DERIVED_KEYS.items():
            if key in d and d[key] is not None and d[key] != derive(cfg):
                raise ConfigError(f"{source}: field '{key}' = {d[key]!r} is inconsistent with the fields it "
                                  f"derives from (expected {derive(cfg)})")
        return cfg

    @classmethod
    def rebase(cls, base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """``base`` (a :meth:`to_dict`) ready to take the override ``fields``: the derived keys
        the fields do not set are dropped, so they are derived again from the new fields."""
        return {k: v for k, v in base.items() if k not in cls.DERIVED_KEYS or k in fields}

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json content (with model_type/architectures so transformers loads it)."""
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        if d["attention_type"] == "mla":
            d.pop("attention_type")
        for name, none_means in NULL_AS_INT.items():   # transformers' configs take ints here, not null
            if d[name] is None:
                d[name] = none_means(self)
        if not d["n_routed_experts"]:   # dense: transformers builds MoE layers from first_k_dense_replace on
            d["first_k_dense_replace"] = self.num_hidden_layers
        if self.index_n_heads:   # DeepSeek-V3.2: HF's DeepseekV32Config has no fields for the fixed choices
            for name in V32_FIXED:
                d.pop(name, None)
            d["mlp_layer_types"] = ["sparse" if self.is_moe_layer(i) else "dense"
                                    for i in range(self.num_hidden_layers)]
            return {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", **d}
        for name in V32_INDEXER_DEFAULTS:
            d.pop(name)
        if self.v2_router:
            return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **d}
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **d}

    @property
    def v2_router(self) -> bool:
        """DeepSeek-V2's routing (softmax scores, greedy or group-limited top-k, no bias): written as
        model_type deepseek_v2, which transformers routes that way (its DeepseekV3 always routes V3's way)."""
        return self.scoring_func == "softmax" and self.topk_method != "noaux_tc"

    def transformers_differences(self) -> list[str]:
        """What transformers' model for this config's model_type would compute differently from
        nanoseek on the same weights (nothing for DeepSeek's own V2, V3 and V3.2 choices); saving such
        a model warns, since transformers loads its checkpoint without a word."""
        out = []
        if self.attention_type != "mla":
            out.append(f"attention_type {self.attention_type!r} (transformers' DeepSeek models have MLA only)")
        if self.n_routed_experts and self.moe_layer_freq != 1 and self.num_moe_layers:
            out.append(f"moe_layer_freq {self.moe_layer_freq} (transformers makes every layer from "
                       "first_k_dense_replace on a MoE layer)")
        if self.n_routed_experts and self.v2_router:
            if self.norm_topk_prob:
                out.append("norm_topk_prob true with DeepSeek-V2's router (transformers' DeepseekV2 never "
                           "normalises the top-k weights)")
            if not self.rope_interleave:
                out.append("rope_interleave false (transformers' DeepseekV2 rotates interleaved pairs)")
        elif self.n_routed_experts and (self.scoring_func, self.topk_method) != ("sigmoid", "noaux_tc"):
            out.append(f"scoring_func {self.scoring_func!r} with topk_method {self.topk_method!r} (transformers' "
                       "DeepseekV3 routes by sigmoid scores with noaux_tc, its DeepseekV2 by softmax with greedy "
                       "or group_limited_greedy)")
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


def _rope_type(rs: dict) -> str | None:
    return rs.get("type", rs.get("rope_type"))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- presets
def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (``nanoseek/configs/models/NAME.json``), a config.json, or a checkpoint dir."""
    return ModelConfig.from_json(preset_or_path(name_or_path))


# PRESET_DIR and list_presets: the presets of every family (their home: nanoseek.model.config_fields)
__all__ = ["ModelConfig", "load_model_config", "yarn_get_mscale", "PRESET_DIR", "list_presets", "IGNORED_KEYS",
           "DERIVED_KEYS", "SIZE_MAX", "COUNT_MAX"]
