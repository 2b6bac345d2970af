"""The loss-spike guard: skip a batch that is out of line, roll back only when the weights went bad.

The guard judges every optimizer step before its update, from the step loss (the task's
objective over the step's micro-batches) and the gradient norm. Its policy is built so that a
healthy run cannot be hurt by it:

**1. Skip (fast spike).** The step's gradient is dropped, nothing else changes; the trainer logs
``{"event": "spike_skipped", ...}`` with the batch's document ids. A step is a fast spike when

- its loss or gradient norm is not finite (always checked, even with ``enabled = false``); or,
  after ``min_history`` accepted steps, when **every** enabled test below agrees (each one is a
  veto against skipping an ordinary batch; a threshold of 0 switches its test off). With ``m``
  the median of the last ``window`` accepted losses:

  - ``sigma``: loss > m + sigma x s, where s = 1.4826 x the median absolute deviation (a robust
    standard deviation: one hard batch does not move it), floored at 1% of |m|;
  - ``tail``: loss - m > tail x E, where E is the largest excess over the median ever accepted
    as ordinary (and at least the window's max - m, and 1% of |m|). A corpus that mixes easy
    and hard documents (short problems and prose) has a heavy upper tail: a prose-heavy batch
    can be 5x the median step loss and 100 deviations out. Those batches are ordinary, and the
    guard remembers how far out the hardest of them went; a spike must go ``tail`` times
    further. Measured (``tests/test_adversarial_spike.py``, the README): no ordinary batch
    skipped on the shipped corpus or a small clean one, while a garbage document is;
  - ``ratio``: loss > ratio x m (when m > 0: a policy loss of RL can be <= 0, where it abstains).

**2. Skips alone never roll back.** A run of skips is what a long garbage document looks like,
and skipping it is the cure. But it is also what damaged weights look like (every batch is out
of line because the model is). The guard tells them apart by asking the model: once
``max_skips`` steps were skipped within ``skip_window`` steps, each further skip re-measures the
loss and gradient norm of the **last accepted step's batch** (forward and backward, no update).
If the model now fails that ordinary batch by the same tests (a loss out of line, or a gradient
that is not finite), the loss trend itself has worsened: ``ROLLBACK``.
Otherwise the data is at fault: ``SKIP``, for as many steps as it takes.

**3. Roll back (slow blow-up)** when the loss trend of accepted steps climbs: the lower quartile
of the last ``trend_window`` accepted losses > ``trend_factor`` x the lowest such quartile seen
(when that is > 0). The lower quartile follows the easy batches, which every blow-up lifts, and
ignores runs of hard ones (a long prose document spans many consecutive steps).

**What a rollback may touch** (the trainer does it, ``loop.py``): it restores the newest
checkpoint this process wrote or resumed from (consecutive rollbacks with no new checkpoint go
one further back), never one older than the checkpoint this process resumed from, and moves the
data past the batches that led there. It deletes only abandoned-timeline checkpoints that this process wrote; a checkpoint
written before the process started is never deleted, nor is the last known-good one (the
checkpoint the run started from or rolled back to, or one the run went past to the next save
without a rollback); ``keep_last`` pruning keeps it too. Skipped steps write no checkpoint: a
save due at a skipped step waits for the next accepted one. More than ``max_rollbacks``
rollbacks in a row (without reaching a new known-good checkpoint), or none possible, stop the
run with :class:`~nanoseek.train.loop.TrainingDiverged`: one line naming the known-good
checkpoint, which ``RUN/latest`` then names, and how to resume from it.

A skipped or rolled-back step is *not* added to the window. The guard's state (window, largest
ordinary excess, skip history, best trend) is checkpointed with the run, so a resumed or
rolled-back run makes the same decisions as an uninterrupted one. ``enabled = false`` keeps
only the non-finite check (a NaN update would destroy the weights).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .config import SpikeSection

MAD_TO_STD = 1.4826       # a normal distribution's std / its median absolute deviation
FLOOR = 0.01              # spreads are floored at 1% of |median| (a flat plateau is not all spikes)


class Verdict(str, Enum):
    OK = "ok"                 # apply the update
    SKIP = "skip"             # drop this step's gradient (fast spike)
    ROLLBACK = "rollback"     # drop it and roll back to the last good checkpoint (the weights went bad)


@dataclass
class Decision:
    verdict: Verdict
    reason: str = ""


def _quartile(values: list[float]) -> float:
    """The lower quartile (25th percentile, linear interpolation) of ``values``."""
    v = sorted(values)
    pos = 0.25 * (len(v) - 1)
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


class SpikeGuard:
    def __init__(self, cfg: SpikeSection):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)     # accepted step losses
        self.skips: deque[int] = deque()                          # steps that were skipped
        self.best_trend: float = math.inf                         # lowest trend quartile so far
        self.max_excess: float = 0.0                              # largest accepted loss - median

    # ------------------------------------------------------------------ the decision
    def fast_spike(self, loss: float, grad_norm: float) -> str:
        """Why this step is a fast spike ("" if it is not)."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        c = self.cfg
        if not c.enabled or len(self.losses) < c.min_history:
            return ""
        window = list(self.losses)
        med = statistics.median(window)
        floor = FLOOR * abs(med)
        said = []
        if c.sigma > 0:
            s = max(MAD_TO_STD * statistics.median(abs(x - med) for x in window), floor)
            if loss <= med + c.sigma * s:
                return ""
            said.append(f"{(loss - med) / s:.0f} robust std")
        if c.tail > 0:
            excess = max(self.max_excess, max(window) - med, floor)
            if loss - med <= c.tail * excess:
                return ""
            said.append(f"{(loss - med) / excess:.1f}x the largest ordinary excess {excess:.3g}")
        if c.ratio > 0 and med > 0:                   # a ratio means nothing for losses <= 0 (RL)
            if loss <= c.ratio * med:
                return ""
            said.append(f"{loss / med:.1f}x the median")
        if not said:
            return ""
        return f"loss {loss:.4g} vs median {med:.4g} of the last {len(window)} accepted steps: " + ", ".join(said)

    def observe(self, step: int, loss: float, grad_norm: float,
                recheck: Callable[[], tuple[float, float] | None] | None = None) -> Decision:
        """Judge the step with 0-based index ``step`` before its optimizer update.

        ``recheck()``: the current model's (loss, gradient norm) on the last accepted step's
        batch (None when there is none); asked only while skips are frequent, to tell bad data
        from bad weights.
        """
        c = self.cfg
        why = self.fast_spike(loss, grad_norm)
        if why:
            self.skips.append(step)
            while self.skips and self.skips[0] <= step - c.skip_window:
                self.skips.popleft()
            if c.enabled and c.max_skips > 0 and c.skip_window > 0 and len(self.skips) >= c.max_skips \
                    and recheck is not None:
                again = recheck()
                if again is not None:
                    bad = self.fast_spike(*again)
                    if bad:
                        return Decision(Verdict.ROLLBACK, f"the model now fails the last accepted batch ({bad}) "
                                                          f"after {len(self.skips)} skipped steps within "
                                                          f"{c.skip_window} steps")
            return Decision(Verdict.SKIP, why)
        med = statistics.median(self.losses) if len(self.losses) >= max(c.min_history, 1) else None
        self.losses.append(loss)
        if c.enabled and c.trend_factor > 0 and len(self.losses) >= max(c.trend_window, c.min_history):
            trend = _quartile(list(self.losses)[-c.trend_window:])
            if self.best_trend > 0 and trend > c.trend_factor * self.best_trend:
                self.losses.pop()                                  # the rolled-back step is not history
                return Decision(Verdict.ROLLBACK, f"lower quartile of the last {c.trend_window} accepted losses "
                                                  f"{trend:.4g} > {c.trend_factor:g} x its best {self.best_trend:.4g}")
            self.best_trend = min(self.best_trend, trend)
        if med is not None:
            self.max_excess = max(self.max_excess, loss - med)
        return Decision(Verdict.OK)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skips": list(self.skips),
                "best_trend": None if math.isinf(self.best_trend) else self.best_trend,
                "max_excess": self.max_excess}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.cfg.window)
        self.skips = deque(int(x) for x in state["skips"])
        self.best_trend = math.inf if state.get("best_trend") is None else float(state["best_trend"])
        self.max_excess = float(state.get("max_excess", 0.0))


__all__ = ["SpikeGuard", "Verdict", "Decision"]
