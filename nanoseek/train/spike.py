"""The loss-spike guard: skip a batch that is out of line, roll back only when the weights are damaged.

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

**2. A rollback means the WEIGHTS are damaged, never that the data got harder.** Two alarms can
point at damaged weights: a run of skips (``max_skips`` within ``skip_window`` steps: every
batch out of line) and a rising loss trend of accepted steps (the lower quartile of the last
``trend_window`` accepted losses > ``trend_factor`` x the lowest such quartile seen). Both are
also what hard data looks like: a long garbage document skipped step after step, or a long
ordinary document (24K characters of documentation prose or source code in a corpus of short
tasks: ~50 steps at 3x the median loss) that lifts the trend. So an alarm alone never rolls
back; it asks the model. The **reference** is a fixed set of batches: the first micro-batch of
the first ``reference_batches`` accepted steps, kept by the trainer and checkpointed with it.
Its loss (evaluation mode: deterministic, no MoE load counts, no RNG draws) is recorded when the
set is complete and at every checkpoint save; the guard keeps the lowest (``ref_best``). On an
alarm it is measured again (loss and gradient norm; the step's own gradient is set aside), and
the step is ``ROLLBACK`` only if the model now does clearly worse on it: a gradient norm or loss
that is not finite, or a loss > ``damage_factor`` x ``ref_best`` (when ``ref_best`` > 0; a loss
that can be <= 0, an RL policy loss, is judged by finiteness only). Otherwise the data is at
fault: a skip stays a SKIP for as long as it takes, a trend alarm is accepted (``spike_checked``
is logged) and the trend's best is left as it was, so the alarm ends when the hard data has
passed. A passed check quiets the next ones for ``trend_window // 4`` steps (their cost:
``reference_batches`` forward passes). Before the reference exists there is nothing to ask, and
nothing rolls back. Every periodic save measures the reference first: damaged weights are never
written as a checkpoint (the save becomes a rollback), so whatever a rollback restores passed
this test. A blown-up learning rate damages the weights on every batch, the reference included:
it still rolls back. Measured (``tests/test_adversarial_spike.py``, tiny recipe on
``default_corpus_records(600)``): with 24K characters of Python documentation, 24K of argparse
source or 12K of documentation inserted, 0 skips and 0 rollbacks (10, 8 and 5 alarms
re-checked), where the trend test alone rolled back and diverged; a learning rate warming up to
1.0 over 200 steps is rolled back, refused saves included.

**What a rollback may touch** (the trainer does it, ``loop.py``): it restores the newest
checkpoint this process wrote or resumed from (consecutive rollbacks with no new checkpoint go
one further back), never one older than the checkpoint this process resumed from, and moves the
data past every batch drawn since that checkpoint (the whole stretch in which the weights went
bad, not only the last steps). It deletes only abandoned-timeline checkpoints that this process
wrote; a checkpoint written before the process started is never deleted, nor is the last
known-good one (the checkpoint the run started from or rolled back to, or one the run went past
to the next save without a rollback); ``keep_last`` pruning keeps it too. Skipped steps write no
checkpoint: a save due at a skipped step waits for the next accepted one. More than
``max_rollbacks`` rollbacks in a row (without reaching a new known-good checkpoint), or none
possible, stop the run with :class:`~nanoseek.train.loop.TrainingDiverged`: one line naming the
known-good checkpoint, which ``RUN/latest`` then names, and the command that resumes from it at
a tenth of the learning rate (``nanoseek pretrain`` prints it ready to run): since only damaged
weights roll back, a lower learning rate is the cure.

A skipped or rolled-back step is *not* added to the window. The guard's state (window, largest
ordinary excess, skip history, best trend, best reference loss, quiet period) and the reference
batches are checkpointed with the run, so a resumed or rolled-back run makes the same decisions
as an uninterrupted one. ``enabled = false`` keeps only the non-finite check (a NaN update would
destroy the weights); no reference is kept then.
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
        self.ref_best: float | None = None                        # lowest reference loss at a known-good point
        self.quiet_until: int = 0                                 # no re-check before this step (one just passed)
        self.last_reference: tuple[float, float] | None = None    # the last re-measurement (not state)

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

    def damage(self, reference: Callable[[], tuple[float, float] | None] | None) -> str:
        """Why the weights are damaged ("" if they are not, or it cannot be told): the model's
        (loss, gradient norm) now on the fixed reference batches, the loss against the best
        recorded at a known-good point."""
        got = self.last_reference = reference() if reference is not None else None
        if got is None:
            return ""
        now, grad_norm = got
        if not math.isfinite(grad_norm):
            return f"reference gradient norm {grad_norm}"
        if not math.isfinite(now):
            return f"reference loss {now}"
        best = self.ref_best
        if best is None or best <= 0:         # a loss that can be <= 0 (RL): only finiteness tells
            return ""
        if now > self.cfg.damage_factor * best:
            return f"reference loss {now:.4g} > {self.cfg.damage_factor:g} x its best {best:.4g}"
        return ""

    def record_reference(self, value: float | None) -> None:
        """The reference loss measured at a known-good point (a checkpoint save, the set's completion)."""
        if value is not None and math.isfinite(value):
            self.ref_best = value if self.ref_best is None else min(self.ref_best, value)

    def _may_check(self, step: int) -> bool:
        """A passed re-check quiets the next ones for ``trend_window // 4`` steps (their cost)."""
        return step >= self.quiet_until

    def _checked(self, step: int) -> None:
        self.quiet_until = step + max(1, self.cfg.trend_window // 4)

    def observe(self, step: int, loss: float, grad_norm: float,
                reference: Callable[[], tuple[float, float] | None] | None = None) -> Decision:
        """Judge the step with 0-based index ``step`` before its optimizer update.

        ``reference()``: the current model's (loss, gradient norm) on the reference batches (None while
        there are none); asked only when an alarm (frequent skips, a rising trend) must tell
        bad data from bad weights. A verdict of OK with a reason means an alarm was re-checked
        and the weights were found sound.
        """
        c = self.cfg
        why = self.fast_spike(loss, grad_norm)
        if why:
            self.skips.append(step)
            while self.skips and self.skips[0] <= step - c.skip_window:
                self.skips.popleft()
            if c.enabled and c.max_skips > 0 and c.skip_window > 0 and len(self.skips) >= c.max_skips \
                    and self._may_check(step):
                bad = self.damage(reference)
                if bad:
                    return Decision(Verdict.ROLLBACK, f"the weights are damaged ({bad}) after "
                                                      f"{len(self.skips)} skipped steps within {c.skip_window} steps")
                self._checked(step)
            return Decision(Verdict.SKIP, why)
        med = statistics.median(self.losses) if len(self.losses) >= max(c.min_history, 1) else None
        self.losses.append(loss)
        said = ""
        if c.enabled and c.trend_factor > 0 and len(self.losses) >= max(c.trend_window, c.min_history):
            trend = _quartile(list(self.losses)[-c.trend_window:])
            if self.best_trend > 0 and trend > c.trend_factor * self.best_trend:
                said = (f"lower quartile of the last {c.trend_window} accepted losses {trend:.4g} > "
                        f"{c.trend_factor:g} x its best {self.best_trend:.4g}")
                if self._may_check(step):
                    bad = self.damage(reference)
                    if bad:
                        self.losses.pop()                          # the rolled-back step is not history
                        return Decision(Verdict.ROLLBACK, f"{said}, and the weights are damaged ({bad})")
                    self._checked(step)
                    said += (", but the reference batches are fine (harder data, not damaged weights)"
                             if self.last_reference is not None else ", with no reference yet to tell: not rolled back")
                else:
                    said = ""                                     # within a passed check's quiet period
            else:
                self.best_trend = min(self.best_trend, trend)
        if med is not None:
            self.max_excess = max(self.max_excess, loss - med)
        return Decision(Verdict.OK, said)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skips": list(self.skips),
                "best_trend": None if math.isinf(self.best_trend) else self.best_trend,
                "max_excess": self.max_excess, "ref_best": self.ref_best, "quiet_until": self.quiet_until}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.cfg.window)
        self.skips = deque(int(x) for x in state["skips"])
        self.best_trend = math.inf if state.get("best_trend") is None else float(state["best_trend"])
        self.max_excess = float(state.get("max_excess", 0.0))
        self.ref_best = None if state.get("ref_best") is None else float(state["ref_best"])
        self.quiet_until = int(state.get("quiet_until", 0))


__all__ = ["SpikeGuard", "Verdict", "Decision"]
