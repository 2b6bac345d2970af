"""Confidence intervals for accuracy figures, as evaluation reports need them.

Accuracy on a held-out set is a mean over N problems of a per-problem score (1/0 for one
sample, the fraction correct for pass@1 averaged over k samples). Its 95% interval is Wilson's:
for 0/1 scores over the N problems, for fractional ones at the effective sample size the
per-problem variance implies (:func:`mean_interval`); the normal interval would collapse onto
the mean near 0% and 100%. Two stages evaluated on the SAME problems are compared
with the paired interval of the per-problem differences, which is much tighter than comparing
two independent intervals: "B beats A by more than the 95% interval" means the paired
interval's lower bound is above zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (N={self.n})"


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """Wilson score interval for a binomial proportion."""
    if n <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(scores: list[float], z: float = Z95, samples: int | None = None) -> Interval:
    """95% interval of a mean of per-problem scores in [0, 1]: Wilson when all are 0/1; otherwise
    (pass@1 averaged over k samples per problem) Wilson at Kish's effective sample size
    ``n_eff = m(1-m) N / var``, the number of independent samples the per-problem variance is
    worth, between N problems and N x ``samples`` draws. In the middle of the range this is the
    normal interval; near 0% and 100%, where the normal interval collapses onto the mean (one
    sample right out of 80 gave [0.0, 3.7]), it keeps Wilson's asymmetric width."""
    n = len(scores)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if all(s in (0, 1, 0.0, 1.0) for s in scores):
        return wilson(sum(scores), n, z)
    m = sum(scores) / n
    var = sum((s - m) ** 2 for s in scores) / max(n - 1, 1)
    most = n * samples if samples else math.inf
    n_eff = min(most, m * (1 - m) * n / var) if var > 0 else most
    if not math.isfinite(n_eff):          # every problem the same fraction, k unknown: the normal interval
        return Interval(m, m, m, n)
    w = wilson(m * max(n_eff, n), max(n_eff, n), z)
    return Interval(m, w.low, w.high, n)


# Student's t two-sided 95% quantiles by degrees of freedom (1-30); beyond 30 the normal 1.96 is within 4%.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (for a few seeds)."""
    if df < 1:
        raise ValueError(f"t95 needs df >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else Z95


def t_interval(values: list[float]) -> Interval:
    """95% interval of the mean of a few measurements (seeds), by Student's t (n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    m = sum(values) / n
    half = t95(n - 1) * math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1) / n)
    return Interval(m, m - half, m + half, n)


def paired_difference(a: list[float], b: list[float], z: float = Z95) -> Interval:
    """Interval of mean(b - a) over the same problems (b's gain over a)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same problems: {len(a)} vs {len(b)} scores")
    n = len(a)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    d = [y - x for x, y in zip(a, b)]
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return Interval(m, m - half, m + half, n)
