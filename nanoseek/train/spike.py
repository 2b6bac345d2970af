"""The loss-spike guard: skip a fast spike, roll back a slow blow-up.

Large runs die two ways, and the guard answers each:

* **Fast spike**: one batch whose loss is far out of line (a corrupt document, a numerical
  accident). Verdict ``SKIP``: the trainer drops the batch's gradient without an optimizer
  update and logs ``{"event": "spike_skipped", ...}`` with the batch's document ids. Tests, on the
  step loss (the task's objective, averaged over the step's micro-batches):

  - the loss or the gradient norm is not finite (always checked, even before ``min_history``);
  - after ``min_history`` accepted steps, loss > mean + ``sigma`` x std of the last ``window``
    accepted losses (std floored at 1% of the mean so a flat plateau does not flag noise);
  - or loss > ``ratio`` x the median of that window (when the median is positive: policy losses
    of RL can be negative, where only the sigma test applies).

* **Slow blow-up**: the loss drifts up over many steps, or spikes keep coming. Verdict
  ``ROLLBACK``: the trainer restores the last good checkpoint and moves the data past the
  batches that led here (see ``loop.py``), logging ``{"event": "rollback", ...}``. Tests:

  - ``max_skips`` skips within the last ``skip_window`` steps;
  - the mean of the last ``trend_window`` accepted losses > ``trend_factor`` x the lowest such
    mean seen so far (the curve climbed back well above where it had been).

A skipped or rolled-back step is *not* added to the window. The guard's state (window, skip
history, best mean) is checkpointed with the run, so a resumed or rolled-back run makes the same
decisions as an uninterrupted one. Set a threshold to 0 to switch its test off; ``enabled =
false`` keeps only the non-finite check (a NaN update would destroy the weights).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from enum import Enum

from .config import SpikeSection


class Verdict(str, Enum):
    OK = "ok"                 # apply the update
    SKIP = "skip"             # drop this step's gradient (fast spike)
    ROLLBACK = "rollback"     # drop it and roll back to the last good checkpoint (slow blow-up)


@dataclass
class Decision:
    verdict: Verdict
    reason: str = ""


class SpikeGuard:
    def __init__(self, cfg: SpikeSection):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)     # accepted step losses
        self.skips: deque[int] = deque()                          # steps that were skipped
        self.best_trend: float = math.inf                         # lowest trend_window mean so far

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
        mean = statistics.fmean(window)
        if c.sigma > 0:
            std = max(statistics.pstdev(window), 0.01 * abs(mean))
            if loss > mean + c.sigma * std:
                return f"loss {loss:.4g} > mean {mean:.4g} + {c.sigma:g} x std {std:.3g} of the last {len(window)} steps"
        if c.ratio > 0:
            median = statistics.median(window)
            if median > 0 and loss > c.ratio * median:     # a ratio means nothing for losses <= 0 (RL)
                return f"loss {loss:.4g} > {c.ratio:g} x median {median:.4g} of the last {len(window)} steps"
        return ""

    def observe(self, step: int, loss: float, grad_norm: float) -> Decision:
        """Judge the step with 0-based index ``step`` before its optimizer update."""
        c = self.cfg
        why = self.fast_spike(loss, grad_norm)
        if why:
            self.skips.append(step)
            while self.skips and self.skips[0] <= step - c.skip_window:
                self.skips.popleft()
            if c.enabled and c.max_skips > 0 and c.skip_window > 0 and len(self.skips) >= c.max_skips:
                return Decision(Verdict.ROLLBACK, f"{len(self.skips)} skipped steps within {c.skip_window} steps "
                                                  f"(last: {why})")
            return Decision(Verdict.SKIP, why)
        self.losses.append(loss)
        if c.enabled and c.trend_factor > 0 and len(self.losses) >= max(c.trend_window, c.min_history):
            trend = statistics.fmean(list(self.losses)[-c.trend_window:])
            if trend > c.trend_factor * self.best_trend:
                self.losses.pop()                                  # the rolled-back step is not history
                return Decision(Verdict.ROLLBACK, f"mean loss of the last {c.trend_window} steps {trend:.4g} > "
                                                  f"{c.trend_factor:g} x its best {self.best_trend:.4g}")
            self.best_trend = min(self.best_trend, trend)
        return Decision(Verdict.OK)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skips": list(self.skips),
                "best_trend": None if math.isinf(self.best_trend) else self.best_trend}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.cfg.window)
        self.skips = deque(int(x) for x in state["skips"])
        self.best_trend = math.inf if state.get("best_trend") is None else float(state["best_trend"])


__all__ = ["SpikeGuard", "Verdict", "Decision"]
