"""Training memory per GPU for a data / expert / pipeline parallel layout (with ZeRO or FSDP).

The layout is DeepSeek-V3's kind (no tensor parallelism): ``pp`` pipeline stages, each holding a
contiguous run of layers, replicated ``dp`` times, so the world is ``dp * pp`` GPUs. Expert
parallelism is carved out of the data-parallel group: each MoE layer's routed experts are split
over ``ep`` ranks and replicated ``dp / ep`` times (the "expert data parallel" group). DeepSeek-V3
trained with pp=16, ep=64 over 8 nodes and ZeRO-1 on 2,048 H800s (dp=128).

ZeRO stage over the data-parallel group (``dp`` for dense weights, ``dp / ep`` for experts):
0 replicates everything; 1 shards the fp32 master weights and the AdamW moments; 2 also the
gradients; 3 also the weights (FSDP's ``fully_shard``; the per-layer all-gather buffer is not
counted).

Bytes per parameter come from a :class:`Precision` recipe: ``bf16`` is standard mixed precision
(bf16 weights, fp32 gradients, fp32 master, fp32 moments: 18 B); ``fp8`` follows the V3 report
(an fp8 copy of each weight for the GEMMs, fp32 gradients and master weights, AdamW moments in
bf16: 13 B). Stage 0 also holds the embedding, the last stage the final norm, the output head and
the MTP modules. Activations are a rough count of what the backward pass needs with no
recomputation and flash attention (:func:`activation_bytes_per_token`), or with full
recomputation only each layer's input plus one layer's activations; under 1F1B the first
stage holds ``pp`` micro-batches in flight, stage ``s`` holds ``pp - s``. The reported figure is
the heaviest stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..model.config import ModelConfig
from .family import count_params, layer_params
from .flops import DEFAULT_SEQ_LEN, EstimateError
from .gpus import GPUSpec


@dataclass(frozen=True)
class Precision:
    name: str
    weight_bytes: float        # the copy the GEMMs read
    grad_bytes: float
    master_bytes: float        # optimizer's master copy (0: none)
    moment_bytes: float        # both AdamW moments together
    activation_bytes: float = 2.0

    @property
    def bytes_per_param(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.master_bytes + self.moment_bytes


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", weight_bytes=2, grad_bytes=4, master_bytes=4, moment_bytes=8),
    "fp8": Precision("fp8", weight_bytes=1, grad_bytes=4, master_bytes=4, moment_bytes=4),
}


def get_precision(p: str | Precision) -> Precision:
    if isinstance(p, Precision):
        return p
    if p not in PRECISIONS:
        raise EstimateError(f"unknown precision recipe '{p}'; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[p]


@dataclass
class Layout:
    dp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 1               # 0..3; 3 is FSDP
    micro_batch: int = 1        # sequences per micro-batch
    recompute: bool = False     # full activation recomputation: keep only each layer's input

    @property
    def gpus(self) -> int:
        return self.dp * self.pp

    def validate(self, cfg: ModelConfig) -> "Layout":
        for name in ("dp", "pp", "ep", "micro_batch"):
            if getattr(self, name) < 1:
                raise EstimateError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise EstimateError(f"zero must be 0, 1, 2 or 3 (3 is FSDP), got {self.zero}")
        if self.dp % self.ep:
            raise EstimateError(f"ep={self.ep} must divide dp={self.dp}: expert parallelism is "
                                f"carved out of the data-parallel group")
        if self.ep > 1:
            if not cfg.n_routed_experts:
                raise EstimateError(f"ep={self.ep} needs routed experts; this config is dense")
            if cfg.n_routed_experts % self.ep:
                raise EstimateError(f"ep={self.ep} must divide n_routed_experts={cfg.n_routed_experts}")
        if self.pp > cfg.num_hidden_layers:
            raise EstimateError(f"pp={self.pp} exceeds num_hidden_layers={cfg.num_hidden_layers}")
        return self


def stage_layers(cfg: ModelConfig, pp: int) -> list[range]:
    """Contiguous, as-even-as-possible split of the decoder layers over ``pp`` stages."""
    n, out, start = cfg.num_hidden_layers, [], 0
    for s in range(pp):
        size = n // pp + (1 if s < n % pp else 0)
        out.append(range(start, start + size))
        start += size
    return out


def activation_bytes_per_token(cfg: ModelConfig, layer_idx: int, act_bytes: float = 2.0) -> float:
    """Rough bytes one token leaves saved for the backward pass in one layer (no recomputation,
    flash attention so no seq_len^2 scores): norm inputs and outputs, the MLA low-rank and
    per-head q/k/v, a V3.2 indexer's query, key and head weights, the attention output, MLP or
    expert inputs and SwiGLU intermediates (one
    copy per routed expert), plus fp32 softmax statistics and router scores. A config with an
    ``activation_elements`` method (DeepSeek-V4's) counts its own."""
    own = getattr(cfg, "activation_elements", None)
    if own is not None:
        e, fp32 = own(layer_idx)
        return e * act_bytes + fp32 * 4
    d, h = cfg.hidden_size, cfg.num_attention_heads
    e = 2 * d                                                       # input_layernorm in / out
    if cfg.attention_type == "mla":
        if cfg.q_lora_rank:
            e += 2 * cfg.q_lora_rank                                # q_a_proj out, q_a_layernorm out
        e += (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank   # kv_a out, latent normed
        e += 2 * h * cfg.qk_head_dim + h * cfg.v_head_dim           # q, k, v per head
        if cfg.index_n_heads:                                       # V3.2 indexer: q, k (pre/post norm), w
            e += cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_head_dim + cfg.index_n_heads
    else:
        kvh = cfg.num_key_value_heads
        e += h * cfg.qk_head_dim + kvh * (cfg.qk_head_dim + cfg.v_head_dim)
    e += h * cfg.v_head_dim                                         # attention out = o_proj in
    fp32 = h                                                        # softmax log-sum-exp
    e += 2 * d                                                      # post_attention_layernorm
    if cfg.is_moe_layer(layer_idx):
        fp32 += cfg.n_routed_experts                                # router scores
        k, mi = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        e += k * (d + 3 * mi) + (cfg.n_shared_experts or 0) * 3 * mi
    else:
        e += 3 * cfg.intermediate_size                              # gate, up, silu(gate)*up
    return e * act_bytes + fp32 * 4


@dataclass
class LayoutMemory:
    layout: dict[str, int]
    precision: dict[str, Any]
    gpus: int
    stage: int                      # the heaviest pipeline stage (reported below)
    stage_layers: list[int]         # [first, last] decoder layer of that stage
    params_per_gpu: float           # parameters stored on one GPU of that stage (before ZeRO-3)
    weights_bytes: float
    grads_bytes: float
    master_bytes: float
    moments_bytes: float
    activations_bytes: float
    total_bytes: float
    activation_bytes_per_token: float       # all decoder layers, one token
    tokens_in_flight: int                   # on the heaviest stage
    stage_totals_bytes: list[float] = field(default_factory=list)
    hbm_bytes: float | None = None
    fits: bool | None = None


def estimate_for_layout(cfg: ModelConfig, layout: Layout, precision: str | Precision = "bf16", *,
                        seq_len: int = DEFAULT_SEQ_LEN, gpu: GPUSpec | None = None,
                        include_mtp: bool = True) -> LayoutMemory:
    """Training memory per GPU on the heaviest pipeline stage of ``layout``."""
    layout.validate(cfg)
    prec = get_precision(precision)
    d, v = cfg.hidden_size, cfg.vocab_size
    pc = count_params(cfg)
    edp = layout.dp // layout.ep
    n_mtp = cfg.num_nextn_predict_layers if include_mtp else 0

    def shard(z_min: int, group: int) -> int:       # divisor for a state sharded from ZeRO z_min
        return group if layout.zero >= z_min else 1

    stages = stage_layers(cfg, layout.pp)
    results = []
    for s, layers in enumerate(stages):
        dense, expert, act_tok = 0.0, 0.0, 0.0      # params: replicated-by-dp vs split-by-ep
        for i in layers:
            tot, _ = layer_params(cfg, i)
            expert += tot.get("routed_experts", 0)
            dense += sum(tot.values()) - tot.get("routed_experts", 0)
            act_tok += activation_bytes_per_token(cfg, i, prec.activation_bytes)
        if s == 0:
            dense += pc.breakdown["embedding"]
        last = s == layout.pp - 1
        if last:
            dense += d + (v * d if (not cfg.tie_word_embeddings or layout.pp > 1) else 0)
            for k in range(n_mtp):
                tot, _ = layer_params(cfg, cfg.num_hidden_layers + k)
                expert += tot.get("routed_experts", 0)
                dense += 3 * d + 2 * d * d + sum(tot.values()) - tot.get("routed_experts", 0)
                act_tok += activation_bytes_per_token(cfg, cfg.num_hidden_layers + k,
                                                      prec.activation_bytes)
        expert_local = expert / layout.ep

        def per_gpu(z_min: int) -> float:
            return dense / shard(z_min, layout.dp) + expert_local / shard(z_min, edp)

        in_flight = layout.micro_batch * seq_len * (layout.pp - s)
        if layout.recompute:       # layer inputs kept; one layer's activations live while recomputed
            n_layers = len(layers) + (n_mtp if last else 0)
            one_layer = max((activation_bytes_per_token(cfg, i, prec.activation_bytes)
                             for i in list(layers) + ([cfg.num_hidden_layers] if last and n_mtp else [])),
                            default=0.0)
            acts = (n_layers * d * prec.activation_bytes * in_flight
                    + one_layer * layout.micro_batch * seq_len)
        else:
            acts = act_tok * in_flight
        if last:   # fp32 logits of the main head and each MTP head, one micro-batch
            acts += v * 4 * (1 + n_mtp) * layout.micro_batch * seq_len
        parts = {
            "weights_bytes": per_gpu(3) * prec.weight_bytes,
            "grads_bytes": per_gpu(2) * prec.grad_bytes,
            "master_bytes": per_gpu(1) * prec.master_bytes,
            "moments_bytes": per_gpu(1) * prec.moment_bytes,
            "activations_bytes": acts,
        }
        results.append((sum(parts.values()), s, layers, dense + expert_local, parts, in_flight))

    total, s, layers, params, parts, in_flight = max(results, key=lambda r: r[0])
    act_all = sum(activation_bytes_per_token(cfg, i, prec.activation_bytes)
                  for i in range(cfg.num_hidden_layers))
    return LayoutMemory(
        layout=dataclasses.asdict(layout), precision={**dataclasses.asdict(prec),
                                                      "bytes_per_param": prec.bytes_per_param},
        gpus=layout.gpus, stage=s, stage_layers=[layers.start, layers.stop - 1],
        params_per_gpu=params, total_bytes=total, activation_bytes_per_token=act_all,
        tokens_in_flight=in_flight, stage_totals_bytes=[r[0] for r in results],
        hbm_bytes=None if gpu is None else gpu.hbm_bytes,
        fits=None if gpu is None else total <= gpu.hbm_bytes, **parts)
