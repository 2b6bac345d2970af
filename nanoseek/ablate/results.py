"""Ablation results: read one run folder back, and compare two arms over seeds.

The runner leaves one run folder per arm and seed (``SUITE/runs/ARM/seedN``, written by the
shared training loop, plus ``ablate_arm.json`` naming the arm). This module reads them back and
judges differences; :mod:`.suites` uses :func:`compare` for each claim's verdict and
:mod:`.report` writes the tables and plots, so both import this module and not each other.

* :func:`load_seed_run`: the validation-loss curve (eval events) against tokens, training FLOPs
  (tokens x FLOPs/token of the arm) and wall-clock seconds, the final validation loss, the
  median tokens/s, and MaxVio per step (the loop's per-MoE-layer list, averaged over layers);
* :func:`compare`: arm A against arm B on one metric: the difference of the means over seeds,
  the paired per-seed differences, their 95% interval over seeds (Student's t, so three seeds
  pay t = 4.30) and whether the difference is *clear*: the interval excludes zero. Otherwise
  the comparison is unresolved, and the interval's farther end bounds the effect at this power.
  With one seed there is no interval and ``clear`` is None.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..eval.stats import Interval, t_interval

ARM_FILE = "ablate_arm.json"
METRICS = ("final_val_loss", "maxvio_mean", "maxvio_final", "tokens_per_s", "wall_s")


class ReportError(ValueError):
    """A run folder is missing, unfinished or inconsistent with the suite."""


# ---------------------------------------------------------------------------- one run
@dataclass
class SeedRun:
    seed: int
    run_dir: str
    final_val_loss: float
    curve: list[dict[str, float]]          # {"step", "tokens", "flops", "wall_s", "val_loss"} per evaluation
    maxvio: list[list[float]]              # [step, MaxVio averaged over MoE layers] per step (empty: dense)
    tokens: int
    wall_s: float
    tokens_per_s: float
    config_seed: int                       # [train] seed recorded in the run's config.toml
    maxvio_mean: float | None = None       # over all steps
    maxvio_final: float | None = None      # over the last 10% of steps

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


def load_seed_run(run_dir: str | Path, flops_per_token: float) -> SeedRun:
    """Read one finished run folder (``metrics.jsonl``, ``config.toml``, ``ablate_arm.json``)."""
    from ..train.metrics import events, read_metrics, step_records

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (the run did not start)")
    records = read_metrics(run_dir)
    steps = step_records(records)
    evals = [e for e in events(records, "eval") if "val_loss" in e]
    if not events(records, "done"):
        raise ReportError(f"{run_dir}/metrics.jsonl: no 'done' event (the run did not finish)")
    if not evals:
        raise ReportError(f"{run_dir}/metrics.jsonl: no eval event with val_loss")
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
        arm = json.loads((run_dir / ARM_FILE).read_text())
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{run_dir}: cannot read config.toml / {ARM_FILE}: {e}") from None
    evals = list({e["step"]: e for e in evals}.values())            # last eval of each step
    curve = []
    for e in evals:
        rec = steps.get(e["step"], {})
        tokens = rec.get("tokens_seen", e["step"] * arm["tokens_per_step"])
        curve.append({"step": e["step"], "tokens": tokens, "flops": tokens * flops_per_token,
                      "wall_s": rec.get("elapsed", float("nan")), "val_loss": float(e["val_loss"])})
    maxvio = [[s, statistics.fmean(r["maxvio"])] for s, r in steps.items() if r.get("maxvio")]
    tps = [r["tokens_per_s"] for r in steps.values() if r.get("tokens_per_s")]
    last = steps[max(steps)] if steps else {}
    run = SeedRun(seed=int(arm["seed"]), run_dir=str(run_dir), final_val_loss=curve[-1]["val_loss"], curve=curve,
                  maxvio=maxvio, tokens=int(last.get("tokens_seen", 0)), wall_s=float(last.get("elapsed", 0.0)),
                  tokens_per_s=statistics.median(tps) if tps else float("nan"),
                  config_seed=int(cfg.get("train", {}).get("seed", -1)))
    if maxvio:
        vals = [v for _, v in maxvio]
        run.maxvio_mean = statistics.fmean(vals)
        run.maxvio_final = statistics.fmean(vals[-max(1, len(vals) // 10):])
    return run


# ---------------------------------------------------------------------------- one arm
@dataclass
class ArmResult:
    name: str
    label: str
    info: dict[str, Any]                   # Arm.info(): params, KV bytes, FLOPs/token
    note: str = ""
    runs: list[SeedRun] = field(default_factory=list)

    def values(self, metric: str) -> dict[int, float]:
        return {r.seed: r.value(metric) for r in self.runs if r.value(metric) is not None}

    def mean(self, metric: str) -> float:
        v = list(self.values(metric).values())
        return statistics.fmean(v) if v else float("nan")

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        v = list(self.values(metric).values())
        return statistics.stdev(v) if len(v) > 1 else 0.0


@dataclass
class Comparison:
    metric: str
    diff: float                            # mean(a) - mean(b)
    rel: float                             # diff / mean(b)
    per_seed: dict[int, float]             # a - b for each seed both ran
    per_seed_rel: dict[int, float]
    spread: float                          # larger of the two arms' seed standard deviations
    clear: bool | None                     # the interval excludes 0; None: one seed, nothing to judge against
    interval: Interval | None = None       # 95% t interval of the mean paired difference over seeds (>= 2)

    @property
    def bound(self) -> float:
        """What the seeds can still not rule out: |effect| <= this (the interval's farther end)."""
        return max(abs(self.interval.low), abs(self.interval.high)) if self.interval else float("nan")

    def text(self, what: str = "loss") -> str:
        word = "lower" if self.diff < 0 else "higher"
        s = f"{what} {word} by {abs(self.diff):.4f} ({100 * abs(self.rel):.2f}%)"
        n = len(self.per_seed)
        if self.clear is None:                  # one seed: the suite's text says so once
            return s
        paired = ", ".join(f"{d:+.4f}" for d in self.per_seed.values())
        ci = f"95% interval over {n} seeds [{self.interval.low:+.4f}, {self.interval.high:+.4f}]"
        if self.clear:
            return s + f", {ci} (per seed {paired})"
        return s + f", unresolved: the {ci} includes 0, so |effect| < {self.bound:.4f} at this power (per seed {paired})"


def made_with(eval_file: Path, settings: dict[str, Any]) -> bool:
    """Whether the evaluation saved at ``eval_file`` was made with ``settings`` (its ``config`` has
    each of them); a missing or unreadable file is not (the evaluation is redone)."""
    try:
        cfg = json.loads(Path(eval_file).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(cfg, dict) and all(cfg.get(k) == v for k, v in settings.items())


def same_config(saved: str, resolved: str) -> bool:
    """Whether a run's saved ``config.toml`` is the config ``resolved`` would train: the same text
    but for comment lines (the header names the file the config came from, which moves with the
    installation: a reinstalled nanoseek must not retrain finished runs)."""
    def body(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return body(saved) == body(resolved)


def compare(a: ArmResult, b: ArmResult, metric: str = "final_val_loss") -> Comparison:
    """A against B on ``metric`` (see the module docstring for when a difference is clear)."""
    va, vb = a.values(metric), b.values(metric)
    if not va or not vb:
        raise ReportError(f"no {metric} for {a.name if not va else b.name}")
    return _comparison(metric, va, vb, max(a.std(metric), b.std(metric)))


def loss_at(curve: list[dict[str, float]], wall_s: float) -> float:
    """The validation loss of ``curve`` at ``wall_s`` seconds of training, interpolated linearly
    between evaluations (the last one's loss after the run ended, the first one's before it)."""
    pts = [(p["wall_s"], p["val_loss"]) for p in curve if p.get("wall_s") is not None and p.get("val_loss") is not None]
    if not pts:
        raise ReportError("a run's curve has no timed validation loss")
    if wall_s <= pts[0][0]:
        return pts[0][1]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if wall_s <= t1:
            return l0 + (l1 - l0) * (wall_s - t0) / (t1 - t0) if t1 > t0 else l1
    return pts[-1][1]


def tokens_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """Training tokens at which ``curve``'s validation loss first reaches ``target``, interpolated
    linearly between evaluations (the first evaluation's tokens if it is already there); None if the
    curve never gets there."""
    prev = None
    for t, v in ((p["tokens"], p["val_loss"]) for p in curve if p.get("val_loss") is not None):
        if v <= target:
            if prev is None:
                return float(t)
            t0, v0 = prev                                       # v0 > target >= v
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        prev = (t, v)
    return None


def tokens_ratio(a: ArmResult, b: ArmResult) -> dict[int, float | None]:
    """Per seed: the fraction of B's training tokens A needed to reach B's final validation loss
    (:func:`tokens_to_reach`; None where A never reached it). 0.5: A needs half of B's data (and,
    at equal FLOPs per token, half its compute) for the same loss."""
    ra, rb = {r.seed: r for r in a.runs}, {r.seed: r for r in b.runs}
    out: dict[int, float | None] = {}
    for s in sorted(set(ra) & set(rb)):
        reached = tokens_to_reach(ra[s].curve, rb[s].final_val_loss)
        out[s] = None if reached is None else reached / rb[s].curve[-1]["tokens"]
    return out


def compare_at_wall(a: ArmResult, b: ArmResult) -> Comparison:
    """A against B at equal training time: per seed, both runs' validation loss at the moment the
    sooner of the two ended (:func:`loss_at`), paired over seeds as :func:`compare` pairs them."""
    ra, rb = {r.seed: r for r in a.runs}, {r.seed: r for r in b.runs}
    va, vb = {}, {}
    for s in sorted(set(ra) & set(rb)):
        t = min(ra[s].curve[-1]["wall_s"], rb[s].curve[-1]["wall_s"])
        va[s], vb[s] = loss_at(ra[s].curve, t), loss_at(rb[s].curve, t)
    if not va:
        raise ReportError(f"no seed in common between {a.name} and {b.name}")
    spread = max(statistics.stdev(v.values()) if len(v) > 1 else 0.0 for v in (va, vb))
    return _comparison("val_loss_at_equal_time", va, vb, spread)


def _comparison(metric: str, va: dict[int, float], vb: dict[int, float], spread: float) -> Comparison:
    ma, mb = statistics.fmean(va.values()), statistics.fmean(vb.values())
    diff = ma - mb
    common = sorted(set(va) & set(vb))
    per_seed = {s: va[s] - vb[s] for s in common}
    per_seed_rel = {s: (va[s] - vb[s]) / vb[s] if vb[s] else float("nan") for s in common}
    interval = t_interval(list(per_seed.values())) if len(common) >= 2 else None
    clear = None if interval is None else (interval.low > 0 or interval.high < 0)
    return Comparison(metric, diff, diff / mb if mb else float("nan"), per_seed, per_seed_rel, spread, clear,
                      interval)


def points(x: float) -> str:
    """An accuracy difference (a fraction) in percentage points, for a status."""
    return f"{100 * x:.1f} points"


def claim_status(comp, expect_lower: bool, unit: Callable[[float], str] = lambda x: f"{x:.3g}") -> str:
    """One comparison whose claimed direction is ``a`` lower (``expect_lower``) than ``b``.

    With one seed there is no spread to judge a difference against (and where two seeds ran here,
    seeds differed by several percent), so the result is only a direction: "for" / "against".
    """
    agrees = (comp.diff < 0) == expect_lower
    if comp.clear is None:
        return "for" if agrees else "against"
    if not comp.clear:
        return f"unresolved: |effect| < {unit(comp.bound)} at this power"
    return "held" if agrees else "did not hold"


def combine_statuses(statuses: list[str]) -> str:
    """One status for a claim with one or several parts."""
    if any(s in ("for", "against") for s in statuses):
        n_for = statuses.count("for")
        return (f"unresolved (one seed; {n_for} of {len(statuses)} comparisons point towards "
                "the claim)" if len(statuses) > 1 else
                f"unresolved (one seed; the difference points {'towards' if n_for else 'against'} "
                "the claim)")
    held, failed = statuses.count("held"), statuses.count("did not hold")
    if held == len(statuses):
        return "held"
    if held:
        return "partly held"
    if failed:
        return "did not hold"
    return statuses[0] if len(statuses) == 1 else "unresolved at this power"


__all__ = ["SeedRun", "ArmResult", "Comparison", "ReportError", "load_seed_run", "compare", "compare_at_wall", "loss_at", "made_with", "same_config", "claim_status",
           "combine_statuses", "ARM_FILE",
           "METRICS"]
