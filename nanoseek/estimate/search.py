"""``nanoseek estimate --layouts``: the parallel layouts that fit a GPU, fastest first.

For a GPU count, tries every pipeline size ``pp`` (a divisor of the GPUs that leaves each stage at
least one layer), every expert-parallel size ``ep`` (a divisor of ``dp = GPUs / pp`` and of the
expert count; past one node, a multiple of the node's GPUs, as :mod:`.comm` requires), every
schedule of :data:`.pipeline.SCHEDULES` (only ``1f1b`` stands for "no pipeline" at ``pp = 1``) and
every recompute mode, at the ZeRO stage, precision and micro-batch given, and keeps those whose
heaviest rank fits in HBM (:func:`.memory.estimate_for_layout`).

They are ranked by a *time factor*: the step time relative to the same compute with no bubble
and no recomputation, ``(1 + recomputed FLOPs / (3 x forward FLOPs)) / (1 - bubble fraction)``,
then by memory. What it does not weigh: communication (the all-to-all of a larger ``ep`` crossing
nodes, the pipeline's point-to-point sends, ZeRO-3's all-gathers; :mod:`.comm` prices the
all-to-all for one layout) and the efficiency of small GEMMs; so read the ranking as "what the
bubble and recomputation cost", and check the chosen layout's all-to-all with a plain estimate.

Layouts nanoseek cannot run (a schedule torch lacks, or one its trainer refuses: pipeline stages
under FSDP or for V3.2 / V4, recomputation for V4; :func:`.memory.trainer_refusal`) are kept,
with the reason in ``estimate_only``, and marked in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from .flops import DEFAULT_SEQ_LEN, EstimateError
from .gpus import GPUSpec
from .activations import RECOMPUTE_MODES
from .memory import Layout, estimate_for_layout
from .pipeline import DEFAULT_SCHEDULE, SCHEDULES


@dataclass
class LayoutFit:
    dp: int
    pp: int
    ep: int
    schedule: str                # "none" at pp = 1
    recompute: str
    micro_batches: int
    total_bytes: float
    activations_bytes: float
    bubble_fraction: float
    recompute_flops_fraction: float
    time_factor: float          # (1 + recompute / 3) / (1 - bubble)
    heaviest_rank: int
    estimate_only: str | None = None    # why nanoseek cannot run it (memory.trainer_refusal / schedule_refusal)


def _ep_sizes(cfg: ModelConfig, dp: int, gpus_per_node: int) -> list[int]:
    if not cfg.n_routed_experts or not cfg.num_moe_layers:
        return [1]
    return [e for e in range(1, dp + 1)
            if dp % e == 0 and cfg.n_routed_experts % e == 0 and (e <= gpus_per_node or e % gpus_per_node == 0)]


def search_layouts(cfg: ModelConfig, gpu: GPUSpec, gpus: int, *, zero: int = 1, precision: str = "bf16",
                   micro_batch: int = 1, micro_batches: int | None = None,
                   seq_len: int = DEFAULT_SEQ_LEN, include_mtp: bool = True,
                   limit: int | None = None) -> list[LayoutFit]:
    """Every layout of ``gpus`` GPUs that fits ``gpu``'s HBM, fastest first (see the docstring)."""
    if gpus < 1:
        raise EstimateError(f"the GPU count must be >= 1, got {gpus}")
    modes = list(RECOMPUTE_MODES)
    if getattr(cfg, "activation_elements", None) is not None:
        modes.remove("selective")           # no per-tensor breakdown for this family
    found: list[LayoutFit] = []
    for pp in (p for p in range(1, gpus + 1) if gpus % p == 0 and p <= cfg.num_hidden_layers):
        dp = gpus // pp
        for sched in (SCHEDULES.values() if pp > 1 else [SCHEDULES[DEFAULT_SCHEDULE]]):
            if pp > 1 and sched.stages(pp) > cfg.num_hidden_layers:
                continue
            for ep in _ep_sizes(cfg, dp, gpu.gpus_per_node):
                for mode in modes:
                    lay = Layout(dp=dp, pp=pp, ep=ep, zero=zero, micro_batch=micro_batch, recompute=mode,
                                 schedule=sched.name, micro_batches=micro_batches if pp > 1 else 1)
                    try:
                        mem = estimate_for_layout(cfg, lay, precision, seq_len=seq_len, gpu=gpu,
                                                  include_mtp=include_mtp)
                    except EstimateError:       # e.g. too few micro-batches for this schedule
                        continue
                    if not mem.fits:
                        continue
                    bubble = mem.schedule["bubble_fraction"]
                    rec = mem.recompute["recompute_flops_fraction"]
                    found.append(LayoutFit(
                        dp=dp, pp=pp, ep=ep, schedule=mem.schedule["name"], recompute=mode,
                        micro_batches=lay.micro_batches, total_bytes=mem.total_bytes,
                        activations_bytes=mem.activations_bytes, bubble_fraction=bubble,
                        recompute_flops_fraction=rec, time_factor=(1 + rec / 3) / (1 - bubble),
                        heaviest_rank=mem.stage, estimate_only=mem.estimate_only))
    found.sort(key=lambda f: (round(f.time_factor, 4), f.total_bytes))
    return found[:limit] if limit else found
