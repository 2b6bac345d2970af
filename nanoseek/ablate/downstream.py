"""Downstream evaluation in a pre-training suite: every run's final model on held-out task problems.

The pre-training suites judge the validation loss; a claim DeepSeek measured on benchmarks (MTP:
DeepSeek-V3's Table 4) is also judged here on task accuracy. A suite with a :class:`Downstream`
spec (``Suite.downstream``; the ``mtp`` suite has one) has each finished run's final model
evaluated with ``nanoseek eval``'s harness (:func:`nanoseek.eval.harness.evaluate`: the same
held-out problems, prompts and sampling seeds for every run), saved as the run's
``downstream.json`` with every problem's pass@1. Arms named in ``speculative_arms`` decode with
their own MTP module as the draft (self-speculative decoding: the same greedy answers, tested in
the engine) and record the share of drafts accepted and the tokens per forward step.

:func:`evaluate_suite` runs the evaluations a suite's runs lack, after its training and inside
its claim (one at a time, or ``jobs`` at once through :func:`.pool.run_jobs`); a re-run
redoes only what is missing or was made with other settings. :func:`summarize` reads them back
for the report (:func:`.report.downstream_markdown` renders it): per arm and seed the pass@1 (and
acceptance), and each comparison by the suites' rule (:func:`nanoseek.ablate.results.compare`: the
95% t interval of the per-seed differences), with the per-seed paired intervals over problems.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FILE = "downstream.json"


@dataclass(frozen=True)
class Downstream:
    """What a suite's runs are evaluated on (``nanoseek eval`` settings) and which arms are compared."""
    tasks: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...]    # (arm, baseline): the claim is arm > baseline
    n_problems: int = 100                       # per task
    k: int = 1
    temperature: float = 0.0                    # greedy: one deterministic answer per problem
    max_new_tokens: int = 64
    mode: str = "fewshot"                       # a base model answers after worked examples
    speculative_arms: tuple[str, ...] = ()      # arms whose MTP module drafts (acceptance recorded)
    batch_size: int = 256

    def settings(self) -> dict[str, Any]:
        """The EvalConfig fields (``downstream.json``'s ``config`` must match them to count as current)."""
        return {"tasks": list(self.tasks), "n_problems": self.n_problems, "k": self.k, "mode": self.mode,
                "temperature": self.temperature, "max_new_tokens": self.max_new_tokens}


def for_plan(ds: Downstream | None, n_problems: int | None) -> Downstream | None:
    """The suite's spec at the plan's ``--downstream-n`` (None: the spec's own; 0: no evaluation)."""
    if ds is None or n_problems is None:
        return ds
    return dataclasses.replace(ds, n_problems=n_problems) if n_problems > 0 else None


def current(run_dir: Path, ds: Downstream) -> bool:
    from .results import made_with
    return made_with(Path(run_dir) / FILE, ds.settings())


def evaluate_run(run_dir: str | Path, ds: Downstream, speculative: bool, device: str = "cpu"):
    """``run_dir/final`` on the spec's problems; saves ``run_dir/downstream.json``, returns the EvalResult."""
    from ..eval.harness import EvalConfig, evaluate_checkpoint

    cfg = EvalConfig(**ds.settings(), batch_size=ds.batch_size).validate()
    result = evaluate_checkpoint(Path(run_dir) / "final", cfg, ds.mode, device=device, use_mtp=speculative)
    result.save(Path(run_dir) / FILE)
    return result


def _evaluate_in_worker(run_dir: Path, ds: Downstream, speculative: bool, device: str, threads: int | None,
                        held: list[str]) -> None:
    import sys

    from .pool import INTERRUPTED_EXIT, worker_setup

    worker_setup(held, threads)
    try:
        evaluate_run(run_dir, ds, speculative, device)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


def evaluate_suite(ds: Downstream, runs: list[tuple[str, int, Path]], device: str = "cpu", jobs: int = 1,
                   threads: int | None = None, log: Callable[[str], None] = print) -> None:
    """Evaluate every run of ``runs`` ((arm, seed, run folder)) that lacks a current ``downstream.json``."""
    import time

    todo = [(a, s, d) for a, s, d in runs if not current(d, ds)]
    if not todo:
        return
    if jobs <= 1:
        for i, (arm, seed, run_dir) in enumerate(todo, 1):
            t0 = time.perf_counter()
            res = evaluate_run(run_dir, ds, arm in ds.speculative_arms, device)
            extra = res.model.get("mtp_acceptance")
            log(f"[{i}/{len(todo)}] downstream {arm} seed {seed}: pass@1 {res.pass1()}"
                + (f", MTP drafts accepted {extra:.1%}" if extra is not None else "")
                + f" in {time.perf_counter() - t0:.0f}s")
        return
    import os

    from ..claims import HELD
    from .pool import Job, run_jobs

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    held = sorted(HELD)

    def job(arm: str, seed: int, run_dir: Path) -> Job:
        def done() -> str:
            if not current(run_dir, ds):
                raise RuntimeError(f"exit code 0 but {run_dir / FILE} was not written")
            return "evaluated"
        return Job(f"downstream {arm} seed {seed}", _evaluate_in_worker,
                   (run_dir, ds, arm in ds.speculative_arms, device, threads, held), done=done)

    log(f"{len(todo)} downstream evaluations, {min(jobs, len(todo))} at a time")
    run_jobs([job(*t) for t in todo], jobs, log)


# ---------------------------------------------------------------------------- reading back
@dataclass
class _Run:
    seed: int
    pass1: float
    scores: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric, None)


def summarize(ds: Downstream, labels: dict[str, str], runs: list[tuple[str, int, Path]]) -> dict[str, Any] | None:
    """The report's downstream section: per arm and seed pass@1 (and MTP acceptance), and each of
    ``ds.comparisons`` judged by the suites' rule; None when a run has no current evaluation."""
    from ..eval.results import EvalFileError, EvalResult
    from ..eval.stats import paired_difference
    from .results import ArmResult, compare
    from .results import claim_status, points

    arms: dict[str, dict[str, Any]] = {}
    results: dict[str, ArmResult] = {}
    for arm, seed, run_dir in runs:
        if not current(run_dir, ds):
            return None
        try:
            ev = EvalResult.load(Path(run_dir) / FILE)
        except EvalFileError:
            return None
        p1 = ev.pass1()
        a = arms.setdefault(arm, {"label": labels.get(arm, arm), "pass1": {}, "acceptance": {},
                                  "tokens_per_step": {}})
        a["pass1"][seed] = p1.mean if p1 else float("nan")
        for key, field_ in (("acceptance", "mtp_acceptance"), ("tokens_per_step", "mtp_tokens_per_step")):
            if ev.model.get(field_) is not None:
                a[key][seed] = ev.model[field_]
        results.setdefault(arm, ArmResult(arm, labels.get(arm, arm), {})).runs.append(
            _Run(seed, a["pass1"][seed], ev.scores()))
    comparisons = []
    for arm, base in ds.comparisons:
        if arm not in results or base not in results:
            continue
        comp = compare(results[arm], results[base], "pass1")
        by_seed = {r.seed: r for r in results[base].runs}
        per_seed = {}
        for r in results[arm].runs:
            if r.seed in by_seed:
                shared = [p for p in by_seed[r.seed].scores if p in r.scores]
                per_seed[r.seed] = paired_difference([by_seed[r.seed].scores[p] for p in shared],
                                                     [r.scores[p] for p in shared]).to_dict()
        comparisons.append({"arm": arm, "baseline": base, "diff": comp.diff,
                            "interval": comp.interval.to_dict() if comp.interval else None,
                            "per_seed": per_seed, "status": claim_status(comp, expect_lower=False, unit=points)})
    for a in arms.values():
        a["mean"] = statistics.fmean(a["pass1"].values())
    return {"settings": dataclasses.asdict(ds), "arms": arms, "comparisons": comparisons}


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe(summary: dict[str, Any]) -> str:
    """One sentence per comparison, for the verdict's summary."""
    out = []
    for c in summary["comparisons"]:
        a, b = summary["arms"][c["arm"]], summary["arms"][c["baseline"]]
        iv = c["interval"]
        ci = (f", 95% interval over {iv['n']} seeds [{_pts(iv['low'])}, {_pts(iv['high'])}]" if iv else " (one seed)")
        out.append(f"Downstream held-out pass@1, {a['label']} vs {b['label']}: {100 * a['mean']:.1f}% vs "
                   f"{100 * b['mean']:.1f}%, {_pts(c['diff'])} points{ci}: {c['status']}.")
    return " ".join(out)


__all__ = ["Downstream", "FILE", "for_plan", "current", "evaluate_run", "evaluate_suite", "summarize",
           "describe"]
