"""Activation bytes per token a decoder layer keeps for its backward, by tensor kind, per
recomputation mode, precision recipe and kernel set: the one model of saved activations.

``nanoseek estimate``'s training memory (:mod:`.memory`), ``--layouts`` (:mod:`.search`) and the
training loop's up-front fit check (``nanoseek.train.config.check_training_memory``) all read
:func:`activation_breakdown`; ``tests/test_recompute.py`` holds its ``kernels="eager"`` figures
equal, to the byte, to what torch's saved-tensor hooks find alive after a forward of nanoseek's
own model (``nanoseek.train.recompute.held_activation_bytes``) in every mode on several configs.

* **Modes** (:data:`RECOMPUTE_MODES`, ``[train] recompute`` and ``--recompute``): ``none`` keeps
  everything autograd saves; ``selective`` is nanoseek's policy (``train/recompute.py``):
  DeepSeek-V3's recomputation of every RMSNorm and the MLA up-projections (``q_b_proj``,
  ``kv_b_proj``), and with them the cheap elementwise work (SwiGLU's product, the router's top-k,
  residual adds), keeping the projections' and attention's outputs; ``full`` keeps each layer's
  input only.
* **Kernels** (:data:`KERNELS`): ``fused`` is what the estimate assumes of a DeepSeek-scale run
  (fused RMSNorm and SwiGLU kernels; under expert parallelism the experts' input arrives by
  all-to-all and is kept, as DeepSeek's recipe caches it, not re-dispatched in the backward);
  ``eager`` is nanoseek's own modules as measured (each RMSNorm also keeps its normalised input,
  SwiGLU its activated gate, ``kv_b_proj``'s whole output stays alive as v's storage, the MoE
  keeps its weighted expert outputs and sort indices, and selective re-derives the experts' input
  from the recomputed RMSNorm and keeps every matmul output, the dense MLP's and the shared
  experts' ``down_proj`` outputs included).
* **Precision**: values in the activation dtype (``act_bytes``), softmax statistics, RMSNorm's
  1/rms and router tensors in fp32, routing indices int64. ``fp8=True`` is the V3 report's
  low-precision storage (section 3.3.2, ``fused`` only): inputs of FP8 Linear layers cached in
  FP8 with a scale per 1x128 tile (:data:`FP8_BYTES`): RMSNorm outputs, the attention output
  (o_proj's input; E5M6 in the report, one byte here), the experts' input and SwiGLU's two inputs,
  its product recomputed. The routing weight is then taken to multiply the SwiGLU output before
  ``down_proj`` (equal by linearity; how fused MoE kernels apply it), so the experts' outputs are
  not kept (``moe_combine`` 0; the report does not say: an assumption, see docs/distributed.md).
* **Families**: MLA (V2 / V3; V3.2's lightning indexer counted from its shapes, not measured) and
  MHA / GQA layers (``fused`` only); DeepSeek-V4 has no per-tensor breakdown here: a config with
  an ``activation_elements`` method gives its layer input (``hc_mult`` streams) and the rest, for
  ``none`` and ``full``.

Attention is a fused kernel (flash / memory-efficient SDPA: output and log-sum-exp kept, no T x T
scores; the CPU takes one when MLA's key and value head sizes are equal). ``flash=False`` keeps
eager attention's probabilities, heads x ``seq_len`` per token (not measured). Each layer counts
its own input (the residual stream the previous layer handed on).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from .flops import DEFAULT_SEQ_LEN, EstimateError


@dataclass(frozen=True)
class TensorKind:
    """One kind of tensor a layer leaves for its backward pass."""
    name: str
    label: str          # the memory report's row
    about: str


TENSOR_KINDS: dict[str, TensorKind] = {k.name: k for k in (
    TensorKind("layer_input", "layer inputs", "the layer's input (residual stream); all that full keeps"),
    TensorKind("residual", "residual after attention", "the residual after attention (selective: o_proj's "
               "output, the residual being rebuilt from it)"),
    TensorKind("norm_outputs", "RMSNorm outputs", "RMSNorm outputs (input_layernorm, q_a_layernorm, "
               "kv_a_layernorm, post_attention_layernorm; eager also the normalised input) and fp32 1/rms"),
    TensorKind("qkv_latents", "MLA q / kv latents", "MLA latents: q_a_proj's output (q_lora_rank), "
               "kv_a_proj's (kv_lora_rank + the rope key)"),
    TensorKind("qkv_up", "MLA per-head q, k, v", "MLA per-head q, k (rope joined), v (eager: kv_b_proj's whole "
               "output); under selective only the q of a model without a query LoRA (q_proj is no up-projection)"),
    TensorKind("qkv_proj", "q, k, v projections", "MHA / GQA q, k, v projections"),
    TensorKind("indexer", "indexer q, k, weights", "DeepSeek-V3.2 lightning indexer: q, k, head weights"),
    TensorKind("attention_probs", "attention probabilities", "softmax probabilities, heads x keys per query "
               "(eager attention only)"),
    TensorKind("attention_stats", "softmax statistics (fp32)", "fp32 softmax log-sum-exp per head (fused attention)"),
    TensorKind("attention_output", "attention output", "attention output per head, o_proj's input"),
    TensorKind("router", "router (fp32)", "fp32 router scores over all routed experts (none: and the top-k "
               "weights, their sum and int64 ids)"),
    TensorKind("moe_dispatch", "tokens dispatched to experts", "one copy of the token per routed expert "
               "(the experts' input)"),
    TensorKind("expert_intermediates", "SwiGLU intermediates (experts)", "SwiGLU gate, up (and, kept, their "
               "product; eager also the activated gate), per routed expert and for the shared experts"),
    TensorKind("moe_combine", "expert outputs (combine)", "each routed expert's output, for the routing "
               "weights' gradient (eager: and the weighted output, the weights and indices)"),
    TensorKind("mlp_intermediates", "SwiGLU intermediates (dense MLP)", "dense MLP gate, up (and product)"),
    TensorKind("mlp_output", "MLP down_proj outputs", "the dense MLP's / shared experts' down_proj output, "
               "kept by torch's selective policy as a matmul output (eager selective)"),
    TensorKind("layer_rest", "rest of each layer", "everything else of a family with no per-tensor breakdown "
               "(DeepSeek-V4)"),
)}

RECOMPUTE_MODES: dict[str, str] = {
    "none": "keep every activation the backward needs",
    "selective": "DeepSeek-V3's: recompute every RMSNorm and the MLA up-projections (q_b_proj's q, "
                 "kv_b_proj's k and v), with the cheap elementwise ops, in the backward; keep the "
                 "projections' and attention's outputs",
    "full": "keep each layer's input only; recompute the whole layer in the backward",
}
MODES = tuple(RECOMPUTE_MODES)      # [train] recompute's values (train/recompute.py's POLICIES)

KERNELS: dict[str, str] = {
    "fused": "fused RMSNorm / SwiGLU / attention kernels, expert input kept (the estimate's)",
    "eager": "nanoseek's own modules as torch's saved-tensor hooks measure them",
}

FP8_BYTES = 1 + 4 / 128        # an FP8 value plus its share of one fp32 scale per 1x128 tile
F32, IDX = 4, 8                # fp32 statistics / router tensors; int64 routing indices


def get_recompute(mode: str | bool) -> str:
    """A recompute mode by name (True / False: ``full`` / ``none``, the old boolean)."""
    if mode is True or mode is False:
        return "full" if mode else "none"
    if mode not in RECOMPUTE_MODES:
        raise EstimateError(f"unknown --recompute '{mode}'; choose from {', '.join(RECOMPUTE_MODES)}")
    return mode


def _v4_breakdown(cfg, layer_idx: int, act_bytes: float, mode: str, kernels: str) -> dict[str, float]:
    if kernels == "eager":
        raise EstimateError("activation count: DeepSeek-V4 layers are not modelled for nanoseek's eager "
                            "modules (no recomputation there either)")
    if mode == "selective":
        raise EstimateError("--recompute selective needs a per-tensor activation breakdown, which the "
                            "estimate has for DeepSeek-V2 / V3 / V3.2 only; use none or full for DeepSeek-V4")
    if getattr(cfg, "activation_elements", None) is None:
        raise EstimateError(f"activation count: a {type(cfg).__name__} has no activation count; load it with "
                            "V4Estimand.from_json (nanoseek.estimate.family)")
    inp = cfg.hc_mult * cfg.hidden_size
    if mode == "full":
        return {"layer_input": inp * act_bytes}
    e, fp32 = cfg.activation_elements(layer_idx)
    return {"layer_input": inp * act_bytes, "layer_rest": (e - inp) * act_bytes + fp32 * F32}


def activation_breakdown(cfg, layer_idx: int, act_bytes: float = 2.0, *, mode: str = "none",
                         kernels: str = "fused", fp8: bool = False, flash: bool = True,
                         seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, float]:
    """Bytes one token keeps for the backward in decoder layer ``layer_idx`` under recompute
    ``mode``, by :data:`TENSOR_KINDS` name (kinds the layer lacks or the mode drops are absent);
    see the module's docstring for ``kernels``, ``fp8`` and ``flash``."""
    mode = get_recompute(mode)
    if kernels not in KERNELS:
        raise EstimateError(f"activation count: unknown kernels '{kernels}'; choose from {', '.join(KERNELS)}")
    if not isinstance(cfg, ModelConfig):      # DeepSeek-V4 (estimate.family's V4Estimand counts it)
        return _v4_breakdown(cfg, layer_idx, act_bytes, mode, kernels)
    eager, sel, b = kernels == "eager", mode == "selective", act_bytes
    mla = cfg.attention_type == "mla"
    if eager and not mla:
        raise EstimateError(f"activation count: attention_type {cfg.attention_type!r} is not modelled for "
                            "nanoseek's eager modules (MLA only)")
    if eager and fp8:
        raise EstimateError("activation count: nanoseek's eager modules keep no FP8 activations (its FP8 is "
                            "simulated); fp8 goes with kernels='fused'")
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if mode == "full":
        return {"layer_input": d * b}
    low = FP8_BYTES if fp8 else b                               # an FP8 Linear's cached input
    out: dict[str, float] = {"layer_input": d * b, "residual": d * b}
    qr = (cfg.q_lora_rank or 0) if mla else 0
    if not sel:                 # RMSNorm: output (eager: and normalised input), 1/rms
        widths = [d, d] + ([qr] if qr else []) + ([cfg.kv_lora_rank] if mla else [])
        out["norm_outputs"] = sum(widths) * (2 * b if eager else low) + len(widths) * F32
    if mla:
        out["qkv_latents"] = (qr + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
        if not sel:
            v_store = cfg.qk_nope_head_dim + cfg.v_head_dim if eager else cfg.v_head_dim
            out["qkv_up"] = (2 * h * cfg.qk_head_dim + h * v_store) * b
        elif not qr:
            out["qkv_up"] = h * cfg.qk_head_dim * b              # q_proj's output: not an up-projection
        if cfg.index_n_heads:
            out["indexer"] = (cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_head_dim
                              + cfg.index_n_heads) * b
    else:
        out["qkv_proj"] = (h * cfg.qk_head_dim + cfg.num_key_value_heads * (cfg.qk_head_dim + cfg.v_head_dim)) * b
    if flash:
        out["attention_stats"] = h * F32
    else:
        out["attention_probs"] = h * seq_len * b
    out["attention_output"] = h * cfg.v_head_dim * low
    # SwiGLU bytes per intermediate channel: gate and up; unless recomputed, their product; eager
    # also keeps the activated gate
    swiglu = 2 * low if (sel or fp8) else (4 if eager else 3) * b
    if cfg.is_moe_layer(layer_idx):
        k, mi, ns = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_shared_experts or 0
        out["router"] = cfg.n_routed_experts * F32 + (0 if sel else (1 + k) * F32 + k * IDX)
        if not (eager and sel):
            out["moe_dispatch"] = k * d * low
        out["expert_intermediates"] = (k + ns) * mi * swiglu
        out["moe_combine"] = 0.0 if fp8 else k * d * b + (k * (d * b + F32 + 2 * IDX) if eager and not sel else 0)
        if eager and sel and ns:
            out["mlp_output"] = d * b
    else:
        out["mlp_intermediates"] = cfg.intermediate_size * swiglu
        if eager and sel:
            out["mlp_output"] = d * b
    return out


def activation_bytes_per_token(cfg, layer_idx: int, act_bytes: float = 2.0, mode: str = "none", **kw) -> float:
    """The sum of :func:`activation_breakdown` (same keywords): bytes one token keeps for the
    backward in one layer under recompute ``mode``."""
    return sum(activation_breakdown(cfg, layer_idx, act_bytes, mode=mode, **kw).values())


def recomputed_kinds(cfg, layers, mode: str, **kw) -> list[str]:
    """The kinds ``mode`` keeps less of than ``none`` in any of ``layers``, in :data:`TENSOR_KINDS` order."""
    less = set()
    for i in layers:
        full, kept = activation_breakdown(cfg, i, mode="none", **kw), activation_breakdown(cfg, i, mode=mode, **kw)
        less |= {k for k, v in full.items() if kept.get(k, 0) < v}
    return [k for k in TENSOR_KINDS if k in less and k != "layer_input"]


__all__ = ["TensorKind", "TENSOR_KINDS", "RECOMPUTE_MODES", "MODES", "KERNELS", "FP8_BYTES", "get_recompute",
           "activation_breakdown", "activation_bytes_per_token", "recomputed_kinds"]
