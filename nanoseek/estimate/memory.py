"""Training memory per GPU for a data / expert / pipeline parallel layout (with ZeRO or FSDP),
under a pipeline schedule and an activation-recompute mode.

The layout is DeepSeek-V3's kind (no tensor parallelism): ``pp`` pipeline ranks, replicated ``dp``
times, so the world is ``dp * pp`` GPUs. The schedule (:mod:`.pipeline`: ``1f1b``, ``gpipe``,
``interleaved-1f1b``, ``zbv``, ``dualpipev``, ``dualpipe``) splits the decoder layers evenly into
its stages and places them on the ranks (rank 0 of a V schedule holds the first and the last
stage); the rank holding stage 0 also holds the embedding, the one holding the last stage the
final norm, the output head and the MTP modules. DualPipe puts two stages on each rank (``r``
and ``pp - 1 - r``, so twice 1F1B's parameters and gradients per rank: its "2x"), and every
stage on two ranks, whose pair also splits what ZeRO shards. Expert
parallelism is carved out of the data-parallel group: each MoE layer's routed experts are split
over ``ep`` ranks and replicated ``dp / ep`` times (the "expert data parallel" group).
DeepSeek-V3 trained with pp=16 (DualPipe), ep=64 over 8 nodes and ZeRO-1 on 2,048 H800s (dp=128).

ZeRO stage over the data-parallel group (``dp`` for dense weights, ``dp / ep`` for experts):
0 replicates everything; 1 shards the fp32 master weights and the AdamW moments; 2 also the
gradients; 3 also the weights (FSDP's ``fully_shard``; the per-layer all-gather buffer is not
counted).

Bytes per parameter come from a :class:`Precision` recipe: ``bf16`` is standard mixed precision
(bf16 weights, fp32 gradients, fp32 master, fp32 moments: 18 B); ``fp8`` follows the V3 report
(an fp8 copy of each weight for the GEMMs, fp32 gradients and master weights, AdamW moments in
bf16: 13 B), and caches the inputs of its FP8 Linear layers in FP8 (:mod:`.activations`).

**Activations** come from :mod:`.activations` (the one model of saved activations, held to
nanoseek's measured bytes by tests/test_recompute.py): the bytes one token keeps for the backward
in one layer, by tensor kind, under the layout's recompute mode, with fused kernels and the
precision recipe's FP8 caching. On top of the kept activations of the in-flight micro-batches
the schedule dictates, a rank holds one layer's recomputed tensors for one micro-batch while the
backward recomputes them, and the rank with the output head one micro-batch's fp32 logits. The
recomputed FLOPs (:func:`recompute_flops_per_token`) lengthen the backward, which enters the
bubble. The reported figure is the heaviest rank.

Not counted: communication buffers, FSDP's all-gather buffer, the allocator's fragmentation,
temporary tensors of the forward (only what is saved for the backward is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..model.config import ModelConfig
from .activations import (RECOMPUTE_MODES, activation_breakdown, activation_bytes_per_token, get_recompute,
                          recomputed_kinds)
from .family import count_params, layer_params
from .flops import DEFAULT_SEQ_LEN, EstimateError, layer_forward_flops_per_token
from .gpus import GPUSpec
from .pipeline import DEFAULT_SCHEDULE, get_schedule


@dataclass(frozen=True)
class Precision:
    name: str
    weight_bytes: float        # the copy the GEMMs read
    grad_bytes: float
    master_bytes: float        # optimizer's master copy (0: none)
    moment_bytes: float        # both AdamW moments together
    activation_bytes: float = 2.0
    fp8_activations: bool = False   # cache Linear inputs in FP8 as the V3 report does (.activations)

    @property
    def bytes_per_param(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.master_bytes + self.moment_bytes


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", weight_bytes=2, grad_bytes=4, master_bytes=4, moment_bytes=8),
    "fp8": Precision("fp8", weight_bytes=1, grad_bytes=4, master_bytes=4, moment_bytes=4,
                     fp8_activations=True),
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
    pp: int = 1                 # pipeline ranks
    ep: int = 1
    zero: int = 1               # 0..3; 3 is FSDP
    micro_batch: int = 1        # sequences per micro-batch
    recompute: str = "none"     # RECOMPUTE_MODES: none, selective, full (True / False: full / none)
    schedule: str = DEFAULT_SCHEDULE        # pipeline.SCHEDULES (ignored with pp = 1)
    micro_batches: int | None = None        # per step and pipeline (None: default_micro_batches)

    def __post_init__(self):
        self.recompute = get_recompute(self.recompute)
        if self.micro_batches is None:
            self.micro_batches = default_micro_batches(self.pp, self.schedule)

    @property
    def gpus(self) -> int:
        return self.dp * self.pp

    def validate(self, cfg: ModelConfig) -> "Layout":
        for name in ("dp", "pp", "ep", "micro_batch", "micro_batches"):
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
        sched = get_schedule(self.schedule)
        if self.pp > 1 and sched.stages(self.pp) > cfg.num_hidden_layers:
            raise EstimateError(f"--pp {self.pp} with --schedule {sched.name} makes {sched.stages(self.pp)} "
                                f"stages, more than num_hidden_layers={cfg.num_hidden_layers}")
        sched.validate(self.pp, self.micro_batches)
        if self.recompute == "selective" and getattr(cfg, "activation_elements", None) is not None:
            activation_bytes_per_token(cfg, 0, mode="selective")        # the one-line refusal
        return self


def default_micro_batches(pp: int, schedule: str = DEFAULT_SCHEDULE) -> int:
    """Micro-batches per step when not given: 1 without a pipeline, else 4 x pp (at least the
    schedule's minimum, and even for DualPipe)."""
    if pp == 1:
        return 1
    m = max(4 * pp, get_schedule(schedule).min_microbatches(pp))
    return m + m % 2


def stage_layers(cfg: ModelConfig, pp: int) -> list[range]:
    """Contiguous, as-even-as-possible split of the decoder layers over ``pp`` stages."""
    n, out, start = cfg.num_hidden_layers, [], 0
    for s in range(pp):
        size = n // pp + (1 if s < n % pp else 0)
        out.append(range(start, start + size))
        start += size
    return out


def trainer_refusal(cfg: Any, layout: Layout) -> str | None:
    """Why nanoseek's trainer would refuse ``layout`` for ``cfg`` (the checks of
    ``nanoseek.train.config``, which this layer cannot import: keep the two in step), in a few
    words; None when it runs it. Pipeline stages: DeepSeek-V3 models only (not V3.2's indexers,
    not V4) and never under FSDP; a family's own refusals (V4: no recomputation, no FSDP) come
    from :mod:`nanoseek.model.registry`. Expert parallelism is not checked here: the estimate picks
    ``ep`` itself when not given. The estimate prices such layouts only when told to
    (``--estimate-only``), and says so on them."""
    from ..errors import ConfigError
    from ..model import registry
    if layout.pp > 1:
        if layout.zero == 3:
            return "the trainer runs pipeline stages without FSDP ([parallel] pp > 1 with fsdp = true)"
        if not isinstance(cfg, ModelConfig) or getattr(cfg, "index_n_heads", 0):
            return "the trainer splits DeepSeek-V3 models only into pipeline stages (not V3.2's indexers or V4)"
    try:
        family = registry.family_of(cfg)
    except ConfigError:         # not a model family's config: no trainer to ask
        return None
    for feature, given in (("recompute", layout.recompute != "none"), ("fsdp", layout.zero == 3)):
        if given and feature in family.unsupported:
            return f"the trainer has no {feature} for {family.name}: {family.unsupported[feature]}"
    return None


def schedule_refusal(layout: Layout) -> str | None:
    """Why nanoseek cannot run ``layout``'s schedule (torch has no such class), or None."""
    sched = get_schedule(layout.schedule)
    if layout.pp > 1 and sched.torch_class is None:
        return f"torch.distributed.pipelining has no {sched.name} schedule"
    return None


def recompute_flops_per_token(cfg: ModelConfig, layer_idx: int, mode: str,
                              seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """Forward FLOPs recomputed in the backward per token of one layer: the whole layer for
    ``full``; the MLA up-projections (2 x q_b_proj's and kv_b_proj's weights) for ``selective``
    (the RMSNorms are elementwise and, as in :mod:`.flops`, not counted)."""
    if mode == "none":
        return 0.0
    if mode == "full":
        return layer_forward_flops_per_token(cfg, layer_idx, seq_len)
    if cfg.attention_type != "mla":
        return 0.0
    h = cfg.num_attention_heads
    q_in = cfg.q_lora_rank or 0
    q_b = q_in * h * cfg.qk_head_dim if q_in else 0
    kv_b = cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return 2.0 * (q_b + kv_b)


@dataclass
class LayoutMemory:
    layout: dict[str, Any]
    precision: dict[str, Any]
    gpus: int
    stage: int                      # the heaviest pipeline rank (reported below)
    stage_layers: list[int]         # the decoder layers that rank holds
    stage_holds: list[str]          # and of "embedding", "output head", "MTP"
    params_per_gpu: float           # parameters stored on one GPU of that rank (before ZeRO-3)
    weights_bytes: float
    grads_bytes: float
    master_bytes: float
    moments_bytes: float
    activations_bytes: float        # kept activations + recompute working set + logits
    total_bytes: float
    activation_bytes_per_token: float       # all decoder layers, one token, under the recompute mode
    tokens_in_flight: float                 # on the heaviest rank, in micro-batches' tokens
    schedule: dict[str, Any] = field(default_factory=dict)     # name, torch class, bubble
    recompute: dict[str, Any] = field(default_factory=dict)    # mode, what it keeps, its cost
    activation_kinds_bytes: dict[str, float] = field(default_factory=dict)   # heaviest rank, by kind
    stage_totals_bytes: list[float] = field(default_factory=list)
    hbm_bytes: float | None = None
    fits: bool | None = None
    estimate_only: str | None = None        # why nanoseek cannot run this layout (None: it can)


def estimate_for_layout(cfg: ModelConfig, layout: Layout, precision: str | Precision = "bf16", *,
                        seq_len: int = DEFAULT_SEQ_LEN, gpu: GPUSpec | None = None,
                        include_mtp: bool = True, flash: bool = True) -> LayoutMemory:
    """Training memory per GPU on the heaviest pipeline rank of ``layout``, and the schedule's bubble."""
    layout.validate(cfg)
    prec = get_precision(precision)
    sched = get_schedule(layout.schedule)
    mode, pp, m = layout.recompute, layout.pp, layout.micro_batches
    d, v = cfg.hidden_size, cfg.vocab_size
    pc = count_params(cfg)
    edp = layout.dp // layout.ep
    n_mtp = cfg.num_nextn_predict_layers if include_mtp else 0
    tokens_mb = layout.micro_batch * seq_len
    n_stages = sched.stages(pp) if pp > 1 else 1
    stages = stage_layers(cfg, n_stages)
    mtp_layers = list(range(cfg.num_hidden_layers, cfg.num_hidden_layers + n_mtp))

    kw = dict(act_bytes=prec.activation_bytes, flash=flash, seq_len=seq_len, fp8=prec.fp8_activations)

    def breakdown(i: int, mode: str = "none") -> dict[str, float]:
        return activation_breakdown(cfg, i, mode=mode, **kw)

    def shard(z_min: int, group: int) -> int:       # divisor for a state sharded from ZeRO z_min
        return group if layout.zero >= z_min else 1

    results = []
    for r in range(pp):
        held = sched.stages_of_rank(pp, r) if pp > 1 else [0]
        layers = [i for st in held for i in stages[st]]
        last = n_stages - 1 in held
        if last:
            layers += mtp_layers
        dense, expert = 0.0, 0.0        # params: replicated-by-dp vs split-by-ep
        for i in layers:
            tot, _ = layer_params(cfg, i)
            expert += tot.get("routed_experts", 0)
            dense += sum(tot.values()) - tot.get("routed_experts", 0)
            if i >= cfg.num_hidden_layers:      # MTP: enorm, hnorm, shared_head.norm, eh_proj
                dense += 3 * d + 2 * d * d
        if 0 in held:
            dense += pc.breakdown["embedding"]
        if last:
            dense += d + (v * d if (not cfg.tie_word_embeddings or pp > 1) else 0)
        expert_local = expert / layout.ep
        # DualPipe: each stage lives on two ranks (r and pp - 1 - r), so what ZeRO shards is also
        # split over that pair (at ZeRO-0 each keeps its own)
        mirror = sched.param_copies if pp > 1 else 1

        def per_gpu(z_min: int) -> float:
            return ((dense / shard(z_min, layout.dp) + expert_local / shard(z_min, edp))
                    / (mirror if layout.zero >= z_min else 1))

        # activations: in-flight (micro-batch, stage) sets x the mean stage's kept bytes per token
        in_flight = sched.in_flight_chunks(pp, r, m)
        per_stage = in_flight / len(held) * tokens_mb
        kinds: dict[str, float] = {}
        working = 0.0           # one layer's recomputed tensors for one micro-batch, in the backward
        for i in layers:
            full, keep = breakdown(i), breakdown(i, mode)
            for k, b in keep.items():
                kinds[k] = kinds.get(k, 0.0) + b * per_stage
            working = max(working, (sum(full.values()) - sum(keep.values())) * tokens_mb)
        if working:
            kinds["recompute_working_set"] = working
        if last:   # fp32 logits of the main head and each MTP head, one micro-batch
            kinds["logits"] = v * 4 * (1 + n_mtp) * tokens_mb
        parts = {
            "weights_bytes": per_gpu(3) * prec.weight_bytes,
            "grads_bytes": per_gpu(2) * prec.grad_bytes,
            "master_bytes": per_gpu(1) * prec.master_bytes,
            "moments_bytes": per_gpu(1) * prec.moment_bytes,
            "activations_bytes": sum(kinds.values()),
        }
        holds = (["embedding"] if 0 in held else []) + (["output head"] if last else []) + \
            (["MTP"] if last and n_mtp else [])
        results.append((sum(parts.values()), r, sorted(layers), dense + expert_local, parts,
                        in_flight / len(held) * tokens_mb, kinds, holds))

    total, r, layers, params, parts, in_flight, kinds, holds = max(results, key=lambda x: x[0])
    dec = range(cfg.num_hidden_layers)
    act_all = sum(sum(breakdown(i, mode).values()) for i in dec)
    fwd = sum(layer_forward_flops_per_token(cfg, i, seq_len) for i in dec)
    extra = sum(recompute_flops_per_token(cfg, i, mode, seq_len) for i in dec)
    rec = extra / fwd               # recomputed forward FLOPs over the forward's
    B = 2.0 + rec                   # a stage's full backward in units of its forward, recompute included
    bubble = sched.bubble_fraction(pp, m, F=1.0, B=B, W=1.0) if pp > 1 else 0.0
    return LayoutMemory(
        layout=dataclasses.asdict(layout), precision={**dataclasses.asdict(prec),
                                                      "bytes_per_param": prec.bytes_per_param},
        gpus=layout.gpus, stage=r, stage_layers=[i for i in layers if i < cfg.num_hidden_layers], stage_holds=holds,
        params_per_gpu=params, total_bytes=total, activation_bytes_per_token=act_all,
        tokens_in_flight=in_flight,
        schedule={"name": sched.name if pp > 1 else "none", "torch_class": sched.torch_class if pp > 1 else None,
                  "stages": n_stages, "stages_per_rank": len(sched.stages_of_rank(pp, 0)) if pp > 1 else 1,
                  "param_copies": sched.param_copies if pp > 1 else 1, "micro_batches": m,
                  "bubble_formula": sched.bubble_formula if pp > 1 else "0",
                  "bubble_fraction": bubble, "about": sched.about if pp > 1 else "no pipeline"},
        recompute={"mode": mode, "about": RECOMPUTE_MODES[mode],
                   "recomputed_kinds": recomputed_kinds(cfg, dec, mode, **kw),
                   "recompute_flops_fraction": rec,
                   "step_time_factor": (3.0 + rec) / 3.0},
        activation_kinds_bytes=kinds, stage_totals_bytes=[x[0] for x in results],
        hbm_bytes=None if gpu is None else gpu.hbm_bytes,
        estimate_only=trainer_refusal(cfg, layout) or schedule_refusal(layout),
        fits=None if gpu is None else total <= gpu.hbm_bytes, **parts)
