"""Pipeline schedules for ``nanoseek estimate``: which layers a rank holds, how many micro-batches of
activations it keeps alive, and the bubble, for each schedule by name.

The names are ``[parallel] schedule``'s, the schedules ``torch.distributed.pipelining`` ships
(``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zbv``, ``dualpipev``), plus ``dualpipe``, the
bidirectional schedule DeepSeek-V3 trained with, which torch does not ship (estimate only). ``pp``
is always the number of *ranks* (GPUs) along the pipeline; a schedule splits the model into
``pp x chunks`` stages and places them on the ranks:

* ``loop`` (1F1B, GPipe, interleaved 1F1B): rank ``r`` holds stages ``r, r + pp, ...``;
* ``v`` (ZBV, DualPipeV): rank ``r`` holds stages ``r`` and ``2 pp - 1 - r``, so rank 0 holds the
  first stage (embedding) and the last (output head, MTP);
* ``mirror`` (DualPipe): ``pp`` stages, rank ``r`` holds stage ``r`` for micro-batches flowing one
  way and stage ``pp - 1 - r`` for those flowing the other way: twice 1F1B's parameters (and
  gradients) per rank, every stage held by two ranks (DualPipe's "two copies").

**Activations in flight** (:meth:`Schedule.in_flight_chunks`): how many (micro-batch, stage)
activation sets rank ``r`` holds at its peak, counted in stages. GPipe keeps all ``m``
micro-batches; 1F1B ``max(pp - r, 2)`` (torch's warm-up is ``pp - 1 - r`` forwards, plus the one
in flight; its last rank runs the next forward before the previous backward); interleaved 1F1B
with ``v`` chunks ``(v - 1) k + 2 (pp - 1 - r) + 1`` with ``k = m // max(1, m // pp)`` micro-batches
per round (torch's ``_get_warmup_ops`` plus one: Megatron's ``(1 + (pp - 1) / (pp v))`` times
1F1B's on rank 0 when ``k = pp``); ZBV ``min(2 pp, m + 1 + r)`` chunks (its paper: 1F1B's peak on
every rank once ``m >= 2 pp``); DualPipe and DualPipeV ``PP + 1`` stages with ``PP`` the number of
stages (DualPipe's README table: ``pp + 1`` for DualPipe, ``2 pp + 1`` half-size stages for
DualPipeV). Every torch schedule's count equals the peak of the action lists torch itself
generates (``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops``; tested). All are capped at ``m`` micro-batches through each of the rank's stages
(DualPipe: ``m``, each micro-batch crossing one of a rank's two copies).

**Bubble** (:meth:`Schedule.bubble`), per rank and step, in the times of one stage's forward
``F``, full backward ``B`` (input and weight gradients) and weight-gradient backward ``W``, and
``F&B`` (a forward and a backward chunk run overlapped), as in DualPipe's README: 1F1B and GPipe
``(pp - 1)(F + B)``; interleaved 1F1B the same over ``v``; ZBV ``(pp - 1)(F + B - 3W)`` on its
half-size chunks (zero when forward, input-backward and weight-backward take equal time, as its
paper says); DualPipe ``(pp/2 - 1)(F&B + B - 3W)``; DualPipeV the same with ``PP = 2 pp`` half-size
stages, ``(pp - 1)(F&B + B - 3W)``. The *bubble fraction* is bubble / (bubble + the rank's
compute, ``m x chunks x (F + B)``), with ``B = 2F``, ``W = F`` and ``F&B = F + B`` (overlap hides
communication, not compute) unless given; recomputation lengthens ``B`` by what it recomputes.

Deliberately left out: the schedules' communication (DualPipe's point is hiding the all-to-all,
which :mod:`.comm` prices against compute), uneven stages (the first and last ranks also hold
the embedding, head and MTP module, so a real run gives them fewer layers; here layers are split
evenly and the heaviest rank is reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .flops import EstimateError


@dataclass(frozen=True)
class Schedule:
    name: str
    torch_class: str | None         # torch.distributed.pipelining's class; None: estimate only
    chunks: int                     # stages per rank
    placement: str                  # "loop", "v" or "mirror" (see the module docstring)
    param_copies: int               # ranks holding each stage (DualPipe: 2, twice 1F1B's parameters per rank)
    about: str
    _in_flight: Callable[[int, int, int], float]     # (pp, rank, m) -> stage activations alive
    _min_mb: Callable[[int], int]                    # pp -> fewest micro-batches the implementation takes
    _bubble: Callable[[int, float, float, float, float], float]   # (pp, F, B, W, F&B) -> idle time
    bubble_formula: str

    def stages(self, pp: int) -> int:
        """Number of pipeline stages (model chunks) over ``pp`` ranks."""
        return pp if self.placement == "mirror" else pp * self.chunks

    def stages_of_rank(self, pp: int, rank: int) -> list[int]:
        """The stage indices rank ``rank`` holds (the first is where its micro-batches enter)."""
        if self.placement == "loop":
            return [rank + k * pp for k in range(self.chunks)]
        if self.placement == "v":
            return [rank, 2 * pp - 1 - rank]
        return [rank, pp - 1 - rank]                    # mirror: two copies, one per direction

    def min_microbatches(self, pp: int) -> int:
        """The fewest micro-batches torch's (or DualPipe's) implementation accepts."""
        return 1 if pp == 1 else self._min_mb(pp)

    def microbatch_problem(self, pp: int, m: int, count: str = "--micro-batches", ranks: str = "--pp") -> str | None:
        """Why the implementation refuses ``m`` micro-batches on ``pp`` ranks, a phrase naming the
        schedule's requirement (None: it runs). ``count`` and ``ranks`` name the two numbers in the
        caller's terms (the estimate's ``--micro-batches`` / ``--pp``, the trainer's
        ``grad_accum`` / ``pp =``). The one rule for both: exactly what torch's schedule
        constructors accept (1F1B: m >= pp; DualPipeV: m >= 2 pp; interleaved 1F1B: m a multiple
        of its rounds m // pp; GPipe and ZBV: any m; tested against torch for pp 2..8)."""
        if pp == 1:
            return None
        if self.placement == "mirror" and pp % 2:
            return f"needs an even {ranks} (ranks pair up: stage r with stage pp - 1 - r), got {pp}"
        if self.placement == "mirror" and m % 2:
            return f"sends half the micro-batches each way: {count} must be even, got {m}"
        low = self.min_microbatches(pp)
        if m < low:
            return f"with {ranks} {pp} needs {count} >= {low}, got {m}"
        rounds = max(1, m // pp)
        if self.name == "interleaved-1f1b" and m % rounds:
            return (f"with {ranks} {pp} needs {count} a multiple of its rounds ({count} // pp = {rounds}), "
                    f"got {m}")
        return None

    def validate(self, pp: int, micro_batches: int) -> None:
        why = self.microbatch_problem(pp, micro_batches)
        if why:
            raise EstimateError(f"--schedule {self.name} {why}")

    def in_flight_chunks(self, pp: int, rank: int, micro_batches: int) -> float:
        """(micro-batch, stage) activation sets rank ``rank`` holds at its peak (see the docstring);
        with ``pp == 1`` one micro-batch (gradient accumulation frees each before the next)."""
        if pp == 1:
            return 1.0
        cap = micro_batches * (1 if self.placement == "mirror" else self.chunks)
        return float(min(self._in_flight(pp, rank, micro_batches), cap))

    def bubble(self, pp: int, F: float = 1.0, B: float = 2.0, W: float = 1.0,
               FB: float | None = None) -> float:
        """Idle time per rank per step in units of one *stage's* F, B, W (0 without a pipeline)."""
        if pp == 1:
            return 0.0
        return max(0.0, self._bubble(pp, F, B, W, F + B if FB is None else FB))

    def bubble_fraction(self, pp: int, micro_batches: int, F: float = 1.0, B: float = 2.0,
                        W: float = 1.0, FB: float | None = None) -> float:
        """Bubble over the step's time on one rank: bubble / (bubble + m x chunks x (F + B))
        (DualPipe: m x (F + B), each micro-batch crossing one of a rank's two copies)."""
        idle = self.bubble(pp, F, B, W, FB)
        per_mb = 1 if self.placement == "mirror" else self.chunks
        busy = micro_batches * per_mb * (F + B)
        return idle / (idle + busy)


def _interleaved(v: int) -> Callable[[int, int, int], float]:
    def alive(pp: int, r: int, m: int) -> float:       # torch's warm-up over its rounds, plus one
        per_round = m // max(1, m // pp)
        return (v - 1) * per_round + 2 * (pp - 1 - r) + 1
    return alive


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    Schedule("gpipe", "ScheduleGPipe", 1, "loop", 1,
             "all forwards, then all backwards: every micro-batch's activations alive at once",
             lambda pp, r, m: float("inf"), lambda pp: 1,
             lambda pp, F, B, W, FB: (pp - 1) * (F + B), "(PP-1)(F+B)"),
    Schedule("1f1b", "Schedule1F1B", 1, "loop", 1,
             "one forward, one backward: rank r keeps pp - r micro-batches",
             lambda pp, r, m: max(pp - r, 2), lambda pp: pp,
             lambda pp, F, B, W, FB: (pp - 1) * (F + B), "(PP-1)(F+B)"),
    Schedule("interleaved-1f1b", "ScheduleInterleaved1F1B", 2, "loop", 1,
             "1F1B over 2 looped chunks per rank: the bubble halves, rank 0 keeps ~1.5x 1F1B's activations",
             _interleaved(2), lambda pp: 1,
             lambda pp, F, B, W, FB: (pp - 1) * (F + B), "(PP-1)(F+B)/v, v = 2"),
    Schedule("zbv", "ScheduleZBVZeroBubble", 2, "v", 1,
             "zero-bubble V: weight gradients fill the bubble; 1F1B's peak activations on every rank",
             lambda pp, r, m: min(2 * pp, m + 1 + r), lambda pp: 1,
             lambda pp, F, B, W, FB: (pp - 1) * (F + B - 3 * W),
             "(PP-1)(F+B-3W), half-size chunks"),
    Schedule("dualpipev", "ScheduleDualPipeV", 2, "v", 1,
             "DualPipe cut in half (V shape): one copy of the parameters, PP + 1 stages of activations",
             lambda pp, r, m: 2 * pp + 1, lambda pp: 2 * pp,
             lambda pp, F, B, W, FB: (pp - 1) * (FB + B - 3 * W),
             "(PP/2-1)(F&B+B-3W), PP = 2 pp half-size stages"),
    Schedule("dualpipe", None, 2, "mirror", 2,
             "DeepSeek-V3's bidirectional schedule: two stages (twice the parameters) per rank, PP + 1 stages of "
             "activations (estimate only: torch ships DualPipeV)",
             lambda pp, r, m: pp + 1, lambda pp: pp,
             lambda pp, F, B, W, FB: (pp / 2 - 1) * (FB + B - 3 * W),
             "(PP/2-1)(F&B+B-3W)"),
)}

DEFAULT_SCHEDULE = "1f1b"


def get_schedule(name: str | Schedule) -> Schedule:
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise EstimateError(f"unknown --schedule '{name}'; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
