"""The one training loop. Pre-training, SFT, DPO and GRPO are tasks plugged into :class:`Trainer`.

A **task** provides the data and the loss; the trainer owns everything else (optimizer, schedule,
precision, gradient accumulation and clipping, the spike guard, checkpoints, resume, rollback,
metrics, validation cadence, signals)::

    class Task(Protocol):
        def batches(self) -> Batches:            # called once per fit
            ...                                  # an iterator with state_dict() / load_state_dict()
        def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
            ...                                  # scalar objective of ONE micro-batch, and metrics

        # optional
        micro_batch_reduction: str = "mean"      # "mean": the trainer averages the micro-batch losses
                                                 #   of a step; "sum": the task already normalised each
                                                 #   one by the whole step (GRPO's token-mean), so they add
        def evaluate(self, model) -> dict[str, float]:   # validation (model in eval mode, no grad)

* ``next(batches)`` returns **one micro-batch**; the trainer draws ``optim.grad_accum`` of them
  per optimizer step. An item that is a ``list`` is instead the whole step's micro-batches (a
  task that generates its data, like GRPO's rollouts, can decide the split itself).
  ``batches.state_dict()`` is checkpointed and restored (it must capture the position exactly
  for a resumed run to see the same data). A micro-batch is any object; the task moves it to
  the model's device. If it is a dict with ``"doc_ids"`` (or has a ``doc_ids`` attribute), the
  ids are logged when the step is skipped as a spike.
* ``loss`` runs under the trainer's autocast with the model in train mode. Metric values are
  averaged over the step's micro-batches, except ``"tokens"`` (the micro-batch's trained tokens),
  which is summed and gives tokens/s and MFU.
* **hooks** (:class:`Hook`): ``after_step(trainer, applied) -> dict`` runs after every step,
  applied or skipped (:class:`ExpertBalanceHook` does the aux-loss-free bias update there),
  ``on_event(trainer, record)`` sees every event logged, and a hook with ``state_dict`` /
  ``load_state_dict`` is checkpointed (extra state a stage wants saved).

One optimizer step (``trainer.step`` counts them, 1-based in the logs):

1. lr from the schedule (a function of the step and the run's progress), set on every group;
2. for each micro-batch: loss under autocast, ``backward(loss / n)`` (or ``loss`` for "sum");
   a DeepSeek-V3.2 model trains in the step's stage and its indexers' KL joins the objective
   (:mod:`nanoseek.train.dsa`: the dense warm-up backpropagates the KL alone);
3. clip the global gradient norm; ask the spike guard about the step loss and gradient norm;
4. OK: ``optimizer.step()``. SKIP (fast spike): no update, the gradient is dropped; the step
   still counts (its data is consumed and the schedule moves on) and ``spike_skipped`` is logged
   with the document ids. When skips are frequent, or the loss trend of accepted steps rises,
   the guard re-measures the model on its fixed reference batches (``_reference_loss``: the
   first micro-batch of the first ``spike.reference_batches`` accepted steps, its best loss
   recorded at every save): only if the model now does clearly worse on them is the step a
   ROLLBACK (the weights are damaged; harder data never is): no update; the weights, optimizer, RNG, guard and data
   position come back from the last checkpoint of this process (or the one it resumed from),
   then the data iterator is advanced past every batch drawn since that checkpoint (the data
   that led to the blow-up) and ``rollback`` is logged; the checkpoints this process wrote
   after the target are deleted (an abandoned timeline), no others. Consecutive rollbacks with
   no new checkpoint go one checkpoint further back, never past the one this process resumed
   from; more than ``spike.max_rollbacks`` in a row raise :class:`TrainingDiverged`, leaving
   ``RUN/latest`` on the last known-good checkpoint (the full policy: ``spike.py``);
5. hooks ``after_step`` (a skipped step resets the MoE token counts without moving the biases);
6. log, evaluate every ``eval_every``, checkpoint every ``save_every`` (a save due at a skipped
   step waits for the next accepted one), stop on the budget.

Exact resume: a checkpoint holds the weights, the optimizer state (AdamW moments; with
``optim.optimizer = "muon"`` also Muon's momentum), the step/token counters, the RNG
states (torch, CUDA, python, numpy), the data position, the guard and hook states and the
guard's reference batches, so a
killed run resumed from step N gives the same per-step losses as an uninterrupted one (bitwise
on the same machine; with ``max_minutes`` the schedule depends on wall time, so not then).
SIGINT (Ctrl-C) and SIGTERM finish the current step, save a checkpoint and return
``status="interrupted"``; a second Ctrl-C aborts at once without saving.

Under torchrun the trainer runs on every rank with a :class:`~nanoseek.train.distributed.ParallelRuntime`
(``parallel``: the ``[parallel]`` section): it applies expert parallelism / FSDP to the model,
gives each rank its share of a step's data (a task with ``rank_sharded = True`` reads its own),
reduces gradients, loss and metrics over ranks, clips by the global norm, feeds the expert-load
all-reduce to :class:`ExpertBalanceHook`, and gathers / reshards checkpoints; rank 0 alone
writes files and prints. With pipeline parallelism (``[parallel] pp``) the runtime's
``forward_backward`` runs the step's micro-batches through the pipeline schedule in place of
step 2's loop (and of the spike guard's reference pass), and ``eval_model`` is what the task's
``evaluate`` sees. In one process all of that is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import limits
from ..errors import ConfigError, UserError
from .checkpoint import (CheckpointError, checkpoints_dir, discard_after, latest_checkpoint, list_checkpoints,
                         load_state, recovery_hint, remove_partials, resume_checkpoint, save_checkpoint, step_of)
from .compiled import StepCompiler
from .config import OptimSection, ParallelSection, SpikeSection, TrainSection
from .distributed import ParallelRuntime, local_rank
from .dsa import IndexerTraining
from .metrics import METRICS_FILE, MetricsLogger, ProgressDisplay, measure_matmul_peak, model_flops_per_token
from .optim import LRSchedule, build_optimizer, configure, optimizer_kind, set_lr
from .spike import SpikeGuard, Verdict


MAX_ORIGINS = 32          # document origins named in a spike / rollback event


class TrainingDiverged(UserError, RuntimeError):
    """The spike guard asked for a rollback it cannot do (no checkpoint, or too many in a row).

    A :class:`~nanoseek.errors.UserError`, so every command prints it as one line (exit 2). Its
    message names the last known-good checkpoint (``checkpoint``; ``RUN/latest`` names it) and
    how to resume from it; ``run_dir`` is the run folder.
    """

    def __init__(self, message: str, checkpoint: Path | None = None, run_dir: Path | None = None,
                 lr: float | None = None, min_lr: float | None = None):
        super().__init__(message)
        self.checkpoint, self.run_dir = checkpoint, run_dir
        self.lr, self.min_lr = lr, min_lr     # a learning rate (and floor) to resume with: a tenth of the run's


def _encode_batches(batches: list[Any]) -> list[Any] | None:
    """The reference batches as a checkpointable nest (tensors, lists, dicts, scalars; a
    dataclass of nanoseek's as ``{"__dataclass__": "module:Name", "fields": {...}}``), or None
    when a batch holds something else (the reference is then collected anew after a resume)."""
    def enc(x: Any) -> Any:
        if isinstance(x, (torch.Tensor, np.ndarray, np.generic, str, int, float, bool)) or x is None:
            return x
        if isinstance(x, (list, tuple)):
            return type(x)(enc(v) for v in x)
        if isinstance(x, dict) and all(isinstance(k, str) for k in x) and "__dataclass__" not in x:
            return {k: enc(v) for k, v in x.items()}
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and type(x).__module__.startswith("nanoseek."):
            return {"__dataclass__": f"{type(x).__module__}:{type(x).__qualname__}",
                    "fields": {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise TypeError(type(x).__name__)
    try:
        return [enc(b) for b in batches]
    except TypeError:
        return None


def _decode_batches(data: list[Any] | None) -> list[Any]:
    """Inverse of :func:`_encode_batches` ([] for None); only nanoseek's own dataclasses are built."""
    def dec(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(dec(v) for v in x)
        if isinstance(x, dict) and "__dataclass__" in x:
            module, _, name = str(x["__dataclass__"]).partition(":")
            if not module.startswith("nanoseek."):
                raise ValueError(f"reference batch of type {module}:{name} (only nanoseek's are loaded)")
            cls = getattr(importlib.import_module(module), name)
            if not dataclasses.is_dataclass(cls):
                raise ValueError(f"reference batch type {module}:{name} is not a dataclass")
            return cls(**{k: dec(v) for k, v in x["fields"].items()})
        if isinstance(x, dict):
            return {k: dec(v) for k, v in x.items()}
        return x
    return [dec(b) for b in data or []]


class _DataMismatch(Exception):
    """Internal: the data loader refused the checkpoint's position (its cause says why)."""


class Batches(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    def batches(self) -> Batches: ...
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


class Hook:
    """Base class for trainer hooks; override what you need."""

    def after_step(self, trainer: "Trainer", applied: bool) -> dict[str, Any] | None:
        return None

    def on_event(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        return None


class ExpertBalanceHook(Hook):
    """Aux-loss-free balancing after every optimizer step: ``model.update_expert_bias(gamma)``.

    The load is the token count of every training forward since the last call (all micro-batches
    of the step). A skipped step calls it with gamma 0: the spiked batch's counts are dropped and
    the biases do not move; so does a step of V3.2's dense warm-up, which trains only the indexers.
    Logs the per-MoE-layer MaxVio of the step's load, the bias range, and the load itself
    (``expert_load``: tokens per routed expert, one list per MoE layer, summed over ranks; what
    ``nanoseek eplb`` balances). 4-8 bytes of JSON per expert and layer would make a 671B model's
    lines 100 KB, so the load is logged summed over ``load_every`` steps (``expert_load_steps``
    says how many; ``[train] expert_load_every``, 0: automatic, every step up to
    LOAD_COUNTERS_PER_STEP counters, else as many steps as keep that average).
    """

    LOAD_COUNTERS_PER_STEP = 2048          # automatic load_every: about 10 KB of metrics a step on average

    def __init__(self, gamma: float, load_reduce=None, load_every: int = 0):
        self.gamma, self.load_reduce, self.load_every = gamma, load_reduce, load_every
        self._load_sum, self._load_steps = None, 0

    def after_step(self, trainer: "Trainer", applied: bool) -> dict[str, Any] | None:
        model = trainer.model
        if not hasattr(model, "update_expert_bias"):
            return None
        dsa = getattr(trainer, "dsa", None)
        moves = applied and not (dsa is not None and dsa.frozen(trainer.dsa_stage))   # V3.2's warm-up: model frozen
        load = model.update_expert_bias(self.gamma if moves else 0.0, self.load_reduce)
        load = trainer.dist.layer_rows(model, load)       # pp > 1: every stage's layers
        if load is None:
            return None
        from ..model.moe import max_violation
        out: dict[str, Any] = {"maxvio": [round(float(x), 4) for x in max_violation(load)]}
        self._load_sum = load.detach().clone() if self._load_sum is None else self._load_sum + load
        self._load_steps += 1
        every = self.load_every or -(-load.numel() // self.LOAD_COUNTERS_PER_STEP)
        if self._load_steps >= every:
            out["expert_load"] = self._load_sum.round().long().tolist()
            if self._load_steps > 1:
                out["expert_load_steps"] = self._load_steps
            self._load_sum, self._load_steps = None, 0
        bias = trainer.dist.layer_rows(model, model.expert_bias())
        if bias is not None:
            out["bias_range"] = [round(float(x), 5) for x in (bias.amax(-1) - bias.amin(-1))]
        return out


@dataclass
class FitResult:
    status: str                       # "done", "interrupted" or "data_exhausted"
    step: int
    tokens: int
    run_dir: Path
    checkpoint: Path | None = None    # the last checkpoint written
    final_dir: Path | None = None     # RUN/final (status "done" and "data_exhausted")
    last_eval: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when present, else the CPU; under torchrun "auto"/"cuda" mean cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", local_rank())
    why = limits.device_problem(name)
    if why is not None:
        raise ConfigError(f"[train] device = {why}")
    return torch.device(name)


def _doc_ids(micro: Any) -> list[int] | None:
    ids = micro.get("doc_ids") if isinstance(micro, dict) else getattr(micro, "doc_ids", None)
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        return sorted(set(ids.flatten().tolist()))
    flat: list = []
    stack = [ids]
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor):
            flat.extend(x.flatten().tolist())
        else:
            flat.append(x)
    try:
        return sorted(set(flat))
    except TypeError:
        return flat


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class Trainer:
    """See the module docstring. ``run_dir`` defaults to ``train.out_dir``; ``final_files``
    ({name: text}: the tokenizer files) go into every checkpoint and into ``final/``."""

    def __init__(self, model: torch.nn.Module, task: Task, optim: OptimSection, train: TrainSection,
                 spike: SpikeSection | None = None, run_dir: str | Path | None = None,
                 hooks: list[Hook] | tuple[Hook, ...] = (), config: dict | None = None,
                 final_files: dict[str, str] | None = None, flops_per_token: float | None = None,
                 progress: bool | None = None, quiet: bool = False, parallel: ParallelSection | None = None):
        self.optim_cfg, self.train_cfg = optim, train
        self.spike_cfg = spike or SpikeSection()
        self.run_dir = Path(run_dir or train.out_dir or "runs/run")
        self.device = resolve_device(train.device)
        self.dist = ParallelRuntime(parallel, self.device)       # one process: does nothing
        if train.compile and self.dist.active:
            raise ConfigError("[train] compile = true compiles the step of one process; under torchrun set "
                              "--set train.compile=false")
        self.model = self.dist.parallelize(model.to(self.device), task)
        self._apply_train_options(train)
        self.task = task
        self.hooks = list(hooks)
        for h in self.hooks:                  # the bias update counts the load of all ranks
            if isinstance(h, ExpertBalanceHook) and h.load_reduce is None and self.dist.active:
                h.load_reduce = self.dist.load_reduce
        self.config = config or {}
        self.final_files = final_files or {}
        self.progress_flag, self.quiet = (progress, quiet) if self.dist.is_main else (False, True)
        self.optimizer = self.dist.adapt_optimizer(build_optimizer(self.model, optim),
                                                   lambda m: build_optimizer(m, optim))
        # DeepSeek-V3.2: the indexers' stage of each step (dense warm-up, then sparse), and their KL
        self.dsa = IndexerTraining(self.model, train.dsa_warmup_steps, train.indexer_loss_weight,
                                   train.dsa_warmup_freeze)
        self.dsa_stage: str | None = None         # the stage of the step being run / last run (V3.2)
        self._logged_stage: str | None = None
        self.schedule = LRSchedule(optim, train.max_steps)
        self.guard = SpikeGuard(self.spike_cfg)
        self.batches: Batches = task.batches()
        self.reduction = getattr(task, "micro_batch_reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"task.micro_batch_reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if flops_per_token is None and hasattr(self.model, "config"):
            flops_per_token = model_flops_per_token(self.model.config, optim.seq_len,
                                                    include_mtp=bool(getattr(self.model, "use_mtp", False)))
        self.flops_per_token = flops_per_token
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.compiler = StepCompiler(self.model, train.compile)   # the training micro-batches' module
        self._compile_logged: set[str] = set()            # the compiler's events logged so far
        # counters (checkpointed)
        self.step = 0                 # optimizer steps taken (applied or skipped)
        self.updates = 0              # of which applied
        self.tokens = 0               # training tokens of those steps
        self.batches_consumed = 0     # items drawn from the batch iterator (rollback skips past them)
        self.elapsed = 0.0            # seconds of training in this and previous processes
        self.rollbacks = 0            # rollbacks in this run (all processes)
        self.rollback_streak = 0      # ...since the run last reached a new known-good checkpoint
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._last_rollback_target: Path | None = None
        # the spike policy's checkpoint bookkeeping (see spike.py): what this process may delete
        # or roll back to, and what it must keep
        self._start_checkpoint: Path | None = None    # the checkpoint this process resumed from
        self._written: list[Path] = []                # checkpoints this process wrote (oldest first)
        self.good_checkpoint: Path | None = None      # the last known-good checkpoint (never pruned)
        self._pending: Path | None = None             # newest checkpoint, good once the run reaches the next
        self._save_due = False                        # a save fell on a skipped step: wait for an accepted one
        self._reference: list[Any] = []               # the guard's fixed reference batches (checkpointed)
        self._stop_reason: str | None = None
        self.logger: MetricsLogger | None = None
        self.peak_flops: float | None = None
        self._bar: ProgressDisplay | None = None
        self._clock = time.perf_counter()

    def _apply_train_options(self, train: TrainSection) -> None:
        """Options applied to the built (parallelised) model from outside: activation
        recomputation (``recompute.py``) and node-limited routing (``model/routing.py``)."""
        from .recompute import apply_recompute
        apply_recompute(self.model, train.recompute)
        if train.max_nodes_per_token:
            from ..model.routing import layout_nodes, set_node_limit
            ep = self.dist.ep if self.dist.active else 1
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            nodes = train.expert_nodes or layout_nodes(ep, ranks_per_node)
            try:
                set_node_limit(self.model, nodes, train.max_nodes_per_token, ep)
            except ValueError as e:
                raise ConfigError(f"[train] max_nodes_per_token = {train.max_nodes_per_token} with "
                                  f"{nodes} expert node(s): {e}") from None

    # ------------------------------------------------------------------ public controls
    def request_stop(self, reason: str = "requested") -> None:
        """Finish the current step, save a checkpoint and return (what Ctrl-C and SIGTERM do)."""
        self._stop_reason = reason

    def autocast(self):
        if self.train_cfg.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def progress(self) -> float:
        """Fraction of the run done in [0, 1]: the furthest of steps, tokens and minutes."""
        t = self.train_cfg
        p = 0.0
        if t.max_steps:
            p = max(p, self.step / t.max_steps)
        if t.max_tokens:
            p = max(p, self.tokens / t.max_tokens)
        if t.max_minutes:
            p = max(p, self.elapsed / (60 * t.max_minutes))
        return min(p, 1.0)

    def _lr_progress(self) -> float:
        """Progress at the end of the step about to run (the schedule's argument)."""
        t = self.train_cfg
        p = 0.0
        if t.max_steps:
            p = max(p, (self.step + 1) / t.max_steps)
        if t.max_tokens:
            p = max(p, self.tokens / t.max_tokens)
        if t.max_minutes:
            p = max(p, self.elapsed / (60 * t.max_minutes))
        return min(p, 1.0)

    def finished(self) -> bool:
        t = self.train_cfg
        return bool((t.max_steps and self.step >= t.max_steps) or (t.max_tokens and self.tokens >= t.max_tokens)
                    or (t.max_minutes and self.elapsed >= 60 * t.max_minutes))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        hooks = {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(self.hooks) if hasattr(h, "state_dict")}
        return {"version": 1, "step": self.step, "updates": self.updates, "tokens": self.tokens,
                "batches_consumed": self.batches_consumed, "elapsed": self.elapsed, "rollbacks": self.rollbacks,
                "rollback_streak": self.rollback_streak,
                "optimizer": self.dist.optimizer_state_dict(self.model, self.optimizer), "rng": _rng_state(),
                "batches": self.batches.state_dict(),
                "guard": self.guard.state_dict(), "spike_reference": _encode_batches(self._reference),
                "hooks": hooks, "config": self.config}

    def save(self, reference: tuple[float, float] | None | bool = True) -> Path:
        """Write a checkpoint; ``reference``: the reference measured just now (True: measure it)."""
        now = self._reference_loss() if reference is True else reference
        self.guard.record_reference(None if now is None else now[0])   # a known-good point: the guard compares with it
        model, state = self.dist.full_model(self.model), self.state_dict()    # gathered on rank 0
        path = checkpoints_dir(self.run_dir) / f"step-{self.step:06d}"
        if self._pending is not None and self._pending.name != path.name:
            self.good_checkpoint = self._pending      # the run went past it to this save without a rollback
            self.rollback_streak = 0
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, model, state, self.train_cfg.keep_last,
                                   extra_files=self.final_files,     # the tokenizer travels with every checkpoint
                                   protect=[self.good_checkpoint])
        self.dist.barrier()                   # every rank sees the checkpoint once save() returns
        self.last_saved_step, self.last_checkpoint = self.step, path
        self._written = [p for p in self._written if p.name != path.name] + [path]
        self._pending, self._save_due = path, False
        self._event("checkpoint", step=self.step, path=str(path))
        return path

    def restore(self, ckpt: str | Path, *, rollback: bool = False) -> None:
        """Load a checkpoint into the live trainer (weights, optimizer, counters, RNG, data, guard, hooks).

        Any failure is one :class:`CheckpointError` line naming the checkpoint and what is wrong;
        a damaged checkpoint's error also says which older one is intact and how to resume from it,
        and a checkpoint made on other data says to resume with the same data."""
        ckpt = Path(ckpt)
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: no such checkpoint directory{recovery_hint(ckpt)}")
        try:
            self._restore(ckpt, rollback)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{recovery_hint(ckpt)}") from None
        except _DataMismatch as e:
            raise CheckpointError(f"{ckpt}: the checkpoint is intact but was made on other data: {e.__cause__}; "
                                  "resume with the data settings it was trained with ([data], train.seed), "
                                  "or start a new run in another --out-dir") from None
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, torch.OutOfMemoryError):      # not the checkpoint's fault
                raise
            what = f"missing entry {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
            raise CheckpointError(f"{ckpt}: the trainer state does not fit this run ({type(e).__name__}: {what}); "
                                  f"it was saved by another model, optimizer or version{recovery_hint(ckpt)}") from None

    def _restore(self, ckpt: Path, rollback: bool) -> None:
        state = load_state(ckpt)
        self.dist.load_model_weights(self.model, ckpt)         # resharded to this rank's part
        saved, ours = optimizer_kind(state["optimizer"]["param_groups"]), self.optim_cfg.optimizer
        if saved != ours:
            raise CheckpointError(f"{ckpt}: its optimizer state is {saved}'s and this run sets [optim] optimizer = "
                                  f"{ours!r}; resume with --set optim.optimizer={saved}, or start a new run "
                                  f"from its weights ([model] init_from)")
        self.dist.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        configure(self.optimizer, self.optim_cfg)     # the config in force wins over the saved hyper-parameters
        self.step, self.updates, self.tokens = int(state["step"]), int(state["updates"]), int(state["tokens"])
        self.batches_consumed = int(state["batches_consumed"])
        if not rollback:                      # wall time spent on an abandoned timeline still counts
            self.elapsed = float(state["elapsed"])
            self.rollbacks = int(state.get("rollbacks", 0))
            self.rollback_streak = int(state.get("rollback_streak", 0))
        self.guard.load_state_dict(state["guard"])
        self._reference = _decode_batches(state.get("spike_reference"))
        if not self._reference:               # not checkpointable: collected anew, so its best is unknown
            self.guard.ref_best = None
        try:
            self.batches.load_state_dict(state["batches"])
        except (ValueError, KeyError, TypeError) as e:
            raise _DataMismatch() from e
        saved_hooks = state.get("hooks", {})
        for i, h in enumerate(self.hooks):
            key = f"{i}:{type(h).__name__}"
            if hasattr(h, "load_state_dict"):
                if key not in saved_hooks:
                    raise CheckpointError(f"{ckpt}: no state for hook {key} (saved: {sorted(saved_hooks)})")
                h.load_state_dict(saved_hooks[key])
        _set_rng_state(state["rng"])
        self.last_saved_step, self.last_checkpoint = self.step, ckpt

    # ------------------------------------------------------------------ logging
    def _message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.message(text)
        elif not self.quiet:
            print(text, flush=True)

    def _event(self, name: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": name, **fields}
        if self.logger is not None:
            self.logger.log(rec)
        for h in self.hooks:
            if hasattr(h, "on_event"):
                h.on_event(self, rec)
        return rec

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool | str | Path = False) -> FitResult:
        """Train until the budget is spent, the data ends, or a stop is requested."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = self.train_cfg
        if self.dist.is_main:                 # rank 0 owns the run folder's files
            remove_partials(self.run_dir)
            metrics_file = self.run_dir / METRICS_FILE
            if not resume and metrics_file.exists():      # a fresh run: keep an earlier attempt's log aside
                os.replace(metrics_file, self.run_dir / f"metrics.{int(time.time())}.jsonl")
            self.logger = MetricsLogger(self.run_dir, t.tensorboard, t.wandb_project, config=self.config)
        self.dist.barrier()
        old_handlers = self._install_signals()
        status = "done"
        try:
            if resume:
                ckpt = resume_checkpoint(self.run_dir) if resume is True else Path(resume)
                self.restore(ckpt)
                self._start_checkpoint = self.good_checkpoint = Path(ckpt)   # never rolled back past
                self._event("resume", step=self.step, checkpoint=str(ckpt))
            else:
                torch.manual_seed(t.seed)
                random.seed(t.seed)
                np.random.seed(t.seed % 2**32)
                self._event("start", step=0, device=str(self.device), dtype=t.dtype,
                            params=sum(p.numel() for p in self.params), **self.dist.describe())
            self.peak_flops = measure_matmul_peak(str(self.device), t.dtype, seconds=0.5)
            desc = self.run_dir.name
            with ProgressDisplay(desc, t.log_every, enabled=self.progress_flag, quiet=self.quiet) as bar:
                self._bar = bar
                status = self._loop(bar)
            if status in ("done", "data_exhausted"):
                final = self._finish(status)
            else:
                final = None
            return FitResult(status, self.step, self.tokens, self.run_dir, self.last_checkpoint, final, self.last_eval)
        finally:
            self._bar = None
            self._restore_signals(old_handlers)
            if self.logger is not None:
                self.logger.close()
            self.logger = None

    def _loop(self, bar: ProgressDisplay) -> str:
        t = self.train_cfg
        self._clock = time.perf_counter()
        while True:
            self._tick()
            self.elapsed, stop = self.dist.sync(self.elapsed, self._stop_reason is not None)   # ranks in lockstep
            if stop and self._stop_reason is None:
                self._stop_reason = "stop requested on another rank"
            if self.finished():
                return "done"
            if self._stop_reason is not None:
                if self.last_saved_step != self.step:
                    self.save()
                self._event("interrupted", step=self.step, reason=self._stop_reason)
                bar.message(f"{self._stop_reason}: saved {self.last_checkpoint} at step {self.step}")
                return "interrupted"
            try:
                micro = self._draw()
            except StopIteration:
                self._event("data_exhausted", step=self.step)
                return "data_exhausted"
            rec = self._train_step(micro)
            if rec is None:                    # rolled back: counters and data already moved
                continue
            if t.eval_every and self.step % t.eval_every == 0:
                self._evaluate()
            if t.save_every and self.step % t.save_every == 0:
                self._save_due = True
            if self._save_due and not rec.get("skipped"):   # a skipped step writes no checkpoint
                if not self._checked_save(rec["loss"], micro):
                    continue                   # the weights were damaged: rolled back instead
            bar.update(self.step, self.progress(), rec["loss"], rec.get("tokens_per_s"),
                       extra=f"ce {rec['ce']:.4f}" if "ce" in rec else "")

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``elapsed`` (the time budget's clock)."""
        now = time.perf_counter()
        self.elapsed += now - self._clock
        self._clock = now

    def _draw(self) -> list[Any]:
        stride = self.dist.stride(self.task)       # >1: every rank draws the whole step, keeps its share
        first = next(self.batches)
        self.batches_consumed += 1
        if isinstance(first, list):
            return self.dist.local_share(first, stride, self.reduction)
        micro = [first]
        for _ in range(self.optim_cfg.grad_accum * stride - 1):
            micro.append(next(self.batches))
            self.batches_consumed += 1
        return self.dist.local_share(micro, stride, self.reduction)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _train_step(self, micro: list[Any]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        model, opt = self.model, self.optimizer
        model.train()
        lr = self.schedule.lr(self.step, self._lr_progress())
        set_lr(opt, lr)
        scale = 1.0 / len(micro) if self.reduction == "mean" else 1.0
        # the indexers' KL is a mean over the step's micro-batches and ranks, whatever the reduction
        kl_scale = 1.0 / len(micro) / (self.dist.world_size if self.reduction == "sum" else 1)
        stage = self.dsa_stage = self.dsa.stage(self.step)
        if stage != self._logged_stage:
            self._event("dsa_stage", step=self.step + 1, stage=stage)
            self._logged_stage = stage
        piped = self.dist.forward_backward(self.task, model, micro, scale, self.autocast)
        if piped is not None:                 # pp > 1: the pipeline schedule ran every micro-batch
            loss_sum, sums, counts = torch.tensor(piped[0], dtype=torch.float64), piped[1], piped[2]
        else:
            with self.dsa.step(model, stage):
                loss_sum, sums, counts = self.compiler.run(
                    lambda m: self._micro_steps(m, micro, scale, kl_scale, stage), self.params)
            self._log_compile()
        step_loss = float(loss_sum) * scale
        self.dist.reduce_gradients(self.reduction)                   # the global batch's gradient
        step_loss, sums, counts = self.dist.reduce_step(step_loss, sums, counts, self.reduction)
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        grad_norm = self.dist.clip_grad_norm(max_norm)
        decision = self.guard.observe(self.step, step_loss, grad_norm, reference=self._reference_loss)
        applied = decision.verdict is Verdict.OK
        if applied:
            opt.step()
        opt.zero_grad(set_to_none=True)
        hook_metrics: dict[str, Any] = {}
        for h in self.hooks:
            if hasattr(h, "after_step"):
                hook_metrics.update(h.after_step(self, applied) or {})
        self._sync()
        dt = time.perf_counter() - t0
        ntok = int(sums.get("tokens", 0))
        if self.train_cfg.max_tokens and "tokens" not in sums:
            raise ValueError("[train] max_tokens needs a task whose loss metrics report 'tokens'; "
                             "use max_steps or max_minutes with this task")
        self.step += 1
        self.updates += int(applied)
        self.tokens += ntok
        if applied and self.spike_cfg.enabled and len(self._reference) < self.spike_cfg.reference_batches and micro:
            self._reference.append(micro[0])          # the reference: early batches the run accepted
            if len(self._reference) == self.spike_cfg.reference_batches:
                now = self._reference_loss()
                self.guard.record_reference(None if now is None else now[0])
        if applied and decision.reason:               # an alarm re-checked: the weights are sound
            self._event("spike_checked", step=self.step, loss=step_loss, reason=decision.reason)
        if decision.verdict is Verdict.ROLLBACK:
            self._rollback(decision.reason, step_loss, micro)
            return None
        rec: dict[str, Any] = {"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        for k, v in sums.items():                    # a task metric never overwrites the trainer's own
            rec[k if k not in rec else f"task_{k}"] = ntok if k == "tokens" else v / counts[k]
        if ntok:
            rec["tokens_per_s"] = ntok / dt
            if self.flops_per_token and self.peak_flops:
                rec["mfu"] = ntok * self.flops_per_token / dt / (self.peak_flops * self.dist.world_size)
        rec.update(hook_metrics)
        self._tick()
        rec.update({"step_time": dt, "tokens_seen": self.tokens, "elapsed": self.elapsed})
        if not applied:
            rec["skipped"] = True
            self._event("spike_skipped", step=self.step, loss=step_loss, grad_norm=grad_norm, reason=decision.reason,
                        **self._doc_fields(micro))
            self._message(f"step {self.step}: spike skipped ({decision.reason})")
        if self.logger is not None and (not applied or self.step % self.train_cfg.log_every == 0):
            self.logger.log(rec)
        return rec

    def _log_compile(self) -> None:
        """The ``compiled`` event (with the first compiled step's seconds) and ``compile_failed``, once each."""
        c = self.compiler
        for name, value, key in (("compiled", c.compile_seconds, "compile_seconds"), ("compile_failed", c.failure, "reason")):
            if value is not None and name not in self._compile_logged:
                self._compile_logged.add(name)
                self._event(name, step=self.step + 1, **{key: round(value, 2) if isinstance(value, float) else value})

    def _micro_steps(self, model: torch.nn.Module, micro: list[Any], scale: float, kl_scale: float,
                     stage: str | None) -> tuple[torch.Tensor, dict[str, float], dict[str, int]]:
        """Step 2: forward + backward of each micro-batch through ``model`` (the eager model or its
        compiled wrapper, :mod:`.compiled`) -> (summed loss, summed metrics, metric counts)."""
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for i, mb in enumerate(micro):
            self.dist.set_gradient_sync(self.model, i == len(micro) - 1)
            with self.autocast():
                loss, metrics = self.task.loss(model, mb)
            kl = self.dsa.take()
            self.dsa.objective(loss * scale, kl, stage, kl_scale).backward()
            loss_sum += loss.detach().float()
            if kl is not None:
                metrics = {**(metrics or {}), "indexer_loss": kl.detach()}
            for k, v in (metrics or {}).items():
                v = float(v) if isinstance(v, torch.Tensor) else v
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        return loss_sum, sums, counts

    def _reference_loss(self) -> tuple[float, float] | None:
        """(loss, gradient norm) of the model now on the reference batches (None until all are
        collected): the guard's test of the weights when an alarm must tell bad data from bad
        weights. Evaluation mode (no MoE load counts, no RNG draws: the same weights give the
        same figures, resumed or not); the step's own gradient is set aside and put back."""
        ref = self._reference
        if not ref or len(ref) < self.spike_cfg.reference_batches:
            return None
        model = self.model
        held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        model.eval()
        try:
            total = 0.0
            piped = self.dist.forward_backward(self.task, model, ref, 1.0 / len(ref), self.autocast)
            if piped is not None:             # pp > 1: this rank's share of the objective
                total = piped[0]
            for i, mb in enumerate(ref if piped is None else []):
                self.dist.set_gradient_sync(model, i == len(ref) - 1)
                with self.autocast():
                    loss, _ = self.task.loss(model, mb)
                (loss / len(ref)).backward()
                total += float(loss.detach().float())
            self.dist.reduce_gradients("mean")
            grad_norm = float(self.dist.clip_grad_norm(math.inf))
        finally:
            model.train()
            for p, g in zip(self.params, held):
                p.grad = g
        mean, _, _ = self.dist.reduce_step(total / len(ref), {}, {}, "mean")
        return float(mean), grad_norm

    def _checked_save(self, loss: float, micro: list[Any]) -> bool:
        """A periodic save, written only from sound weights: the reference is measured first; if
        the weights are damaged there (spike.py), roll back instead (returns False)."""
        now = self._reference_loss()
        bad = self.guard.damage(lambda: now) if self.spike_cfg.enabled else ""
        if bad:
            self._rollback(f"the weights are damaged at the save of step {self.step} ({bad})", loss, micro)
            return False
        self.save(reference=now)
        return True

    def _rollback_target(self) -> Path | None:
        """Where a rollback goes: the newest checkpoint this process wrote or resumed from; the
        same one twice in a row (no new checkpoint since) means one further back, never past the
        checkpoint this process resumed from."""
        names = {p.name for p in self._written}
        if self._start_checkpoint is not None:
            names.add(self._start_checkpoint.name)
        found = [p for p in list_checkpoints(self.run_dir)
                 if p.name in names and (self._start_checkpoint is None
                                         or step_of(p) >= step_of(self._start_checkpoint))]
        latest = latest_checkpoint(self.run_dir)
        if latest is not None:                # the current timeline: nothing newer than latest
            found = [p for p in found if step_of(p) <= step_of(latest)]
        if not found:
            return None
        target = found[-1]
        if self._last_rollback_target is not None and target.name == self._last_rollback_target.name \
                and len(found) > 1:           # the blow-up began before that checkpoint: go further back
            target = found[-2]
        return target

    def _rollback(self, reason: str, loss: float, micro: list[Any]) -> None:
        bad_step = self.step
        target = self._rollback_target()
        if target is None or self.rollback_streak >= self.spike_cfg.max_rollbacks:
            self._diverged(bad_step, loss, reason, target)
        consumed = self.batches_consumed
        self.restore(target, rollback=True)
        skip = consumed - self.batches_consumed
        with contextlib.suppress(StopIteration):
            for _ in range(skip):             # move past the data that led to the blow-up
                next(self.batches)
        self.batches_consumed = consumed
        if self.dist.is_main:                 # only this process's abandoned timeline goes
            gone = discard_after(self.run_dir, target, self._written)
            self._written = [p for p in self._written if p.name not in {g.name for g in gone}]
        self.dist.barrier()
        self._written = [p for p in self._written if step_of(p) <= self.step]
        self.rollbacks += 1
        self.rollback_streak += 1
        self._last_rollback_target = self.good_checkpoint = target
        self._pending, self._save_due = None, False
        self._event("rollback", step=bad_step, to_step=self.step, loss=loss, reason=reason, checkpoint=str(target),
                    skipped_batches=skip, **self._doc_fields(micro))
        self._message(f"step {bad_step}: rolled back to step {self.step} ({reason}); skipped {skip} batches")

    def _diverged(self, bad_step: int, loss: float, reason: str, target: Path | None) -> None:
        """Stop: ``latest`` names the known-good checkpoint, and the message says how to resume.

        The guard rolls back only when the weights are damaged (spike.py), so the advice is the
        cure for that: the same run from the good checkpoint at a tenth of the learning rate."""
        lr, min_lr = self.optim_cfg.lr / 10, self.optim_cfg.min_lr / 10
        if target is None:
            why = "no checkpoint to roll back to yet (this process has saved none; lower [train] save_every)"
            how = "nothing to resume: start again with a lower [optim] lr"
        else:
            if self.dist.is_main:             # --resume continues from it, not from the abandoned timeline
                discard_after(self.run_dir, target, self._written)
            self.dist.barrier()
            why = (f"{self.rollback_streak} rollbacks in a row ([spike] max_rollbacks = "
                   f"{self.spike_cfg.max_rollbacks})")
            how = (f"the last known-good checkpoint is {target} (step {step_of(target)}), which "
                   f"{self.run_dir / 'latest'} names: resume from it with --resume and a lower [optim] lr "
                   f"(e.g. lr = {lr:.3g}, min_lr = {min_lr:.3g}: a tenth)")
        self._event("diverged", step=bad_step, loss=loss, reason=reason,
                    checkpoint=None if target is None else str(target))
        raise TrainingDiverged(f"step {bad_step}: {reason}; {why}; {how}", target, self.run_dir, lr, min_lr)

    def _doc_fields(self, micro: list[Any]) -> dict[str, Any]:
        """``doc_ids`` of a step's micro-batches, and their origins if the task can name them."""
        ids = [d for mb in micro for d in (_doc_ids(mb) or [])]
        out: dict[str, Any] = {"doc_ids": ids}
        describe = getattr(self.task, "doc_origins", None)
        if describe is not None and ids:
            with contextlib.suppress(Exception):      # a name lookup must never stop training
                out["doc_origins"] = describe(ids[:MAX_ORIGINS])
        return out

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is None:
            return {}
        self.model.eval()
        try:
            with self.autocast():
                res = {k: float(v) for k, v in (evaluate(self.dist.eval_model(self.model)) or {}).items()}
        finally:
            self.model.train()
        self.last_eval = {"step": self.step, **res}
        if self.peak_flops:  # the start-up figure may come from a busy moment: keep the best seen
            self.peak_flops = max(self.peak_flops,
                                  measure_matmul_peak(str(self.device), self.train_cfg.dtype, seconds=0.25))
        self._event("eval", step=self.step, **res, peak_flops=self.peak_flops)
        if res:
            self._message(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def _finish(self, status: str) -> Path:
        if self.last_eval.get("step") != self.step:
            self._evaluate()
        if self.last_saved_step != self.step:
            self.save()
        from ..model.checkpoint import CheckpointError
        from ..model.registry import save_pretrained
        model, final = self.dist.full_model(self.model), self.run_dir / "final"
        if self.dist.is_main:              # replaces only model files; a final/ with user files is refused
            try:
                save_pretrained(model, final, extra_files=self.final_files)
            except CheckpointError as e:
                raise CheckpointError(f"{e} (the trained weights are safe in {self.last_checkpoint})") from None
        self.dist.barrier()
        self._event("done", step=self.step, tokens=self.tokens, status=status, final=str(final),
                    elapsed=self.elapsed, rollbacks=self.rollbacks)
        return final

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> dict | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt           # second Ctrl-C: leave now, without saving
            self._stop_reason = name
            self._message(f"{name}: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

        for s in old:
            signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signals(old: dict | None) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)


__all__ = ["Trainer", "Task", "Batches", "Hook", "ExpertBalanceHook", "FitResult", "TrainingDiverged",
           "resolve_device"]
