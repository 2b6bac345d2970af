"""Pipeline parallelism on ``torch.distributed.pipelining``: the model cut into stages by decoder layers.

``[parallel] pp = N`` splits the ranks of a torchrun launch into N pipeline ranks (the outer
dimension of the device mesh ``(pp, dp)``; rank = pp_index x dp + dp_index, expert parallelism
inside dp as without pipelining). ``[parallel] schedule`` names a torch schedule in
:data:`SCHEDULES`; it says how many stages each rank holds (1 for 1F1B and GPipe, 2 for the
interleaved and the V-shaped schedules) and so the number of stages S = pp x stages per rank.
The micro-batches of the schedule are the step's ``[optim] grad_accum`` micro-batches (one
setting, as without pipelining): the step's micro-batches are concatenated and the schedule
cuts them apart again.

**The split.** The model code stays single-device. :func:`stage_layers` gives each stage a
contiguous slice of the decoder layers (earlier stages take the remainder); :class:`StageModule`
wraps the modules of one stage: the embedding on the first, the final norm, the head, the MTP
modules and the loss on the last. :func:`keep_local` then drops from the model every module no
local stage uses, keeping the parameter names of the full model (``model.layers.5...`` stays
``model.layers.5...``), so optimizer, checkpoints and hooks see a model that is simply missing
the other ranks' parts. Stage placement: loop style (stage s on pp rank s mod pp) or, for the
V-shaped schedules (ZBV, DualPipeV), rank r holds stages r and S-1-r: the first and the last
chunk share rank 0, and MTP's shared embedding is the first stage's own. With a loop-style
schedule and MTP (or tied embeddings) the last rank keeps a replica of the embedding and its
gradient is summed with the first rank's (``distributed.py``).

**The loss.** Every stage receives the micro-batch's ``input_ids`` and ``labels`` as keyword
arguments (the schedule chunks them like the inputs), so the last stage computes the same
objective as :class:`~nanoseek.train.pretrain.PretrainTask`: CE + lambda x MTP + the MoE layers'
sequence-wise balance loss. A stage that is not the last adds its MoE layers' balance loss to
the objective through :class:`_AuxGradient` (identity forward; its backward hands the loss its
weight), which is how a loss term living on an early stage reaches the backward without
travelling. The schedule's ``loss_fn`` multiplies by 1/micro-batches (``scale_grads`` off, so a
parameter shared by two stages of one rank is scaled once). Metrics (``ce``, ``mtp_loss``,
``aux_loss``, ``tokens``) are summed per rank and reduced by the runtime; every rank reports the
same keys.

**The split backward.** ZBV and DualPipeV compute a stage's input gradient (I) and its weight
gradients (W) at different times, with torch's parameter groups. The stages are built from
:func:`_pipeline_stage_class`, which merges groups that share a parameter or a node
(:func:`merge_param_groups`) and keeps the chunk's graph through its W, so a last stage that uses
a parameter at several places (tied embeddings with MTP, several MTP modules) gets exactly the
gradients of a plain backward.

**The micro-batch rule** (:func:`check_microbatches`) is the estimate's
(:meth:`nanoseek.estimate.pipeline.Schedule.microbatch_problem`): what torch's constructors accept.
The schedule registry itself is derived from the estimate's (chunks per rank, placement).

**Evaluation** (:class:`PipelineEvalModel`) runs the stages one after another with send/recv and
broadcasts the loss and logits from the last stage, so a task's ``evaluate(model)`` works
unchanged on every rank.

**Timelines.** :func:`executed_order` returns the schedule's per-rank action order (torch's
``pipeline_order``: ``"0F1"`` = stage 0 forward of micro-batch 1; I/W: input/weight backward);
:func:`instrument` wraps a stage's forward/backward methods to report wall-clock events (every
stage does while :attr:`PipelineParallel.events` is a list), :func:`events_order` gives the order
a rank executed, :func:`chrome_trace` a trace of all ranks' events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..estimate.pipeline import SCHEDULES as ESTIMATE_SCHEDULES


# ---------------------------------------------------------------------------- the schedule registry
@dataclass(frozen=True)
class ScheduleSpec:
    """A torch schedule class by name, with its placement rule."""
    name: str
    torch_class: str            # in torch.distributed.pipelining.schedules
    stages_per_rank: int        # 1: one stage per rank; 2: two (interleaved or V)
    v_shape: bool               # rank r holds stages r and S-1-r (first and last on rank 0)

    def torch_schedule(self):
        from torch.distributed.pipelining import schedules
        return getattr(schedules, self.torch_class)


# the schedules torch ships, as the estimate describes them (one registry: chunks, placement and
# the micro-batch rule live in nanoseek.estimate.pipeline)
SCHEDULES: dict[str, ScheduleSpec] = {
    name: ScheduleSpec(name, s.torch_class, s.chunks, s.placement == "v")
    for name, s in ESTIMATE_SCHEDULES.items() if s.torch_class is not None}


def schedule_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ConfigError(f"[parallel] schedule = {name!r}: must be one of " + ", ".join(repr(k) for k in SCHEDULES))
    return SCHEDULES[name]


def check_microbatches(spec: ScheduleSpec, pp: int, n: int, count: str = "micro-batches") -> str | None:
    """Why ``n`` micro-batches cannot run under ``spec`` with ``pp`` ranks (None: they can); the
    estimate's rule (:meth:`nanoseek.estimate.pipeline.Schedule.microbatch_problem`), ``count``
    naming the setting."""
    return ESTIMATE_SCHEDULES[spec.name].microbatch_problem(pp, n, count=count, ranks="pp =")


# ---------------------------------------------------------------------------- placement
def num_stages(pp: int, spec: ScheduleSpec) -> int:
    return pp * spec.stages_per_rank


def stage_rank(stage: int, pp: int, spec: ScheduleSpec) -> int:
    """The pp rank holding ``stage``."""
    if spec.v_shape:
        S = num_stages(pp, spec)
        return stage if stage < pp else S - 1 - stage
    return stage % pp


def local_stages(pp_rank: int, pp: int, spec: ScheduleSpec) -> list[int]:
    """The stages of ``pp_rank``, ascending."""
    return sorted(s for s in range(num_stages(pp, spec)) if stage_rank(s, pp, spec) == pp_rank)


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous decoder-layer ranges of ``stages`` stages; the first ``num_layers % stages`` take one more."""
    if num_layers < stages:
        raise ConfigError(f"the model has {num_layers} decoder layers, fewer than the {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class _LocalLayers(nn.ModuleList):
    """A ModuleList holding only some layers, under their full-model indices (``"5"`` stays ``"5"``),
    so state-dict names match the full model's; iteration yields them in layer order."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i in sorted(layers):
            self.add_module(str(i), layers[i])

    def __getitem__(self, idx):                       # by full-model layer index
        return self._modules[str(idx)]


# ---------------------------------------------------------------------------- the stage modules
class _AuxGradient(torch.autograd.Function):
    """Identity on ``h``; in the backward, ``aux`` gets gradient ``scale``: an early stage's
    balance loss joins the objective with weight ``scale`` (the loss function's)."""

    @staticmethod
    def forward(ctx, h, aux, scale):
        ctx.scale = scale
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class StageModule(nn.Module):
    """One pipeline stage of a :class:`~nanoseek.model.transformer.DeepseekV3ForCausalLM`.

    ``forward(x, *, input_ids, labels)``: ``x`` is the token ids on the first stage, the hidden
    state from the previous stage elsewhere; returns the hidden state, or on the last stage the
    micro-batch's objective (CE + lambda x MTP + its balance loss). ``stats`` (a dict owned by
    the pipeline) collects the detached metrics of every forward in training mode.
    """

    def __init__(self, model: nn.Module, index: int, stages: int, layers: range, run: "PipelineParallel"):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == stages - 1
        m = model.model
        self.layers = nn.ModuleList(m.layers[i] for i in layers)
        self.rotary = m.rotary_emb
        self.embed = m.embed_tokens if self.first else None
        self.norm = m.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.mtp = m.mtp if self.last else None
        self.mtp_embed = m.embed_tokens if self.last and run.embed_on_last else None
        self._model = [model]             # not a submodule: the parameters above are the stage's
        self.run = run

    def hidden(self, x: torch.Tensor, input_ids: torch.Tensor):
        """(h after this stage's layers, cos, sin, positions, the stage's MoE balance losses)."""
        from ..model.moe import MoE
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        h = self.embed(x) if self.first else x
        for layer in self.layers:
            h = layer(h, cos, sin, positions)
        aux = [layer.mlp.aux_loss for layer in self.layers
               if isinstance(layer.mlp, MoE) and layer.mlp.aux_loss is not None]
        return h, cos, sin, positions, aux

    def forward(self, x: torch.Tensor, *, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h, cos, sin, positions, aux = self.hidden(x, input_ids)
        if not self.last:
            if aux:
                a = torch.stack(aux).sum()
                self.run.note("aux_loss", a)
                h = _AuxGradient.apply(h, a, self.run.scale)
            return h
        return self.objective(h, input_ids, labels, cos, sin, positions, aux)

    def objective(self, h, input_ids, labels, cos, sin, positions, aux) -> torch.Tensor:
        from ..model.moe import MoE
        model = self._model[0]
        h = self.norm(h)
        logits = self.lm_head(h)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss = ce
        self.run.note("ce", ce)
        self.run.note("tokens", labels.numel())
        T = input_ids.shape[1]
        if model.use_mtp and len(self.mtp) and T > len(self.mtp):
            mtp = model._mtp_loss(input_ids, labels, h, cos, sin, positions)
            aux = aux + [x.mlp.aux_loss for x in self.mtp if isinstance(x.mlp, MoE) and x.mlp.aux_loss is not None]
            if self.run.mtp_lambda > 0:
                loss = loss + self.run.mtp_lambda * mtp
                self.run.note("mtp_loss", mtp)
        if aux:
            a = torch.stack(aux).sum()
            self.run.note("aux_loss", a)
            loss = loss + a
        return loss


# ---------------------------------------------------------------------------- split backward
def merge_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """torch's parameter groups of a split (input / weight) backward, with every two groups that
    share a parameter or an intermediate node merged into one.

    ``torch.distributed.pipelining._backward.get_param_groups`` keys groups on the autograd nodes
    where a parameter's subgraph meets the input's. When a parameter meets it at several nodes
    (the head shared by the main and two MTP predictions, the tied embedding) and other parameters
    at only some of them, torch can leave it in two groups, whose weight backwards then both
    count its gradient. Merged, each parameter and each intermediate is in exactly one group;
    intermediates the input backward never reached carry no gradient and are dropped.
    """
    merged: list[tuple[set, dict]] = []                # (params, {intermediate node: its grads})
    for g in groups:
        grads = g.get("grads") or [None] * len(g["intermediates"])
        params = set(g["params"])
        inter = {n: gr for n, gr in zip(g["intermediates"], grads) if gr is not None}
        keep = []
        for p, i in merged:
            if p & params or i.keys() & inter.keys():
                params |= p
                inter.update(i)
            else:
                keep.append((p, i))
        merged = keep + [(params, inter)]
    return [{"params": p, "intermediates": list(i), "grads": list(i.values())} for p, i in merged]


def _pipeline_stage_class():
    """torch's ``PipelineStage`` with a split backward that is exact when the last stage uses a
    parameter at several places (tied embeddings with MTP, several MTP modules):
    :func:`merge_param_groups` after each input backward, and each group's weight backward run
    with the graph retained. A group's intermediates can lie below another group's (MTP's head
    projection above MTP's concatenation of the embedding), so the first group's backward walks
    through the nodes the next one still needs; torch frees them ("Trying to backward through
    the graph a second time"). The graph is dropped with the chunk's state right after its W."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining._backward import stage_backward_weight
    from torch.nn.parallel import DistributedDataParallel

    class _Stage(PipelineStage):
        def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
            if backward_type == "weight" and not isinstance(self.submod, (DistributedDataParallel, FSDPModule)):
                return stage_backward_weight(self.submod.parameters(), bwd_kwargs["param_groups"],
                                             retain_graph=True), None
            grads, groups = super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
            return grads, (merge_param_groups(groups) if backward_type == "input" and groups else groups)

    return _Stage


# ---------------------------------------------------------------------------- the rank's pipeline
class PipelineParallel:
    """This rank's stages of the model, the schedule, and the forward-backward of one step.

    Built by :class:`~nanoseek.train.distributed.ParallelRuntime` (``pp_group``: the ranks of this
    pipeline, ``pp_rank``: this rank's place in it). Call :meth:`split` on the full model (every
    rank holds it, identical) before the optimizer is built; it drops the other ranks' modules.
    """

    def __init__(self, spec_name: str, pp: int, pp_rank: int, pp_group, pp_ranks: list[int], device: torch.device):
        self.name, self.spec = spec_name, schedule_spec(spec_name)
        self.pp, self.pp_rank, self.group, self.ranks, self.device = pp, pp_rank, pp_group, pp_ranks, device
        self.S = num_stages(pp, self.spec)
        self.mine = local_stages(pp_rank, pp, self.spec)
        self.first_rank, self.last_rank = stage_rank(0, pp, self.spec), stage_rank(self.S - 1, pp, self.spec)
        self.stages: dict[int, StageModule] = {}
        self.scale, self.mtp_lambda = 1.0, 0.0
        self.embed_on_last = False
        self.hidden_size = 0
        self.metric_keys: list[str] = []
        self.stats: dict[str, float] = {}
        self._schedules: dict[tuple, Any] = {}
        self.events: list[dict] | None = None             # a list: every stage action's timing is appended

    @property
    def holds_first(self) -> bool:
        return 0 in self.mine

    @property
    def holds_last(self) -> bool:
        return self.S - 1 in self.mine

    @property
    def shares_embedding(self) -> bool:
        """The embedding lives on two pp ranks (first and last) whose gradients must be summed."""
        return self.embed_on_last and self.first_rank != self.last_rank

    def split(self, model: nn.Module, task: Any) -> nn.Module:
        from ..model.moe import MoE
        from ..model.transformer import DeepseekV3ForCausalLM
        if not isinstance(model, DeepseekV3ForCausalLM):
            raise ConfigError(f"[parallel] pp > 1 splits DeepSeek-V3 models into stages, not {type(model).__name__}")
        if not hasattr(task, "lm_batch"):
            raise ConfigError(f"[parallel] pp > 1 runs the language-model objective of pre-training; "
                              f"{type(task).__name__} has its own loss: use pp = 1 for it")
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.mtp_lambda = float(getattr(task, "mtp_lambda", 0.0))
        mtp_active = bool(model.use_mtp and len(model.model.mtp) and self.mtp_lambda > 0)
        self.embed_on_last = mtp_active or bool(cfg.tie_word_embeddings)
        moes = [x.mlp for x in list(model.model.layers) + list(model.model.mtp) if isinstance(x.mlp, MoE)]
        alpha = max((m.seq_aux_alpha for m in moes), default=0.0)
        self.metric_keys = ["ce", "tokens"] + (["mtp_loss"] if mtp_active else []) + (["aux_loss"] if alpha > 0 else [])
        ranges = stage_layers(cfg.num_hidden_layers, self.S)
        self.stages = {s: StageModule(model, s, self.S, ranges[s], self) for s in self.mine}
        keep = {i for s in self.mine for i in ranges[s]}
        m = model.model
        m.layers = _LocalLayers({i: m.layers[i] for i in keep})
        if not (self.holds_first or (self.holds_last and self.embed_on_last)):
            m.embed_tokens = None
        if not self.holds_last:
            m.norm = None
            model.lm_head = None
            m.mtp = nn.ModuleList()
        return model

    def moe_layer_ids(self, model: nn.Module) -> list[int]:
        from ..model.moe import MoE
        return [int(k) for k, x in model.model.layers._modules.items() if isinstance(x.mlp, MoE)]

    # ------------------------------------------------------------------ one step
    def note(self, key: str, value: Any) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)

    def _schedule(self, n: int, shape: tuple[int, int]):
        key = (n, shape)
        if key not in self._schedules:
            PipelineStage = _pipeline_stage_class()
            B, T = shape
            pstages = []
            for s in self.mine:
                # static shapes (no metadata pass through the real model): ids in, hidden states
                # between stages (they carry gradients), the objective out of the last
                x = (torch.empty(B, T, dtype=torch.long, device="meta") if s == 0
                     else torch.empty(B, T, self.hidden_size, device="meta", requires_grad=True))
                out = torch.empty((), device="meta", requires_grad=True) if s == self.S - 1 \
                    else torch.empty(B, T, self.hidden_size, device="meta", requires_grad=True)
                pstages.append(PipelineStage(self.stages[s], s, self.S, self.device, input_args=(x,),
                                             output_args=(out,), group=self.group))
            cls = self.spec.torch_schedule()
            loss_fn = self._loss
            sched = cls(pstages[0] if self.spec.stages_per_rank == 1 else pstages, n_microbatches=n,
                        loss_fn=loss_fn, scale_grads=False)
            for st in pstages:                       # timings go to self.events while it is a list
                instrument(st, lambda e: self.events.append(e) if self.events is not None else None)
            self._schedules[key] = sched
        return self._schedules[key]

    def gather_events(self, events: list[dict]) -> dict[int, list[dict]]:
        """{pp rank: its events} from every rank of this pipeline (collective over the pp group),
        for :func:`chrome_trace`."""
        got: list = [None] * self.pp
        dist.all_gather_object(got, events, group=self.group)
        return dict(enumerate(got))

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         scale: float) -> tuple[float, dict[str, float], dict[str, int]]:
        """Run the schedule over the step's micro-batches ``[(input_ids, labels)]`` (all of one
        shape); gradients accumulate into the local parameters scaled by ``scale``. Returns this
        rank's (objective sum over micro-batches, metric sums, counts) like the trainer's loop."""
        shapes = {tuple(x.shape) for x, _ in batches}
        if len(shapes) != 1:
            raise ValueError(f"pipeline parallelism needs micro-batches of one shape, got {sorted(shapes)}")
        n = len(batches)
        x = torch.cat([b[0] for b in batches]).to(self.device)
        y = torch.cat([b[1] for b in batches]).to(self.device)
        self.scale, self.stats = scale, {}
        sched = self._schedule(n, shapes.pop())
        args = (x,) if self.holds_first else ()
        sched.step(*args, target=y, return_outputs=False, input_ids=x, labels=y)
        stats = {k: self.stats.get(k, 0.0) for k in self.metric_keys}
        loss = sum(v for k, v in stats.items() if k in ("ce", "aux_loss")) + self.mtp_lambda * stats.get("mtp_loss", 0.0)
        return loss, stats, {k: n for k in self.metric_keys}


# ---------------------------------------------------------------------------- evaluation
class PipelineEvalModel(nn.Module):
    """What ``task.evaluate(model)`` sees under pipelining: ``model(input_ids, labels=labels)``
    runs the stages in order (activations sent between pp ranks) and returns the last stage's
    loss (main CE) and logits on every pp rank. Every pp rank of a pipeline must call it with the
    same batch (validation data is the same on every rank)."""

    def __init__(self, pipe: PipelineParallel, model: nn.Module):
        super().__init__()
        self.pipe, self.config, self.use_mtp = pipe, model.config, False
        self._anchor = nn.Parameter(torch.zeros(0, device=pipe.device), requires_grad=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any):
        from ..model.transformer import CausalLMOutput
        p = self.pipe
        input_ids = input_ids.to(p.device)
        B, T = input_ids.shape
        d = self.config.hidden_size
        h = input_ids
        for s in range(p.S):
            owner = stage_rank(s, p.pp, p.spec)
            prev = stage_rank(s - 1, p.pp, p.spec) if s else owner
            if owner == p.pp_rank:
                if prev != owner:
                    h = torch.empty(B, T, d, device=p.device)
                    dist.recv(h, src=p.ranks[prev], group=p.group)
                stage = p.stages[s]
                out = stage.hidden(h, input_ids)
                h = out[0]
                if s == p.S - 1:
                    logits = stage.lm_head(stage.norm(h)).float()
            elif prev == p.pp_rank:
                dist.send(h.float().contiguous(), dst=p.ranks[owner], group=p.group)
        V = self.config.vocab_size
        if p.pp_rank != p.last_rank:
            logits = torch.empty(B, T, V, device=p.device)
        dist.broadcast(logits, src=p.ranks[p.last_rank], group=p.group)
        out = CausalLMOutput(logits=logits)
        if labels is not None:
            out.loss = F.cross_entropy(logits.view(-1, V), labels.to(p.device).reshape(-1), ignore_index=-100)
        return out


# ---------------------------------------------------------------------------- timelines
def executed_order(schedule: Any) -> dict[int, list[str]]:
    """The schedule's per-rank compute actions in execution order, as torch writes them
    (``"2F0"``: stage 2 forward of micro-batch 0; ``B`` full backward, ``I``/``W`` input/weight
    backward; None (idle slots) dropped). Works on any torch schedule (``pipeline_order``)."""
    order = getattr(schedule, "pipeline_order", None) or {}
    return {rank: [str(a) for a in actions if a is not None] for rank, actions in order.items()}


def events_order(events: list[dict]) -> list[str]:
    """The actions a rank executed, in order, from :func:`instrument`'s events (``"0F1"`` etc.)."""
    return [f"{e['stage']}{e['kind']}{e['mb']}" for e in sorted(events, key=lambda e: e["start"])]


def chrome_trace(events_by_rank: dict[int, list[dict]]) -> dict[str, Any]:
    """A Chrome trace (``chrome://tracing`` / Perfetto JSON) of :func:`instrument`'s events
    gathered from every rank: one process row per rank, one thread per stage, times in µs from
    the earliest event (ranks' perf_counter clocks are comparable on one machine only)."""
    t0 = min((e["start"] for evs in events_by_rank.values() for e in evs), default=0.0)
    names = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weights)"}
    out = [{"name": f"{names[e['kind']]} mb {e['mb']}", "cat": e["kind"], "ph": "X", "pid": rank,
            "tid": e["stage"], "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
            "args": {"stage": e["stage"], "microbatch": e["mb"]}}
           for rank, evs in events_by_rank.items() for e in evs]
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def build_schedule_order(name: str, pp: int, microbatches: int) -> dict[int, list[str]]:
    """The action order of schedule ``name`` on ``pp`` ranks without running it (single-process:
    torch computes ``pipeline_order`` from the stage count; a fake process group is not needed)."""
    spec = schedule_spec(name)
    why = check_microbatches(spec, pp, microbatches)
    if why:
        raise ConfigError(f"[parallel] schedule = {name!r} {why}")
    cls = spec.torch_schedule()

    class _Stage:                                  # what the schedule constructors read of a stage
        def __init__(self, index):
            self.stage_index, self.num_stages = index, num_stages(pp, spec)
            self.group_size, self.group_rank = pp, 0
            self.is_first, self.is_last = index == 0, index == self.num_stages - 1
            self.submod, self.stage_index_to_group_rank = nn.Module(), {}
            self.has_backward = True

    out: dict[int, list[str]] = {}
    for rank in range(pp):
        stages = [_Stage(s) for s in local_stages(rank, pp, spec)]
        for st in stages:
            st.group_rank = rank
        sched = cls(stages[0] if spec.stages_per_rank == 1 else stages, n_microbatches=microbatches,
                    loss_fn=lambda o, t: o)
        if spec.stages_per_rank == 1 and getattr(sched, "pipeline_order", None) is None:
            raise ConfigError(f"torch's {spec.torch_class} exposes no pipeline_order")
        out[rank] = executed_order(sched).get(rank, [])
    return out


def instrument(stage: Any, record: Callable[[dict], None]) -> None:
    """Wrap a PipelineStage's forward/backward methods so each call passes
    ``{"stage", "kind" (F, B, I, W), "mb", "start", "end"}`` (``time.perf_counter`` seconds; the
    action's compute, sends not included) to ``record`` (e.g. ``events.append``).
    :func:`events_order` turns them into the executed order."""
    def wrap(fn, kind_of):
        def inner(chunk, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(chunk, *args, **kwargs)
            finally:
                record({"stage": stage.stage_index, "kind": kind_of(kwargs), "mb": chunk,
                        "start": t0, "end": time.perf_counter()})
        return inner
    stage.forward_one_chunk = wrap(stage.forward_one_chunk, lambda kw: "F")
    stage.backward_one_chunk = wrap(stage.backward_one_chunk,
                                    lambda kw: "B" if kw.get("full_backward", True) else "I")
    stage.backward_weight_one_chunk = wrap(stage.backward_weight_one_chunk, lambda kw: "W")


__all__ = ["SCHEDULES", "ScheduleSpec", "schedule_spec", "check_microbatches", "merge_param_groups",
           "stage_layers", "stage_rank",
           "local_stages", "num_stages", "StageModule", "PipelineParallel", "PipelineEvalModel",
           "executed_order", "events_order", "chrome_trace", "build_schedule_order", "instrument"]
