"""The model families ``nanoseek estimate`` prices: one entry per family of the model registry
(:mod:`nanoseek.model.registry`, which maps a config.json ``model_type`` to its family).

Every section of the estimate (training FLOPs, memory, decode, the per-context table) asks this
module for a config's parameter counts (:func:`count_params`, :func:`layer_params`) and never
branches on a family; the attention of each layer comes from the layer-kind registry in
:mod:`.attention`, which a config names through its ``attention_layer_kinds``.

* ``deepseek_v2`` / ``deepseek_v3`` / ``deepseek_v32``: :class:`~nanoseek.model.config.ModelConfig`
  and :mod:`nanoseek.model.params`; a partial config that DeepSeek-V3's defaults would silently
  complete into another model is refused (:func:`v3_missing_fields`).
* ``deepseek_v4``: :class:`V4Estimand`, the V4 model's own typed config
  (:class:`~nanoseek.model.v4.config.DeepseekV4Config`) plus the few derived attributes the
  estimate reads from every config, with :mod:`nanoseek.model.v4.params`' counts. Its layers are
  of the kinds ``sliding``, ``csa`` and ``hca`` (one per entry of ``layer_types``); every V4 layer
  is MoE (hash-routed or learned); its ``hyper_connections`` (mHC, ``hc_mult`` streams) add the
  parameter-free mixing FLOPs of :meth:`V4Estimand.mixing_flops_per_token`.

The counters are the model family's own (its ``params_path`` module: ``count_params``,
``layer_params``). A new family is one :class:`Family` entry: the model registry's family, the
config class the estimate reads and the fields it must not default.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..model import registry
from ..model.config import IGNORED_KEYS, ModelConfig
from ..model.params import ParamCount
from ..model.v4.config import CSA, HCA, DeepseekV4Config

# V4's layer_types -> the layer kinds of nanoseek.estimate.attention.LAYER_KINDS
V4_KINDS = {"sliding_attention": "sliding", CSA: "csa", HCA: "hca"}


class V4Estimand(DeepseekV4Config):
    """A DeepSeek-V4 config as the estimate reads it: the V4 config with every field unchanged,
    plus what the estimate asks of every config (MoE layer schedule, routing groups, layer kinds)."""

    attention_type = "v4-hybrid"       # neither "mla" nor "mha": no MHA / GQA / MQA comparison rows
    n_group = None                     # V4 routes without expert groups
    topk_group = None
    topk_method = "noaux_tc"

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return True

    @property
    def attention_layer_kinds(self) -> list[str]:
        return [V4_KINDS[t] for t in self.layer_types]

    def attention_kind_of(self, layer_idx: int) -> str:
        """The kind of layer ``layer_idx``; V4's MTP blocks are sliding-window layers."""
        return V4_KINDS[self.layer_type(layer_idx)]

    def mixing_flops_per_token(self, layer_idx: int | None = None) -> float:
        """Forward FLOPs of the parameter-free hyper-connection work per token, in one layer (or
        all decoder layers and the final head when ``layer_idx`` is None). Each layer has two mHC
        modules (before attention and before the MoE); each collapses the n streams with ``pre``
        (2 n d), mixes them with the n x n ``comb`` (2 n^2 d) and adds ``post`` times the block
        output (2 n d). Their projection ``fn`` is a parameter (counted as 2 x parameters); the
        RMSNorm, sigmoids and the Sinkhorn iterations (O(n^2) per token, not O(d)) are not counted."""
        n, d = self.hc_mult, self.hidden_size
        per_layer = 2 * (2 * n * d + 2 * n * n * d + 2 * n * d)
        if layer_idx is not None:
            return float(per_layer)
        return float(per_layer * self.num_hidden_layers + 2 * n * d)        # + the head's collapse

    def activation_elements(self, layer_idx: int) -> tuple[float, float]:
        """(values in the activation dtype, fp32 values) one token leaves for the backward pass in
        one layer, roughly (no recomputation, flash attention): the n streams at both mHC modules,
        the norms, the query path, the shared K=V, the compressor's and indexer's projections, the
        attention output and its grouped low-rank projection, the MoE inputs and SwiGLU
        intermediates; fp32: softmax statistics, the mHC mixes and the router scores."""
        d, n, H, D = self.hidden_size, self.hc_mult, self.num_attention_heads, self.head_dim
        e = 2 * (n * d + d)                                         # streams in, collapsed (x2 modules)
        e += 2 * d + 2 * self.q_lora_rank + H * D + 2 * D           # norm, q_a / q_norm, q, kv
        kind = self.layer_type(layer_idx)
        if kind == HCA:
            e += 2 * D                                              # compressor kv, gate
        elif kind == CSA:
            Di, Hi = self.index_head_dim, self.index_n_heads
            e += 4 * D + 4 * Di + Hi * Di + Hi                      # compressor, indexer kv/gate, q, weights
        e += H * D + self.o_groups * self.o_lora_rank               # attention out, o_a out
        mi, k = self.moe_intermediate_size, self.num_experts_per_tok
        e += 2 * d + k * (d + 3 * mi) + 3 * mi                      # norm, routed and shared experts
        fp32 = H + 2 * (2 + n) * n + self.n_routed_experts
        return float(e), float(fp32)


# Fields whose DeepSeek-V3 defaults would silently turn a partial config into a different model.
_ALWAYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
_MLA = ("kv_lora_rank", "q_lora_rank")
_MHA = ("num_key_value_heads",)
_MOE = ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace")


def v3_missing_fields(d: Any) -> list[str]:
    """The size fields a DeepSeek-V2/V3/V3.2 config.json leaves to V3's defaults (checked only when
    every key is one the parser knows: an unknown key is the parser's error, naming the key)."""
    if not isinstance(d, dict) or set(d) - set(ModelConfig.field_names()) - IGNORED_KEYS:
        return []
    need = list(_ALWAYS) + list(_MHA if d.get("attention_type", "mla") == "mha" else _MLA)
    if d.get("n_routed_experts"):
        need += _MOE
    first_dense = d.get("first_k_dense_replace", 0)
    if not d.get("n_routed_experts") or not isinstance(first_dense, int) or first_dense > 0:
        need.append("intermediate_size")
    return [k for k in need if k not in d]


@dataclass(frozen=True)
class Family:
    name: str
    model_family: registry.Family         # the model's family: model types, parameter counters
    config_class: type                    # what the estimate reads a config.json as
    missing_fields: Callable[[Any], list[str]] = lambda d: []   # size fields a config must not leave out

    @property
    def params(self):
        """The model family's analytic counters (``count_params``, ``layer_params``)."""
        return importlib.import_module(self.model_family.params_path)


_V3 = Family("DeepSeek-V2 / V3 / V3.2", registry.V3, ModelConfig, v3_missing_fields)
_V4 = Family("DeepSeek-V4", registry.V4, V4Estimand)

FAMILIES: tuple[Family, ...] = (_V3, _V4)


def family_for_type(model_type: Any) -> Family:
    """The family reading a config.json of ``model_type`` (the model registry decides; V3 reads
    configs without one)."""
    model_family = registry.family_for_type(model_type)
    return next(f for f in FAMILIES if f.model_family is model_family)


def family_for_dict(d: Any, source: str) -> Family:
    """The family reading a config.json dict (the model registry decides, by model_type, else
    architectures; an unknown model_type is one ConfigError line)."""
    model_family = registry.family_of_dict(d, source) if isinstance(d, dict) else registry.DEFAULT
    return next(f for f in FAMILIES if f.model_family is model_family)


def family_of(cfg: Any) -> Family:
    """The family of a loaded config (by its class)."""
    for fam in FAMILIES:
        if isinstance(cfg, fam.config_class):
            return fam
    raise TypeError(f"nanoseek estimate has no model family for a {type(cfg).__name__}; "
                    f"known: {', '.join(f.name for f in FAMILIES)}")


def count_params(cfg: Any) -> ParamCount:
    return family_of(cfg).params.count_params(cfg)


def layer_params(cfg: Any, layer_idx: int) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) parameters of decoder layer ``layer_idx`` by component (>= layers: MTP)."""
    return family_of(cfg).params.layer_params(cfg, layer_idx)


def mixing_flops(cfg: Any, layer_idx: int | None = None) -> float:
    """Parameter-free residual-stream mixing FLOPs per token (mHC's; 0 for plain residuals)."""
    own = getattr(cfg, "mixing_flops_per_token", None)
    return own(layer_idx) if own is not None else 0.0
