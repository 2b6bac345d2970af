"""The arithmetic behind ``nanoseek estimate``: parameters, training FLOPs, GPU-hours and cost.

Pure functions on a :class:`ModelConfig` and a :class:`GPUSpec` returning dataclasses; the CLI
only formats them, and ``--json`` prints exactly ``Estimate.to_dict()``. Memory per GPU for a
parallel layout lives in :mod:`.memory`, inference (KV cache, decode, the attention cost at each
context length) in :mod:`.inference`, expert-parallel all-to-all in :mod:`.comm`; :func:`estimate`
runs them all, and sets other configs' attention costs beside the model's (:class:`Comparison`).
Model FLOPs per token (what is counted, and what is not) and the shared :class:`EstimateError`
live one floor down in :mod:`.flops`, which the sections import; this module imports the sections.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..model.config import ModelConfig
from .family import count_params
from .comm import comm_estimate
from .flops import DEFAULT_SEQ_LEN, EstimateError, mtp_active_params, training_flops_breakdown
from .gpus import GPUSpec
from .inference import ContextCost, context_costs, decode_estimate
from .memory import Layout, estimate_for_layout

DEFAULT_MFU = 0.4
DEFAULT_PRICE = 2.0             # $/GPU-hour, the rental price the V3 report assumes
DEFAULT_CONTEXTS = (4096, 131072, 1048576)      # 4K, 128K, 1M: the lengths DeepSeek's claims use


# ---------------------------------------------------------------------- units
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | float | int, what: str = "value") -> float:
    """'14.8T' -> 1.48e13, '180K' -> 1.8e5, '2.664M', '1e12', '1,000' (K, M, B/G, T suffixes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip().replace(",", "").replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)", s)
    if not m:
        raise EstimateError(f"cannot read {what} '{text}': expected a number with an optional "
                            f"K, M, B or T suffix, e.g. 14.8T or 180K")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


_BINARY = {"": 1, "k": 1024, "m": 1024 ** 2}


def parse_contexts(text: str | list, what: str = "context lengths") -> list[int]:
    """'4K,128K,1M' -> [4096, 131072, 1048576]: context lengths count in powers of two (K = 1,024,
    M = 1,048,576); plain integers too. Sorted, without repeats."""
    items = text if isinstance(text, list) else str(text).split(",")
    out = set()
    for item in items:
        s = str(item).strip().replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmM]?)", s)
        n = float(m.group(1)) * _BINARY[m.group(2).lower()] if m else 0
        if not m or n < 1 or n != int(n) or n > 2**40:
            raise EstimateError(f"cannot read {what} '{text}': expected comma-separated token counts "
                                f">= 1 with an optional K (1,024) or M (1,048,576) suffix, e.g. 4K,128K,1M")
        out.add(int(n))
    return sorted(out)


# ---------------------------------------------------------------------- parameters
@dataclass
class ParamReport:
    total: int                          # without MTP (the published 671B)
    active: int                         # per token, counting the input embedding (37.55B)
    active_without_embedding: int       # 36.63B
    mtp: int                            # unique MTP parameters (embedding and head are shared)
    total_with_mtp: int
    breakdown: dict[str, int] = field(default_factory=dict)
    active_breakdown: dict[str, int] = field(default_factory=dict)


def param_report(cfg: ModelConfig) -> ParamReport:
    pc = count_params(cfg)
    bd, ab = dict(pc.breakdown), dict(pc.active_breakdown)
    bd["mtp"] = ab["mtp"] = 0
    if cfg.num_nextn_predict_layers:
        bd["mtp"] = pc.mtp
        ab["mtp"] = mtp_active_params(cfg)
    return ParamReport(total=pc.total, active=pc.active,
                       active_without_embedding=pc.active_without_embedding, mtp=pc.mtp,
                       total_with_mtp=pc.total + pc.mtp, breakdown=bd, active_breakdown=ab)


# ---------------------------------------------------------------------- training cost
@dataclass
class TrainingCost:
    tokens: float
    seq_len: int
    include_mtp: bool
    flops_per_token: float
    flops_breakdown: dict[str, float]
    total_flops: float
    gpu: str
    gpus: int
    peak_bf16_tflops: float
    peak_fp8_tflops: float | None
    mfu: float                          # against the dense BF16 peak
    mfu_source: str                     # "given", "implied by gpu_hours" or "default"
    mfu_vs_fp8_peak: float | None       # the same achieved FLOP/s against the FP8 peak
    achieved_tflops_per_gpu: float
    gpu_hours: float
    gpu_hours_per_trillion_tokens: float
    days: float
    price_per_gpu_hour: float
    cost_usd: float


def training_cost(cfg: ModelConfig, tokens: float, gpu: GPUSpec, gpus: int, *,
                  seq_len: int = DEFAULT_SEQ_LEN, mfu: float | None = None,
                  gpu_hours: float | None = None, price: float = DEFAULT_PRICE,
                  include_mtp: bool = True) -> TrainingCost:
    """GPU-hours, days and dollars for ``tokens`` at an MFU, or the MFU a GPU-hour figure implies."""
    if tokens <= 0:
        raise EstimateError(f"tokens must be positive, got {tokens}")
    if gpus < 1:
        raise EstimateError(f"the GPU count must be >= 1, got {gpus}")
    if mfu is not None and gpu_hours is not None:
        raise EstimateError("give either an MFU (to compute GPU-hours) or GPU-hours (to solve for "
                            "the MFU they imply), not both")
    if mfu is not None and not 0 < mfu <= 1:
        raise EstimateError(f"MFU must be in (0, 1], got {mfu}")
    if gpu_hours is not None and gpu_hours <= 0:
        raise EstimateError(f"GPU-hours must be positive, got {gpu_hours}")
    if price < 0:
        raise EstimateError(f"price must be >= 0, got {price}")
    breakdown = training_flops_breakdown(cfg, seq_len, include_mtp)
    fpt = sum(breakdown.values())
    total = fpt * tokens
    peak = gpu.bf16_flops
    if gpu_hours is not None:
        source = "implied by gpu_hours"
        mfu = total / (gpu_hours * 3600.0 * peak)
    else:
        source = "given" if mfu is not None else "default"
        mfu = DEFAULT_MFU if mfu is None else mfu
        gpu_hours = total / (mfu * peak) / 3600.0
    achieved = mfu * peak
    return TrainingCost(
        tokens=tokens, seq_len=seq_len, include_mtp=include_mtp, flops_per_token=fpt,
        flops_breakdown=breakdown, total_flops=total, gpu=gpu.name, gpus=gpus,
        peak_bf16_tflops=gpu.bf16_tflops, peak_fp8_tflops=gpu.fp8_tflops, mfu=mfu,
        mfu_source=source,
        mfu_vs_fp8_peak=None if gpu.fp8_flops is None else achieved / gpu.fp8_flops,
        achieved_tflops_per_gpu=achieved / 1e12, gpu_hours=gpu_hours,
        gpu_hours_per_trillion_tokens=gpu_hours / (tokens / 1e12), days=gpu_hours / gpus / 24.0,
        price_per_gpu_hour=price, cost_usd=gpu_hours * price)


# ---------------------------------------------------------------------- attention at each context
@dataclass
class Comparison:
    """Another config's attention costs at the same contexts, on the same serving setup, and this
    model's figures divided by its (``*_ratio``, one per context; None where one does not fit)."""
    model: str
    contexts: list[ContextCost]
    attention_flops_ratio: list[float]
    core_and_indexer_flops_ratio: list[float]
    model_flops_ratio: list[float]
    kv_bytes_ratio: list[float]
    kv_read_ratio: list[float]
    usd_ratio: list[float | None]


def compare(mine: list[ContextCost], theirs: list[ContextCost], model: str) -> Comparison:
    def ratio(f):
        return [f(a) / f(b) if f(b) else float("inf") for a, b in zip(mine, theirs)]
    usd = [a.usd_per_million_tokens / b.usd_per_million_tokens
           if a.usd_per_million_tokens and b.usd_per_million_tokens else None for a, b in zip(mine, theirs)]
    return Comparison(model=model, contexts=theirs,
                      attention_flops_ratio=ratio(lambda r: r.attention_flops),
                      core_and_indexer_flops_ratio=ratio(
                          lambda r: r.core_flops + r.indexer_flops + r.compressor_flops),
                      model_flops_ratio=ratio(lambda r: r.model_flops),
                      kv_bytes_ratio=ratio(lambda r: r.kv_bytes_per_token),
                      kv_read_ratio=ratio(lambda r: r.kv_read_bytes_per_step), usd_ratio=usd)


# ---------------------------------------------------------------------- everything
@dataclass
class Estimate:
    model: str
    config: dict[str, Any]
    gpu: dict[str, Any]
    params: ParamReport
    training: TrainingCost
    memory: Any                 # memory.LayoutMemory
    inference: Any              # inference.InferenceEstimate
    communication: Any          # comm.CommEstimate, or None for a dense model
    contexts: list[ContextCost] = field(default_factory=list)
    compared: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_tokens(cfg: ModelConfig) -> float:
    """20 tokens per activated parameter (Chinchilla-style), rounded to 2 significant digits."""
    n = 20.0 * count_params(cfg).active
    return float(f"{n:.2g}")


def estimate(cfg: ModelConfig, gpu: GPUSpec, *, model_name: str = "model",
             tokens: float | None = None, seq_len: int = DEFAULT_SEQ_LEN,
             mfu: float | None = None, gpu_hours: float | None = None,
             price: float = DEFAULT_PRICE, include_mtp: bool = True,
             layout: Any = None, precision: str = "bf16",
             context: int | None = None, batch: int = 64, serve_gpus: int | None = None,
             kv_format: str | int = "bf16", infer_weight_bytes: float | None = None,
             gqa_groups: int | None = None, contexts: list[int] | None = None,
             compare_with: dict[str, ModelConfig] | None = None) -> Estimate:
    """All sections of ``nanoseek estimate`` for one config, GPU and layout; the attention cost at
    each of ``contexts`` (default 4K, 128K, 1M), and that of each config in ``compare_with``
    (name -> config) beside it, on the same serving GPUs."""
    layout = layout or Layout()
    layout.validate(cfg)
    tokens = default_tokens(cfg) if tokens is None else tokens
    train = training_cost(cfg, tokens, gpu, layout.gpus, seq_len=seq_len, mfu=mfu,
                          gpu_hours=gpu_hours, price=price, include_mtp=include_mtp)
    mem = estimate_for_layout(cfg, layout, precision, seq_len=seq_len, gpu=gpu,
                              include_mtp=include_mtp)
    if context is None:
        context = min(cfg.max_position_embeddings, 131072)
    inf = decode_estimate(cfg, gpu, context=context, batch=batch, price=price,
                          serve_gpus=serve_gpus, kv_format=kv_format, weight_bytes=infer_weight_bytes,
                          gqa_groups=gqa_groups)
    comm = comm_estimate(cfg, gpu, layout.ep, seq_len=seq_len, mfu=train.mfu)
    contexts = list(DEFAULT_CONTEXTS) if contexts is None else contexts
    at = dict(batch=batch, price=price, serve_gpus=inf.serve_gpus, kv_format=kv_format,
              weight_bytes=infer_weight_bytes)
    mine = context_costs(cfg, gpu, contexts, **at)
    compared = [compare(mine, context_costs(other, gpu, contexts, **at), name)
                for name, other in (compare_with or {}).items()]
    return Estimate(model=model_name, config=cfg.to_dict(), gpu=dataclasses.asdict(gpu),
                    params=param_report(cfg), training=train, memory=mem, inference=inf,
                    communication=comm, contexts=mine, compared=compared)


def fmt_si(x: float | None, unit: str = "", digits: int = 3) -> str:
    """1.48e13 -> '14.8T'; used by the CLI and the docs."""
    if x is None:
        return "n/a"
    if x == 0:
        return f"0{unit}"
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suf}{unit}"
    return f"{x:.{digits}g}{unit}" if not math.isclose(x, round(x)) else f"{int(round(x))}{unit}"
