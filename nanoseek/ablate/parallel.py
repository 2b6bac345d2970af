"""``nanoseek ablate --jobs N`` for the pre-training suites: their runs trained N at a time, each in its own process.

:func:`run_suites` queues exactly the runs :func:`nanoseek.ablate.runner.run_suite` would train (the
same configs, the same reuse of finished runs), seed by seed across the suites, and trains each in a
fresh process (:func:`_train_in_worker`) through :func:`nanoseek.ablate.pool.run_jobs`; a run that is
the same as one of another suite is trained once and copied. Then the suites' downstream
evaluations (:mod:`.downstream`) run the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic
from .pool import INTERRUPTED_EXIT, Job, fresh_run_dir, run_jobs, worker_setup
from .results import ARM_FILE
from .runner import (Plan, _finished, arm_record, copy_twin, evaluate_downstream, find_twin, is_suite_dir,
                     precision_hooks, train_config, twin_key)
from .suites import Suite


def _train_in_worker(cfg, hooks: list, threads: int | None, train_fn: Callable | None, held: list[str]) -> None:
    """One pre-training run in its own process (:func:`run_suites`). Exits with
    :data:`INTERRUPTED_EXIT` when the run was stopped, 0 when it finished, 1 when it raised."""
    import sys

    worker_setup(held, threads)
    if train_fn is None:
        from ..train.pretrain import pretrain as train_fn
    result = train_fn(cfg, progress=False, quiet=True, hooks=hooks)
    if getattr(result, "status", "done") == "interrupted":
        sys.exit(INTERRUPTED_EXIT)


def _last_val_loss(run_dir: Path) -> float | None:
    from ..train.metrics import events, read_metrics
    try:
        evals = events(read_metrics(run_dir), "eval")
    except (OSError, ValueError):
        return None
    return evals[-1].get("val_loss") if evals else None


def run_suites(entries: list[tuple[Suite, Plan, Path]], jobs: int, threads: int | None = None,
               train_fn: Callable | None = None, log: Callable[[str], None] = print) -> dict[str, list[Path]]:
    """Train the pending runs of several pre-training suites, up to ``jobs`` at once (:func:`run_jobs`).

    The runs are those :func:`run_suite` would train, queued seed by seed across the suites (the
    first seed of every suite first, so a stopped batch leaves complete pairs); finished runs with
    the identical config are reused as there, and a run that is the same as one of another suite
    (the base model is an arm of five suites) is trained once and copied
    (:func:`~nanoseek.ablate.runner.find_twin`). Each run is a fresh (spawned) process training
    through the same ``train_fn`` with ``threads`` torch threads (default: the machine's cores
    shared among the jobs). Every run is the one a sequential suite would train (same config, data
    order and seed), so the results do not depend on ``jobs`` (tested); only the wall-clock figures
    do, since the runs share the machine. Stopping and failures: :func:`run_jobs`. ``train_fn`` must
    be picklable (a module-level function). A suite with a downstream evaluation
    (:mod:`.downstream`) then has its runs evaluated, ``jobs`` at once. Returns ``{suite: run folders}``.
    """
    import contextlib
    import os

    from ..outdir import claim
    from ..train.config import config_to_toml

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    done: dict[str, list[Path]] = {suite.name: [] for suite, _, _ in entries}
    queue = []
    twins: dict[str, list] = {}                 # twin_key -> runs of other suites that are the same run
    with contextlib.ExitStack() as stack:
        for suite, plan, suite_dir in entries:
            suite_dir = Path(suite_dir)
            stack.enter_context(claim(suite_dir, "ablate", flag="--out", own=is_suite_dir))
            suite_dir.mkdir(parents=True, exist_ok=True)
            plan.planned_seeds = plan.planned_seeds or list(plan.seeds)
            write_atomic(suite_dir / "plan.json", json.dumps(plan.to_dict(), indent=1) + "\n")
        for k in range(max(len(plan.seeds) for _, plan, _ in entries)):
            for suite, plan, suite_dir in entries:
                if k >= len(plan.seeds):
                    continue
                seed = plan.seeds[k]
                for arm in suite.arms:
                    run_dir = Path(suite_dir) / "runs" / arm.name / f"seed{seed}"
                    cfg = train_config(arm, plan, seed, run_dir)
                    text = config_to_toml(cfg)
                    key = twin_key(text, arm.precision)
                    if _finished(run_dir, text) and (run_dir / ARM_FILE).is_file():
                        log(f"{suite.name}/{arm.name} seed {seed}: already finished in {run_dir}, reused")
                        done[suite.name].append(run_dir)
                    elif key in twins:                  # the same run as one queued for another suite
                        twins[key].append((suite, arm, seed, run_dir, text, arm_record(suite, arm, seed, plan)))
                    elif (twin := find_twin(suite_dir, key, suite.name)) is not None:
                        copy_twin(twin, run_dir, text, arm_record(suite, arm, seed, plan))
                        log(f"{suite.name}/{arm.name} seed {seed}: the same run as {twin}, copied")
                        done[suite.name].append(run_dir)
                    else:
                        twins[key] = []
                        queue.append((suite, plan, arm, seed, run_dir, cfg, text))
        n, n_twins = len(queue), sum(len(v) for v in twins.values())
        if n:
            _train(queue, twins, done, jobs, threads, train_fn, n, n_twins, log)
        for suite, plan, suite_dir in entries:                  # then what the runs are evaluated on
            evaluate_downstream(suite, plan, suite_dir, jobs, threads, log)
    return done


def _train(queue: list, twins: dict, done: dict[str, list[Path]], jobs: int, threads: int, train_fn: Callable | None,
           n: int, n_twins: int, log: Callable[[str], None]) -> None:
    """:func:`run_suites`' training: the queued runs through :func:`run_jobs`, copies to their twins."""
    from ..claims import HELD

    log(f"{n} runs, {min(jobs, n)} at a time, each in its own process ({threads} thread(s))"
        + (f"; {n_twins} more are the same run as one of them in another suite and are copied from it"
           if n_twins else ""))
    held = sorted(HELD)                                     # the suite folders and the --out above them

    def job(suite, plan, arm, seed, run_dir, cfg, text) -> Job:
        def finish() -> str:
            if not _finished(run_dir, text):
                raise RuntimeError(f"exit code 0 but {run_dir} holds no finished run")
            done[suite.name].append(run_dir)
            copied = []
            for t_suite, t_arm, t_seed, t_dir, t_text, record in twins.get(twin_key(text, arm.precision), []):
                copy_twin(run_dir, t_dir, t_text, record)
                done[t_suite.name].append(t_dir)
                copied.append(f"{t_suite.name}/{t_arm.name} seed {t_seed}")
            val = _last_val_loss(run_dir)
            return ", ".join(([f"val loss {val:.4f}"] if val is not None else [])
                             + ([f"the same run as {', '.join(copied)}, copied there"] if copied else []))

        return Job(f"{suite.name}/{arm.name} seed {seed}", _train_in_worker,
                   (cfg, precision_hooks(arm, suite), threads, train_fn, held),
                   prepare=lambda: fresh_run_dir(run_dir, arm_record(suite, arm, seed, plan)), done=finish)

    run_jobs([job(*q) for q in queue], jobs, log)


__all__ = ["run_suites"]
