"""Inference arithmetic: KV cache per token and per request, and a decode-speed upper bound.

The KV cache is compared side by side for the model as configured and for the same model if its
attention were multi-head (every head caches its own key and value: this is also what MLA caches
when run naively), grouped-query (``gqa_groups`` KV heads) or multi-query (one KV head). The
weights are held fixed across the variants, so the rows differ only in the cache.

Decode upper bound: one step generates a token for each of ``batch`` requests at ``context``
tokens. It must read the weights the batch touches (every non-expert weight, the shared experts,
and per MoE layer the routed experts at least one request picked: E * (1 - (1 - K/E)^batch) in
expectation under uniform routing) plus every request's KV cache, and do 2 x activated parameters
+ attention FLOPs per request (GEMMs at the FP8 peak when the weights are FP8, attention at the
BF16 peak). Step time = max(bytes / HBM bandwidth, FLOPs / peak) over
``serve_gpus`` GPUs with perfect parallelism and no communication, so tokens/s is an upper bound.
Absorbed MLA attention costs 2h(kv_lora_rank + qk_rope_head_dim) + 2h kv_lora_rank FLOPs per
cached position, MHA/GQA 2h(qk_head_dim + v_head_dim). The output embedding is read once per step;
the input embedding only for the batch's rows. MTP modules are not used (they can serve for
speculative decoding, which this bound ignores). 90% of HBM is usable; ``serve_gpus`` defaults to
the smallest power of two that holds the weights and the configured model's KV cache for the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import ModelConfig
from ..model.params import count_params, kv_cache_bytes_per_token
from .flops import EstimateError
from .gpus import GPUSpec

USABLE_HBM = 0.9


@dataclass
class KVVariant:
    name: str
    is_model: bool                          # the configured attention
    kv_heads: int | None                    # None: MLA latent
    bytes_per_token_per_layer: int
    bytes_per_token: int
    bytes_per_request: int                  # at ``context``
    times_model: float                      # cache size relative to the configured model's
    max_requests: int                       # requests at ``context`` that fit next to the weights
    batch: int                              # min(batch, max_requests)
    step_time_s: float | None
    bound: str | None                       # "memory" or "compute"
    tokens_per_s: float | None
    usd_per_million_tokens: float | None


@dataclass
class InferenceEstimate:
    context: int
    batch: int
    kv_dtype_bytes: int
    weight_bytes_per_param: float
    weights_bytes: float                    # all weights held in HBM (no MTP)
    serve_gpus: int
    serve_gpus_source: str                  # "given" or "smallest power of two that fits"
    expected_experts_touched_per_layer: float | None
    price_per_gpu_hour: float
    variants: list[KVVariant] = field(default_factory=list)


def default_weight_bytes(cfg: ModelConfig) -> float:
    """1 byte for a config shipped in FP8 (``quantization_config.quant_method == 'fp8'``), else 2."""
    q = cfg.quantization_config or {}
    return 1.0 if str(q.get("quant_method", "")).lower() == "fp8" else 2.0


def experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Expected distinct routed experts per MoE layer for ``batch`` tokens under uniform routing."""
    e, k = cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
    if not e:
        return 0.0
    return e * (1.0 - (1.0 - k / e) ** batch)


def decode_weight_bytes(cfg: ModelConfig, batch: int, weight_bytes: float) -> float:
    """Weight bytes one decode step reads for ``batch`` requests."""
    pc = count_params(cfg)
    bd = pc.breakdown
    dense = pc.total - bd["routed_experts"] - bd["embedding"]
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    routed = cfg.num_moe_layers * experts_touched(cfg, batch) * per_expert
    rows = min(batch, cfg.vocab_size) * cfg.hidden_size
    return (dense + routed + rows) * weight_bytes


def _attn_flops_per_position(cfg: ModelConfig, mla: bool) -> float:
    h = cfg.num_attention_heads
    if mla:
        return 2 * h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * h * cfg.kv_lora_rank
    return 2 * h * (cfg.qk_head_dim + cfg.v_head_dim)


def decode_estimate(cfg: ModelConfig, gpu: GPUSpec, *, context: int, batch: int = 64,
                    price: float = 2.0, serve_gpus: int | None = None, kv_bytes: int = 2,
                    weight_bytes: float | None = None, gqa_groups: int | None = None) -> InferenceEstimate:
    if context < 1:
        raise EstimateError(f"context must be >= 1, got {context}")
    if batch < 1:
        raise EstimateError(f"batch must be >= 1, got {batch}")
    if serve_gpus is not None and serve_gpus < 1:
        raise EstimateError(f"serve GPUs must be >= 1, got {serve_gpus}")
    h = cfg.num_attention_heads
    if gqa_groups is None:          # the common 8 KV heads, when that is a real GQA for this model
        gqa_groups = 8 if (8 < h and h % 8 == 0) else None
    elif not (1 < gqa_groups < h and h % gqa_groups == 0):
        raise EstimateError(f"GQA groups {gqa_groups} must be between 1 and num_attention_heads={h} "
                            f"(exclusive) and divide it")
    wb = default_weight_bytes(cfg) if weight_bytes is None else weight_bytes
    pc = count_params(cfg)
    weights = pc.total * wb
    L = cfg.num_hidden_layers

    # (name, is_model, kv_heads, config whose cache it is, mla?)
    variants: list[tuple[str, bool, int | None, ModelConfig, bool]] = []
    if cfg.attention_type == "mla":
        variants.append(("MLA (absorbed)", True, None, cfg, True))
    own_kvh = cfg.num_key_value_heads if cfg.attention_type == "mha" else None
    for kvh, label in ((h, "MHA"), (gqa_groups, "GQA"), (1, "MQA")):
        if kvh is None or any(v[2] == kvh for v in variants):
            continue
        name = f"{label} ({kvh} KV head{'s' if kvh > 1 else ''})"
        variants.append((name, kvh == own_kvh, kvh,
                         cfg.replace(attention_type="mha", num_key_value_heads=kvh), False))
    if own_kvh is not None and not any(v[2] == own_kvh for v in variants):
        variants.insert(0, (f"GQA ({own_kvh} KV heads)", True, own_kvh, cfg, False))
    model_kv = next(kv_cache_bytes_per_token(c, kv_bytes) for _, own, _, c, _ in variants if own)

    usable = lambda n: USABLE_HBM * n * gpu.hbm_bytes  # noqa: E731
    if serve_gpus is None:
        need = weights + batch * context * model_kv
        n = 1
        while usable(n) < need:
            n *= 2
        serve_gpus, source = n, "smallest power of two that fits"
    else:
        source = "given"
    peak = gpu.fp8_flops if (wb <= 1 and gpu.fp8_flops) else gpu.bf16_flops
    active_matmul = pc.active_without_embedding
    out = []
    for name, own, kvh, c, mla in variants:
        per_layer = kv_cache_bytes_per_token(c, kv_bytes, per_layer=True)
        per_tok = per_layer * L
        per_req = per_tok * context
        free = usable(serve_gpus) - weights
        max_req = max(0, int(free // per_req)) if per_req else 0
        b = min(batch, max_req)
        step = bound = tps = usd = None
        if b:
            mem = decode_weight_bytes(cfg, b, wb) + b * per_req
            t_mem = mem / (serve_gpus * gpu.hbm_bytes_s)
            t_cmp = (b * 2.0 * active_matmul / peak           # GEMMs in the weights' dtype
                     + b * context * L * _attn_flops_per_position(cfg, mla) / gpu.bf16_flops) / serve_gpus
            step, bound = max(t_mem, t_cmp), ("memory" if t_mem >= t_cmp else "compute")
            tps = b / step
            usd = serve_gpus * price / 3600.0 / tps * 1e6
        out.append(KVVariant(name=name, is_model=own, kv_heads=kvh, bytes_per_token_per_layer=per_layer,
                             bytes_per_token=per_tok, bytes_per_request=per_req,
                             times_model=per_tok / model_kv, max_requests=max_req, batch=b,
                             step_time_s=step, bound=bound, tokens_per_s=tps,
                             usd_per_million_tokens=usd))
    return InferenceEstimate(
        context=context, batch=batch, kv_dtype_bytes=kv_bytes, weight_bytes_per_param=wb,
        weights_bytes=weights, serve_gpus=serve_gpus, serve_gpus_source=source,
        expected_experts_touched_per_layer=experts_touched(cfg, batch) if cfg.n_routed_experts else None,
        price_per_gpu_hour=price, variants=out)
