"""Inference arithmetic: KV cache per token and per request, a decode-speed upper bound, and the
per-token attention cost at several context lengths.

The KV cache is compared side by side for the model as configured and for the same model if its
attention were multi-head (every head caches its own key and value: this is also what MLA caches
when run naively), grouped-query (``gqa_groups`` KV heads) or multi-query (one KV head); a
DeepSeek-V3.2 model also gets the row of its dense counterpart (the same MLA without the indexer,
which is DeepSeek-V3). The weights are held fixed across the variants, so the rows differ only in
the attention. How each cached value is stored is a KV format (``kv_format``, a name of
:data:`nanoseek.model.params.KV_FORMATS` or a number of bytes per value).

Decode upper bound: one step generates a token for each of ``batch`` requests at ``context``
tokens. It must read the weights the batch touches (every non-expert weight, the shared experts,
and per MoE layer the routed experts at least one request picked: E * (1 - (1 - K/E)^batch) in
expectation under uniform routing) plus what each request's attention reads from its cache (all
of it for dense attention; every indexer key but only the top-k MLA entries for V3.2), and do
2 x activated parameters + attention FLOPs per request (GEMMs at the FP8 peak when the weights are
FP8, core attention at the BF16 peak, V3.2's indexer at the FP8 peak as DeepSeek's kernels run it).
Step time = max(bytes / HBM bandwidth, FLOPs / peak) over ``serve_gpus`` GPUs with perfect
parallelism and no communication, so tokens/s is an upper bound. The per-layer costs come from the
layer-kind registry (:mod:`.attention`). The output embedding is read once per step; the input
embedding only for the batch's rows. MTP modules are not used (they can serve for speculative
decoding, which this bound ignores). 90% of HBM is usable; ``serve_gpus`` defaults to the smallest
power of two that holds the weights and the configured model's KV cache for the batch.

:func:`context_costs` evaluates the same bound for the configured model at each of several
context lengths, with the attention FLOPs per token split into projections (2 x the attention and
indexer parameters), core attention and indexer: DeepSeek-V3.2's point shows as a core attention
cost that stops growing at ``index_topk`` keys. A DeepSeek-V4 model (hybrid sliding / compressed
attention, :mod:`.attention`'s ``sliding``, ``csa``, ``hca``) gets only its own decode row (the
MHA / GQA / MQA rows replace MLA), its compressors' pooling and mHC mixing in the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import ModelConfig
from ..model.params import KVFormat, get_kv_format
from .attention import LAYER_KINDS, decode_attention_flops, kinds_in_use, kv_bytes, kv_read_bytes
from .family import count_params, layer_params, mixing_flops
from .flops import EstimateError
from .gpus import GPUSpec

USABLE_HBM = 0.9


@dataclass
class KVVariant:
    name: str
    is_model: bool                          # the configured attention
    kv_heads: int | None                    # None: MLA latent
    bytes_per_token_per_layer: float
    bytes_per_token: float
    bytes_per_request: float                # at ``context``
    times_model: float                      # cache size relative to the configured model's
    max_requests: int                       # requests at ``context`` that fit next to the weights
    batch: int                              # min(batch, max_requests)
    step_time_s: float | None
    bound: str | None                       # "memory" or "compute"
    tokens_per_s: float | None
    usd_per_million_tokens: float | None


@dataclass
class KindCache:
    """The KV cache of one layer kind: bytes per cached token per layer, by part."""
    kind: str
    about: str
    layers: int
    parts: dict[str, float]
    bytes_per_token_per_layer: float
    bytes_per_token: float                  # over this kind's layers
    fixed_bytes_per_layer: float = 0.0      # per request, not growing with context (a window's ring)


@dataclass
class ContextCost:
    """One token decoded at ``context`` tokens: attention FLOPs, cache, and the decode bound."""
    context: int
    beyond_max_position: bool               # longer than the config's max_position_embeddings
    keys_attended: dict[str, float]         # per layer, by layer kind
    keys_scored: dict[str, float]           # per layer, by layer kind (an indexer's)
    projection_flops: float                 # 2 x attention (+ indexer, compressor) parameters, all layers
    core_flops: float                       # q.k and p.v (absorbed MLA), all layers
    indexer_flops: float                    # V3.2's / V4's index scores, all layers
    compressor_flops: float                 # V4's KV compressors' pooling, all layers
    attention_flops: float                  # the four above
    mixing_flops: float                     # V4's hyper-connection stream mixing (parameter-free)
    model_flops: float                      # 2 x activated non-embedding params + core + indexer + compressor + mixing
    kv_bytes_per_token: float               # cache per token of context, all layers
    kv_bytes_per_request: float
    kv_read_bytes_per_step: float           # what one decode step of one request reads
    max_requests: int
    batch: int
    step_time_s: float | None
    bound: str | None
    tokens_per_s: float | None
    usd_per_million_tokens: float | None


@dataclass
class InferenceEstimate:
    context: int
    batch: int
    kv_format: str
    kv_format_about: str
    weight_bytes_per_param: float
    weights_bytes: float                    # all weights held in HBM (no MTP)
    serve_gpus: int
    serve_gpus_source: str                  # "given" or "smallest power of two that fits"
    expected_experts_touched_per_layer: float | None
    price_per_gpu_hour: float
    variants: list[KVVariant] = field(default_factory=list)
    kinds: list[KindCache] = field(default_factory=list)


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


def resolve_kv_format(fmt: str | int | KVFormat) -> KVFormat:
    """A KV format by name or bytes per value; an unknown name is an :class:`EstimateError`."""
    try:
        return get_kv_format(fmt)
    except ValueError as e:
        raise EstimateError(str(e)) from None


def kind_caches(cfg: ModelConfig, fmt: str | int | KVFormat = "bf16") -> list[KindCache]:
    """The KV cache of each layer kind the config uses (bytes per cached token, by part)."""
    f = resolve_kv_format(fmt)
    out = []
    for name, layers in kinds_in_use(cfg).items():
        kind = LAYER_KINDS[name]
        parts = kind.cache_parts(cfg, f)
        per = sum(parts.values())
        out.append(KindCache(kind=name, about=kind.about, layers=layers, parts=parts,
                             bytes_per_token_per_layer=per, bytes_per_token=per * layers,
                             fixed_bytes_per_layer=kind.fixed_bytes(cfg, f)))
    return out


class _Server:
    """The serving setup every decode bound shares: GPUs, weights, peaks, price."""

    def __init__(self, cfg: ModelConfig, gpu: GPUSpec, serve_gpus: int, weight_bytes: float, price: float):
        self.cfg, self.gpu, self.n, self.wb, self.price = cfg, gpu, serve_gpus, weight_bytes, price
        self.weights = count_params(cfg).total * weight_bytes
        self.active = count_params(cfg).active_without_embedding
        self.peak = gpu.fp8_flops if (weight_bytes <= 1 and gpu.fp8_flops) else gpu.bf16_flops
        self.index_peak = gpu.fp8_flops or gpu.bf16_flops

    def usable(self) -> float:
        return USABLE_HBM * self.n * self.gpu.hbm_bytes

    def step(self, attn: ModelConfig, context: int, batch: int, fmt: KVFormat):
        """(max requests, batch, step time, bound, tokens/s, $/M tokens) with ``attn``'s attention."""
        per_req = kv_bytes(attn, context, fmt)
        free = self.usable() - self.weights
        max_req = max(0, int(free // per_req)) if per_req else 0
        b = min(batch, max_req)
        if not b:
            return max_req, 0, None, None, None, None
        flops = decode_attention_flops(attn, context)
        mem = decode_weight_bytes(self.cfg, b, self.wb) + b * kv_read_bytes(attn, context, fmt)
        t_mem = mem / (self.n * self.gpu.hbm_bytes_s)
        t_cmp = b * (2.0 * self.active / self.peak                     # GEMMs in the weights' dtype
                     + (flops["core"] + flops.get("compressor", 0.0) + mixing_flops(attn)) / self.gpu.bf16_flops
                     + flops["indexer"] / self.index_peak) / self.n
        step = max(t_mem, t_cmp)
        tps = b / step
        return max_req, b, step, ("memory" if t_mem >= t_cmp else "compute"), tps, \
            self.n * self.price / 3600.0 / tps * 1e6


def _resolve_server(cfg, gpu, context, batch, price, serve_gpus, fmt, weight_bytes) -> tuple[_Server, str]:
    wb = default_weight_bytes(cfg) if weight_bytes is None else weight_bytes
    if serve_gpus is not None:
        return _Server(cfg, gpu, serve_gpus, wb, price), "given"
    n = 1
    need = count_params(cfg).total * wb + batch * kv_bytes(cfg, context, fmt)
    while USABLE_HBM * n * gpu.hbm_bytes < need:
        n *= 2
    return _Server(cfg, gpu, n, wb, price), "smallest power of two that fits"


def _check(context: int, batch: int, serve_gpus: int | None) -> None:
    if context < 1:
        raise EstimateError(f"context must be >= 1, got {context}")
    if batch < 1:
        raise EstimateError(f"batch must be >= 1, got {batch}")
    if serve_gpus is not None and serve_gpus < 1:
        raise EstimateError(f"serve GPUs must be >= 1, got {serve_gpus}")


def decode_estimate(cfg: ModelConfig, gpu: GPUSpec, *, context: int, batch: int = 64,
                    price: float = 2.0, serve_gpus: int | None = None, kv_format: str | int | KVFormat = "bf16",
                    weight_bytes: float | None = None, gqa_groups: int | None = None) -> InferenceEstimate:
    _check(context, batch, serve_gpus)
    fmt = resolve_kv_format(kv_format)
    h = cfg.num_attention_heads
    gqa_given = gqa_groups is not None
    if gqa_groups is None:          # the common 8 KV heads, when that is a real GQA for this model
        gqa_groups = 8 if (8 < h and h % 8 == 0) else None
    elif not (1 < gqa_groups < h and h % gqa_groups == 0):
        raise EstimateError(f"GQA groups {gqa_groups} must be between 1 and num_attention_heads={h} "
                            f"(exclusive) and divide it")
    L = cfg.num_hidden_layers

    # (name, is_model, kv_heads, config whose attention it is)
    variants: list[tuple[str, bool, int | None, ModelConfig]] = []
    if cfg.attention_type not in ("mla", "mha"):        # DeepSeek-V4's hybrid: its own row only
        if gqa_given:
            raise EstimateError(f"GQA groups: the MHA / GQA / MQA comparison rows replace MLA; this model's "
                                f"attention is {cfg.attention_type} ({', '.join(kinds_in_use(cfg))})")
        variants.append((f"{cfg.attention_type} ({' + '.join(kinds_in_use(cfg))})", True, None, cfg))
        h = None
    elif cfg.attention_type == "mla":
        if cfg.index_n_heads:
            variants.append(("MLA+DSA (absorbed)", True, None, cfg))
            variants.append(("MLA dense (absorbed)", False, None, cfg.replace(index_n_heads=0)))
        else:
            variants.append(("MLA (absorbed)", True, None, cfg))
    own_kvh = cfg.num_key_value_heads if cfg.attention_type == "mha" else None
    for kvh, label in ((h, "MHA"), (gqa_groups, "GQA"), (1, "MQA")):
        if kvh is None or h is None or any(v[2] == kvh for v in variants):
            continue
        name = f"{label} ({kvh} KV head{'s' if kvh > 1 else ''})"
        variants.append((name, kvh == own_kvh, kvh,
                         cfg.replace(attention_type="mha", num_key_value_heads=kvh, index_n_heads=0)))
    if own_kvh is not None and not any(v[2] == own_kvh for v in variants):
        variants.insert(0, (f"GQA ({own_kvh} KV heads)", True, own_kvh, cfg))
    model_kv = kv_bytes(cfg, context, fmt) / context

    server, source = _resolve_server(cfg, gpu, context, batch, price, serve_gpus, fmt, weight_bytes)
    out = []
    for name, own, kvh, c in variants:
        per_req = kv_bytes(c, context, fmt)
        per_tok = per_req / context
        max_req, b, step, bound, tps, usd = server.step(c, context, batch, fmt)
        out.append(KVVariant(name=name, is_model=own, kv_heads=kvh, bytes_per_token_per_layer=per_tok / L,
                             bytes_per_token=per_tok, bytes_per_request=per_req,
                             times_model=per_tok / model_kv, max_requests=max_req, batch=b,
                             step_time_s=step, bound=bound, tokens_per_s=tps, usd_per_million_tokens=usd))
    return InferenceEstimate(
        context=context, batch=batch, kv_format=fmt.name, kv_format_about=fmt.about,
        weight_bytes_per_param=server.wb, weights_bytes=server.weights, serve_gpus=server.n,
        serve_gpus_source=source,
        expected_experts_touched_per_layer=experts_touched(cfg, batch) if cfg.n_routed_experts else None,
        price_per_gpu_hour=price, variants=out, kinds=kind_caches(cfg, fmt))


def projection_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of every decoder layer's attention projections (MLA's, an
    indexer's, V4's with its grouped low-rank output projection and its compressors'): 2 x their
    parameters."""
    n = 0
    for i in range(cfg.num_hidden_layers):
        _, act = layer_params(cfg, i)
        n += act["attention"] + act.get("indexer", 0) + act.get("compressor", 0)
    return 2.0 * n


def context_costs(cfg: ModelConfig, gpu: GPUSpec, contexts: list[int], *, batch: int = 64,
                  price: float = 2.0, serve_gpus: int | None = None, kv_format: str | int | KVFormat = "bf16",
                  weight_bytes: float | None = None) -> list[ContextCost]:
    """One token decoded at each context length: attention FLOPs (projections, core, indexer), the
    whole model's FLOPs, cache size and reads, and the decode bound at ``batch`` (fewer where the
    cache does not fit) on ``serve_gpus`` (default: sized for the longest context)."""
    if not contexts:
        raise EstimateError("give at least one context length")
    for n in contexts:
        _check(n, batch, serve_gpus)
    fmt = resolve_kv_format(kv_format)
    server, _ = _resolve_server(cfg, gpu, max(contexts), batch, price, serve_gpus, fmt, weight_bytes)
    proj = projection_flops(cfg)
    mix = mixing_flops(cfg)
    out = []
    for n in contexts:
        flops = decode_attention_flops(cfg, n)
        keys = {name: LAYER_KINDS[name].keys(cfg, n) for name in kinds_in_use(cfg)}
        per_req = kv_bytes(cfg, n, fmt)
        max_req, b, step, bound, tps, usd = server.step(cfg, n, batch, fmt)
        out.append(ContextCost(
            context=n, beyond_max_position=n > cfg.max_position_embeddings,
            keys_attended={k: v[0] for k, v in keys.items()}, keys_scored={k: v[1] for k, v in keys.items()},
            projection_flops=proj, core_flops=flops["core"], indexer_flops=flops["indexer"],
            compressor_flops=flops["compressor"],
            attention_flops=proj + flops["core"] + flops["indexer"] + flops["compressor"],
            mixing_flops=mix,
            model_flops=2.0 * server.active + flops["core"] + flops["indexer"] + flops["compressor"] + mix,
            kv_bytes_per_token=per_req / n, kv_bytes_per_request=per_req,
            kv_read_bytes_per_step=kv_read_bytes(cfg, n, fmt), max_requests=max_req, batch=b,
            step_time_s=step, bound=bound, tokens_per_s=tps, usd_per_million_tokens=usd))
    return out
