"""Scale-out on PyTorch's own runtime: torchrun, ``torch.distributed``, FSDP2, expert and pipeline parallelism.

nanoseek has no launcher of its own. ``torchrun --nproc_per_node N -m nanoseek pretrain ...``
(or ``sft``, ``dpo``, ``grpo``) starts N copies of the ordinary command; each finds ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in its environment, and
:func:`init_distributed` joins the process group (NCCL on CUDA, gloo on CPU, or ``[parallel]
backend``). Without those variables (or with ``WORLD_SIZE=1``) nothing here does anything and a
run is exactly the single-process one.

The trainer (``loop.py``) owns one :class:`ParallelRuntime` and asks it, at fixed points of a
step, for what differs between one process and many; everything is a no-op in one process:

* **Data parallel.** Every rank holds a replica and trains on its own slice of each global
  batch: pre-training's loaders take ``rank``/``world_size`` and read disjoint rows
  (``micro_batch_size`` is per rank, the global batch is ``micro_batch_size x grad_accum x
  world``); for a task whose data is not rank-aware (SFT, DPO) the trainer draws the whole
  step's micro-batches on every rank and each keeps every ``world``-th. After the backward
  passes the gradients are all-reduced in buckets (:meth:`reduce_gradients`): averaged for a
  task whose loss is a mean over micro-batches, summed for one that normalised each micro-batch
  by the global step already (GRPO's ``micro_batch_reduction = "sum"``). The logged loss is
  the same reduction over ranks, other metrics the mean, ``tokens`` the sum. Gradient clipping
  uses the global norm. Only rank 0 writes metrics, checkpoints and the progress bar.
* **FSDP2** (``[parallel] fsdp = true``): ``fully_shard`` on every decoder layer (MTP's too) and
  on the root, over all ranks: weights, gradients and AdamW moments are sharded DTensors;
  FSDP reduce-scatters the gradients in the backward, synchronising only on the last
  micro-batch of a step. Muon (``[optim] optimizer = "muon"``) is refused with FSDP: it
  orthogonalises whole matrices, which a shard is not; it works with data and expert
  parallelism (each rank holds whole expert matrices; its momentum is gathered like a moment).
* **Expert parallel** (``[parallel] ep = k``): the ranks form ``world / k`` groups of ``k``
  consecutive ranks; in each group the routed experts of every MoE layer are split ``E / k``
  per rank and tokens travel with ``all_to_all`` (``nanoseek/model/expert_parallel.py``).
  Expert gradients are all-reduced only over the ranks holding the same experts (the
  ``world / k`` "expert data parallel" replicas); the gate, the shared experts and attention
  stay data parallel. With FSDP as well, the experts are left out of ``fully_shard``
  (``ignored_params``): EP shards them already.
* **Aux-loss-free balancing**: :meth:`load_reduce` all-reduces each MoE layer's expert load,
  so the bias update sees the load of the whole global batch and every rank keeps identical
  biases (``ExpertBalanceHook`` gets it automatically).
* **Checkpoints**: every rank takes part in gathering the full state (FSDP shards with
  ``full_tensor``, expert shards with an all-gather over the EP group), rank 0 writes the same
  HF-format checkpoint a 1-rank run writes (and the full AdamW moments, keyed like a 1-rank
  optimizer's), the others wait at a barrier. Loading reads the full checkpoint on every rank
  and each keeps its shard, so a checkpoint moves between any world sizes, EP sizes and FSDP
  settings (resharding on load). Multi-node runs need the run folder on a shared file system.
* **Pipeline parallel** (``[parallel] pp = N``, ``schedule``; ``pipeline.py``): the device mesh
  is ``(pp, dp)`` with dp = world / pp (rank = pp_index x dp + dp_index) and, with EP,
  ``(pp, dp / ep, ep)``: expert parallelism runs inside each stage's dp ranks exactly as above.
  Each rank keeps only its stages' modules (decoder-layer slices; the embedding on the first
  stage, norm, head and MTP on the last) under the full model's parameter names, and a torch
  schedule (1F1B, GPipe, interleaved 1F1B, ZBV, DualPipeV) runs the step's ``grad_accum``
  micro-batches: :meth:`forward_backward` is the trainer's hook (None without pipelining, where
  the trainer runs its micro-batches itself). Data: the ranks of one pipeline read the same
  rows (:func:`data_rank_world`). Gradients are reduced over the stage's dp group (experts over
  their ``edp`` group); when a loop-style schedule puts MTP (or tied embeddings) on another rank
  than the embedding, the last rank holds a replica whose gradient is summed with the first's.
  The bias update reduces each layer's load over its stage's dp group; the logged loss is the
  sum of the stages' parts (the last stage's CE + MTP, every stage's balance loss) over the
  pipeline, averaged over dp; MaxVio and bias ranges are gathered from every stage
  (:meth:`layer_rows`); validation runs the stages in order (:meth:`eval_model`). Checkpoints:
  every stage's first replica sends its gathered tensors to rank 0, which writes the 1-rank
  checkpoint; optimizer moments are mapped by parameter name to a 1-rank optimizer's order (built
  on a meta-device model), so a checkpoint moves between any pp / ep / dp layouts and one process.
* **Lockstep**: ranks must agree on when to stop; each step all-reduces (max) the wall clock
  and the stop flag (Ctrl-C / SIGTERM on any rank stops all after the same step).

Simplifications, on purpose: gradients of plain data parallel are reduced after the backward,
not overlapped with it (use FSDP on GPUs for overlap); the full state is materialised on every
rank when saving (rank 0 holds the whole model then: fine up to a few billion parameters, not
for a 671B model, which would want ``torch.distributed.checkpoint``); no tensor parallelism
(DeepSeek-V3 used none). Pipelining composes with DP and EP, not with FSDP (refused in one
line), runs the pre-training objective (a task with ``lm_batch``; SFT/DPO/GRPO use pp = 1) and
DeepSeek-V3 models (not V3.2's indexer training or V4).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .config import ParallelSection

BUCKET_BYTES = 32 * 1024 * 1024       # gradients are all-reduced in buckets of about this size


# ---------------------------------------------------------------------------- the process group
def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (0 when absent): the GPU this process uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def data_rank_world(parallel: ParallelSection | None = None) -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel size): which rows of each global batch it
    reads. Without pipelining every rank is a replica; with ``[parallel] pp`` the ranks of one
    pipeline (rank = pp_index x dp + dp_index) read the same rows."""
    rank, world = rank_world()
    pp = parallel.pp if parallel is not None and world > 1 else 1    # one process: the runtime refuses pp > 1
    if world % pp:
        raise ConfigError(f"[parallel] pp = {pp} must divide the number of processes ({world})")
    return rank % (world // pp), world // pp


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank_world()[0] == 0


def init_distributed(parallel: ParallelSection | None = None,
                     device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the torchrun process group if the environment says there is one; returns (rank, world).

    Idempotent. The backend is ``[parallel] backend``; "auto" picks NCCL when this process
    trains on CUDA and gloo otherwise. With NCCL the process's GPU is ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return rank_world()
    if env_world_size() <= 1:
        return 0, 1
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    parallel = parallel or ParallelSection()
    dev = torch.device(device) if device is not None and str(device) != "auto" else None
    cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("[parallel] backend = 'nccl' needs CUDA GPUs; use 'gloo' (or 'auto') on CPUs")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(minutes=parallel.timeout_minutes))
    return rank_world()


def _coalesced(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective(flat)`` in place over ``tensors`` concatenated into buckets of one dtype
    and device (about BUCKET_BYTES each), and copy the results back."""
    buckets: dict[tuple, list[tuple[list[torch.Tensor], int]]] = {}
    for t in tensors:
        lists = buckets.setdefault((t.dtype, t.device), [([], 0)])
        nbytes = t.numel() * t.element_size()
        if lists[-1][0] and lists[-1][1] + nbytes > BUCKET_BYTES:
            lists.append(([], 0))
        lists[-1] = (lists[-1][0] + [t], lists[-1][1] + nbytes)
    for lists in buckets.values():
        for bucket, _ in lists:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            collective(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _all_reduce_coalesced(tensors: list[torch.Tensor], group=None) -> None:
    """Sum ``tensors`` over ``group`` in place, in buckets."""
    _coalesced(tensors, lambda flat: dist.all_reduce(flat, group=group))


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def all_reduce_values(values: list[float], op: str = "sum", device: torch.device | str = "cpu") -> list[float]:
    """``values`` reduced ("sum" or "max") over all ranks; themselves in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------- the runtime
class ParallelRuntime:
    """What the trainer asks of the distributed runtime; see the module docstring.

    ``ParallelRuntime(parallel, device)`` joins the process group when torchrun started this
    process; ``active`` is False in a single process and every method is then a no-op (or the
    single-device function it stands for), so the trainer has one code path.
    """

    def __init__(self, parallel: ParallelSection | None = None, device: torch.device | str = "cpu"):
        self.cfg = parallel or ParallelSection()
        self.device = torch.device(device)
        self.rank, self.world_size = init_distributed(self.cfg, self.device)
        self.active = self.world_size > 1
        self.is_main = self.rank == 0
        self.ep, self.fsdp, self.pp = self.cfg.ep, self.cfg.fsdp, self.cfg.pp
        if not self.active and (self.ep > 1 or self.fsdp or self.pp > 1):
            raise ConfigError(f"[parallel] pp = {self.pp}, ep = {self.ep}, fsdp = {str(self.fsdp).lower()} need several "
                              "processes: launch with torchrun --nproc_per_node N, or set --set parallel.pp=1 "
                              "--set parallel.ep=1 --set parallel.fsdp=false for one process")
        if self.active and self.world_size % self.pp:
            raise ConfigError(f"[parallel] pp = {self.pp} must divide the number of processes ({self.world_size})")
        self.dp = self.world_size // self.pp                  # data-parallel replicas of every stage
        if self.active and self.dp % self.ep:
            raise ConfigError(f"[parallel] ep = {self.ep} must divide the number of processes per pipeline stage "
                              f"({self.world_size} / pp {self.pp} = {self.dp})")
        self.dp_rank = self.rank % self.dp
        self.pipe = None                                       # pipeline.PipelineParallel when pp > 1
        self.dp_group = self.emb_group = None                  # pp > 1: this stage's replicas; first+last stage
        self.ep_group = self.edp_group = None
        self.fsdp_mesh = None
        self.expert_modules: dict[str, nn.Module] = {}      # qualified name -> ExpertParallelExperts
        self._expert_of: dict[int, nn.Module] = {}           # id(param) -> its ExpertParallelExperts
        self.params: list[nn.Parameter] = []
        self._shared: set[int] = set()                        # ids of parameters also held by another stage
        self._build_optimizer = None

    # ------------------------------------------------------------------ setup
    def describe(self) -> dict[str, Any]:
        """Fields for the run's start event."""
        if not self.active:
            return {}
        out = {"world_size": self.world_size, "ep": self.ep, "fsdp": self.fsdp, "backend": dist.get_backend()}
        if self.pp > 1:
            out.update(pp=self.pp, dp=self.dp, schedule=self.cfg.schedule, stages=self.pipe.S)
        return out

    def parallelize(self, model: nn.Module, task: Any = None) -> nn.Module:
        """Make every replica rank 0's, then apply EP and FSDP (in that order); returns the model.

        Call on the full model, already on its device, before the optimizer is built.
        """
        if not self.active:
            self.params = [p for p in model.parameters() if p.requires_grad]
            return model
        if (self.ep > 1 or self.fsdp) and getattr(task, "independent_forwards", False):
            raise ConfigError(f"{type(task).__name__} runs a different number of forward passes on each rank "
                              "(rollouts), which collective EP/FSDP forwards cannot do: use plain data parallel "
                              "([parallel] ep = 1, fsdp = false)")
        self._broadcast_state(model)
        from torch.distributed.device_mesh import init_device_mesh
        if self.pp > 1:
            return self._parallelize_pipeline(model, task)
        if self.ep > 1:
            from ..model.expert_parallel import apply_expert_parallel, expert_parallel_modules
            mesh = init_device_mesh(self.device.type, (self.world_size // self.ep, self.ep),
                                    mesh_dim_names=("edp", "ep"))
            self.ep_group, self.edp_group = mesh.get_group("ep"), mesh.get_group("edp")
            apply_expert_parallel(model, self.ep_group)
            self.expert_modules = expert_parallel_modules(model)
            self._expert_of = {id(p): m for m in self.expert_modules.values() for p in m.parameters()}
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            from ..model.transformer import DecoderLayer
            self.fsdp_mesh = init_device_mesh(self.device.type, (self.world_size,))
            ignored = {p for m in self.expert_modules.values() for p in m.parameters()} or None
            for block in [m for m in model.modules() if isinstance(m, DecoderLayer)]:
                fully_shard(block, mesh=self.fsdp_mesh, ignored_params=ignored)
            fully_shard(model, mesh=self.fsdp_mesh, ignored_params=ignored)
        self.params = [p for p in model.parameters() if p.requires_grad]
        return model

    def _parallelize_pipeline(self, model: nn.Module, task: Any) -> nn.Module:
        """pp > 1: the mesh (pp, dp) (and (pp, dp/ep, ep) for EP), this rank's stages, EP inside them."""
        from torch.distributed.device_mesh import init_device_mesh

        from .pipeline import PipelineParallel
        if self.fsdp:
            raise ConfigError("[parallel] pp > 1 with fsdp = true is not supported: pipeline stages are data "
                              "parallel (with expert parallelism inside); set fsdp = false")
        if getattr(task, "independent_forwards", False):
            raise ConfigError(f"{type(task).__name__} runs a different number of forward passes on each rank "
                              "(rollouts), which a pipeline schedule cannot do: use pp = 1")
        mesh = init_device_mesh(self.device.type, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))
        pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        pp_rank = self.rank // self.dp
        pp_ranks = [p * self.dp + self.dp_rank for p in range(self.pp)]
        self.pipe = PipelineParallel(self.cfg.schedule, self.pp, pp_rank, pp_group, pp_ranks, self.device)
        self.pipe.split(model, task)
        if self.pipe.shares_embedding:        # first and last stage both hold the embedding: one group per replica
            for d in range(self.dp):
                ranks = sorted({self.pipe.first_rank * self.dp + d, self.pipe.last_rank * self.dp + d})
                group = dist.new_group(ranks)
                if d == self.dp_rank:
                    self.emb_group = group
        if self.ep > 1:
            from ..model.expert_parallel import apply_expert_parallel, expert_parallel_modules
            emesh = init_device_mesh(self.device.type, (self.pp, self.dp // self.ep, self.ep),
                                     mesh_dim_names=("pp", "edp", "ep"))
            self.ep_group, self.edp_group = emesh.get_group("ep"), emesh.get_group("edp")
            apply_expert_parallel(model, self.ep_group)
            self.expert_modules = expert_parallel_modules(model)
            self._expert_of = {id(p): m for m in self.expert_modules.values() for p in m.parameters()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        emb = model.model.embed_tokens
        self._shared = {id(emb.weight)} if self.emb_group is not None and emb is not None else set()
        return model

    def forward_backward(self, task: Any, model: nn.Module, micro: list[Any], scale: float,
                         autocast) -> tuple[float, dict[str, float], dict[str, int]] | None:
        """pp > 1: the step's forward and backward passes, run by the pipeline schedule (None
        otherwise: the trainer runs its micro-batches itself). Returns this rank's share of the
        objective summed over micro-batches, metric sums and counts (see pipeline.py)."""
        if self.pipe is None:
            return None
        with autocast():
            return self.pipe.forward_backward([task.lm_batch(mb) for mb in micro], scale)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """What a task's ``evaluate`` is given: the model, or under pp > 1 a stand-in that runs the stages."""
        if self.pipe is None:
            return model
        from .pipeline import PipelineEvalModel
        return PipelineEvalModel(self.pipe, model)

    def layer_rows(self, model: nn.Module, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Per-MoE-layer rows (load, bias) of the local layers -> the whole model's, in layer order
        (pp > 1: gathered over the pipeline; collective); ``rows`` itself otherwise."""
        if self.pipe is None:
            return rows
        ids = self.pipe.moe_layer_ids(model)
        got: list = [None] * self.pp
        dist.all_gather_object(got, (ids, None if rows is None else rows.detach().cpu()), group=self.pipe.group)
        pairs = sorted((i, r[k]) for ids_, r in got if r is not None for k, i in enumerate(ids_))
        return torch.stack([r for _, r in pairs]).to(self.device) if pairs else None

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer, build=None) -> torch.optim.Optimizer:
        """FSDP with EP mixes DTensor (FSDP) and plain (expert) parameters in one AdamW group,
        which the foreach kernels refuse: fall back to the per-parameter loop there. ``build``
        (model -> optimizer, the trainer's builder) lets pp > 1 write and read optimizer states
        in a 1-rank optimizer's order."""
        self._build_optimizer = build
        if self.fsdp and self.ep > 1 and self.active:
            for group in optimizer.param_groups:
                group["foreach"] = False
        return optimizer

    @torch.no_grad()
    def _broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's weights and persistent buffers on every rank (replicas start identical)."""
        seen, tensors = set(), []
        for t in model.state_dict().values():
            if id(t) not in seen and t.numel():
                seen.add(id(t))
                tensors.append(t)
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))

    # ------------------------------------------------------------------ data
    def stride(self, task: Any) -> int:
        """Ranks sharing one batch stream: 1 when the task reads its own rank's data
        (``task.rank_sharded``), else the world size (each rank keeps every world-th micro-batch)."""
        return 1 if not self.active or getattr(task, "rank_sharded", False) else self.dp

    def local_share(self, items: list[Any], stride: int, reduction: str) -> list[Any]:
        """This rank's micro-batches of a step all ranks drew alike."""
        if stride == 1:
            return items
        if reduction == "mean" and len(items) % stride:
            raise ValueError(f"a step of {len(items)} micro-batches cannot be split evenly over {stride} ranks, "
                             "which a mean over micro-batches needs; make the count a multiple of the world size")
        return items[self.dp_rank::stride]

    # ------------------------------------------------------------------ gradients
    def set_gradient_sync(self, model: nn.Module, last: bool) -> None:
        """FSDP: reduce-scatter gradients only in the backward of a step's last micro-batch."""
        if self.fsdp and self.active:
            model.set_requires_gradient_sync(last)

    @torch.no_grad()
    def reduce_gradients(self, reduction: str) -> None:
        """After all backward passes of a step: the gradient of the global loss on every rank.

        ``reduction`` "mean": the global loss is the mean of the ranks' losses; "sum": their sum.
        Replicated parameters are all-reduced over all ranks; expert shards over the ranks that
        hold the same experts, where each already holds the sum over its EP group's tokens; FSDP
        shards were reduce-scattered (averaged) by FSDP in the backward.
        """
        if not self.active:
            return
        factor = 1.0 / self.dp if reduction == "mean" else 1.0
        plain = [p for p in self.params if not _is_dtensor(p)]
        # a parameter gets a gradient everywhere if it got one anywhere (as in one process); under
        # pp > 1 "everywhere" is the stage's replicas (the dp group), which hold the same parameters
        has = torch.tensor([float(p.grad is not None) for p in plain], device=self.device)
        if len(plain):
            dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.dp_group)
        for p, h in zip(plain, has.tolist()):
            if (h or id(p) in self._shared) and p.grad is None:
                p.grad = torch.zeros_like(p)
        dense = [p.grad for p in plain if p.grad is not None and id(p) not in self._expert_of]
        experts = [p.grad for p in plain if p.grad is not None and id(p) in self._expert_of]
        if self.dp > 1:
            _all_reduce_coalesced(dense, group=self.dp_group)
        if experts and self.dp > self.ep:
            _all_reduce_coalesced(experts, group=self.edp_group)
        shared = [p.grad for p in plain if id(p) in self._shared]
        if shared:                                        # the embedding's two stages: their gradients add
            _all_reduce_coalesced(shared, group=self.emb_group)
        for g in dense + experts:
            g.mul_(factor)
        if reduction == "sum" and self.fsdp:              # FSDP averaged over the world: make it the sum
            for p in self.params:
                if _is_dtensor(p) and p.grad is not None:
                    p.grad.mul_(self.world_size)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the global gradient norm (every shard counted once); returns the norm before."""
        if not self.active:
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)    # FSDP shards and expert shards
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = []
        for p in self.params:
            if p.grad is None:
                continue
            grads.append(p.grad)
            if _is_dtensor(p.grad):
                sharded += p.grad.to_local().double().pow(2).sum()
            elif id(p) in self._expert_of:               # one copy per dp/ep replica group
                sharded += p.grad.double().pow(2).sum() * self.ep / self.dp
            elif self.pipe is not None:                  # a stage's own: one copy per dp replica (two stages: 2)
                sharded += p.grad.double().pow(2).sum() / (self.dp * (2 if id(p) in self._shared else 1))
            else:
                replicated += p.grad.double().pow(2).sum()
        dist.all_reduce(sharded)
        total = float((sharded + replicated).sqrt())
        coef = min(max_norm / (total + 1e-6), 1.0)
        for g in grads:
            g.mul_(coef)
        return total

    # ------------------------------------------------------------------ metrics and lockstep
    def reduce_step(self, loss: float, sums: dict[str, float], counts: dict[str, int],
                    reduction: str) -> tuple[float, dict[str, float], dict[str, int]]:
        """The step's loss and metrics over all ranks: loss mean (or sum), metrics mean, tokens sum.

        Every rank must report the same metric names. Returns (loss, sums, counts) such that
        ``sums[k] / counts[k]`` is the global value and ``sums["tokens"]`` the global token count.
        """
        if not self.active:
            return loss, sums, counts
        keys = sorted(sums)
        vals = [loss] + [sums[k] if k == "tokens" else sums[k] / counts[k] for k in keys]
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        out = t.tolist()
        W = self.dp              # pp > 1: the stages of a pipeline report parts of one replica's figures
        loss = out[0] / W if reduction == "mean" else out[0]
        new = {k: (v if k == "tokens" else v / W) for k, v in zip(keys, out[1:])}
        return loss, new, {k: 1 for k in keys}

    def load_reduce(self, load: torch.Tensor) -> torch.Tensor:
        """An MoE layer's expert load summed over all ranks (the bias update's ``load_reduce``)."""
        if self.active:
            load = load.clone()
            dist.all_reduce(load, group=self.dp_group)     # pp > 1: the layer's stage replicas
        return load

    def sync(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """Agree on the clock (the slowest rank's) and on stopping (any rank's request)."""
        if not self.active:
            return elapsed, stop
        t = torch.tensor([elapsed, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]), bool(t[1] > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _sharded(self) -> bool:
        return self.active and (self.ep > 1 or self.fsdp or self.pp > 1)

    def _gather_stages(self, mine: dict[str, Any]) -> dict[str, Any] | None:
        """pp > 1: the union on rank 0 of the dicts of every stage's first replica (collective)."""
        got: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine if self.dp_rank == 0 else None, got, dst=0)
        if not self.is_main:
            return None
        out: dict[str, Any] = {}
        for part in got:
            out.update(part or {})
        return out

    def _reference_order(self, model: nn.Module) -> tuple[list[str], list[dict[str, Any]]]:
        """pp > 1: the parameter names in a 1-rank optimizer's order, and its param_groups (built
        on a meta-device full model by the trainer's optimizer builder)."""
        from ..model.transformer import DeepseekV3ForCausalLM
        if self._build_optimizer is None:
            raise RuntimeError("pp > 1 needs adapt_optimizer(optimizer, build) to map optimizer states")
        with torch.device("meta"):
            full = DeepseekV3ForCausalLM(model.config, init_weights=False)
        names = {id(p): n for n, p in full.named_parameters()}
        ref = self._build_optimizer(full)
        return [names[id(p)] for g in ref.param_groups for p in g["params"]], ref.state_dict()["param_groups"]

    def _expert_module_of_name(self, name: str):
        module, _, _ = name.rpartition(".")
        return self.expert_modules.get(module)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The 1-rank state dict (full tensors, on the CPU) on rank 0, None elsewhere (collective)."""
        from ..model.expert_parallel import gather_experts
        out = {}
        for name, t in model.state_dict().items():
            mod = self._expert_module_of_name(name)
            if _is_dtensor(t):
                t = t.full_tensor()
            elif mod is not None:
                t = gather_experts(t, mod)
            if self.is_main or (self.pipe is not None and self.dp_rank == 0):
                out[name] = t.detach().cpu()
        if self.pipe is not None:
            return self._gather_stages(out)
        return out if self.is_main else None

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """A full single-device model to save on rank 0 (None elsewhere); the model itself when
        not sharded. Sharded: the gathered tensors assigned into a model built on the meta device."""
        if not self._sharded():
            return model if self.is_main else None
        state = self.full_state_dict(model)
        if not self.is_main:
            return None
        from ..model.transformer import DeepseekV3ForCausalLM
        with torch.device("meta"):
            full = DeepseekV3ForCausalLM(model.config, init_weights=False)
        full.load_state_dict(state, strict=True, assign=True)
        full.use_mtp = getattr(model, "use_mtp", full.use_mtp)
        return full

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's state as a 1-rank run has it (full moments), on rank 0 (collective)."""
        sd = optimizer.state_dict()
        if not self._sharded():
            return sd
        from ..model.expert_parallel import gather_experts
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):
            st = sd["state"].get(i)
            if st is None:
                continue
            new = {}
            for k, v in st.items():
                if _is_dtensor(v):
                    v = v.full_tensor()
                elif id(p) in self._expert_of and torch.is_tensor(v) and v.shape == p.shape:
                    v = gather_experts(v, self._expert_of[id(p)])
                new[k] = v.cpu() if torch.is_tensor(v) else v
            state[i] = new
        if self.pipe is not None:             # by name over the stages, then in a 1-rank optimizer's order
            names = {id(p): n for n, p in model.named_parameters()}
            merged = self._gather_stages({names[id(params[i])]: st for i, st in state.items()})
            if not self.is_main:
                return None
            order, groups = self._reference_order(model)
            mine = {g.get("name"): g for g in sd["param_groups"]}
            groups = [{**g, **{k: v for k, v in mine.get(g.get("name"), {}).items() if k != "params"}}
                      for g in groups]
            return {"state": {i: merged[n] for i, n in enumerate(order) if n in merged}, "param_groups": groups}
        return {"state": state, "param_groups": sd["param_groups"]} if self.is_main else None

    @torch.no_grad()
    def load_full_state_dict(self, model: nn.Module, full: dict[str, torch.Tensor], source: str = "state") -> None:
        """Copy a full (1-rank) state dict into this rank's shards of ``model``, strictly."""
        from torch.distributed.tensor import distribute_tensor

        from ..model.expert_parallel import shard_experts
        from .checkpoint import CheckpointError
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
        if self.pipe is not None:             # the other stages' tensors are theirs
            unexpected = []
        if missing or unexpected:
            raise CheckpointError(f"{source}: the weights do not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for name, cur in own.items():
            src = full[name]
            mod = self._expert_module_of_name(name)
            if mod is not None:
                src = shard_experts(src, mod, f"{source}: {name}")
            if _is_dtensor(cur):
                if tuple(src.shape) != tuple(cur.shape):
                    raise CheckpointError(f"{source}: {name} has shape {tuple(src.shape)}, "
                                          f"the model {tuple(cur.shape)}")
                src = distribute_tensor(src.to(cur.device, cur.dtype), cur.device_mesh, cur.placements)
                cur.to_local().copy_(src.to_local())
            else:
                if tuple(src.shape) != tuple(cur.shape):
                    raise CheckpointError(f"{source}: {name} has shape {tuple(src.shape)}, this rank's "
                                          f"{'shard' if mod is not None else 'tensor'} {tuple(cur.shape)}")
                cur.copy_(src)

    def load_model_weights(self, model: nn.Module, ckpt: str | Path) -> None:
        """An HF-format checkpoint (from any world size) into this rank's part of ``model``."""
        from .checkpoint import load_model_weights
        if not self._sharded():
            load_model_weights(model, ckpt)
            return
        from ..model.checkpoint import from_hf_state_dict, load_hf_tensors
        state = from_hf_state_dict(load_hf_tensors(ckpt, model.config), model.config)
        if model.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.load_full_state_dict(model, state, str(ckpt))

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """A full (1-rank layout) optimizer state into this rank's optimizer, sharding the moments."""
        if not self._sharded():
            optimizer.load_state_dict(sd)
            return
        from torch.distributed.tensor import distribute_tensor

        from ..model.expert_parallel import shard_experts
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = {int(i): st for i, st in sd["state"].items()}
        if self.pipe is not None:             # a 1-rank optimizer's order -> this stage's
            order, _ = self._reference_order(model)
            index = {n: i for i, n in enumerate(order)}
            saved = {j: saved[index[names[id(p)]]] for j, p in enumerate(params) if index[names[id(p)]] in saved}
            by_name = {g.get("name"): g for g in sd["param_groups"]}
            own = optimizer.state_dict()["param_groups"]
            sd = {"param_groups": [{**g, **{k: v for k, v in by_name.get(g.get("name"), {}).items() if k != "params"}}
                                   for g in own]}
        state = {}
        for i, st in saved.items():
            p = params[int(i)]
            new = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if _is_dtensor(p):
                        v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                    elif id(p) in self._expert_of:
                        v = shard_experts(v, self._expert_of[id(p)], f"optimizer state {k} of {names.get(id(p))}")
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"optimizer state {k} of {names.get(id(p), i)} has shape {tuple(v.shape)}, "
                                         f"the parameter {tuple(p.shape)}")
                new[k] = v
            state[int(i)] = new
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


__all__ = ["ParallelRuntime", "init_distributed", "rank_world", "data_rank_world", "is_main", "local_rank", "env_world_size",
           "all_reduce_values",
           "BUCKET_BYTES"]
