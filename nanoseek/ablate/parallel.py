"""``nanoseek ablate --jobs N``: the runs of one or more suites trained N at a time, each in its own process.

:func:`run_jobs` is the pool: it starts each :class:`Job` in a fresh spawned process, N at a time,
forwards Ctrl-C / SIGTERM to every running job (each stops after its step: the training loop's own
handler), and stops the batch when a job fails. Nothing but an exit code crosses the process
boundary; a job's result is read back from its folder. The parent holds the suite folders' claims;
a worker adopts them (:func:`nanoseek.outdir.adopt`) for the run folder it fills.

Its two users: :func:`run_suites` (the pre-training suites: exactly the runs
:func:`nanoseek.ablate.runner.run_suite` would train, the same reuse of finished runs, queued seed by
seed across the suites, each trained by :func:`_train_in_worker`) and the ``rl`` suite
(:func:`nanoseek.ablate.rl.run_suite` with ``jobs`` > 1: train, then evaluate, in one worker).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_atomic
from .results import ARM_FILE
from .runner import (Plan, _finished, arm_record, copy_twin, find_twin, is_suite_dir, precision_hooks,
                     train_config, twin_key)
from .suites import Suite

INTERRUPTED_EXIT = 3       # a worker's exit code when its run was stopped by SIGINT / SIGTERM


@dataclass
class Job:
    """One run for :func:`run_jobs`. ``target(*args)`` runs in the spawned process (both picklable: a
    module-level function); ``prepare`` and ``done`` run in the parent, before the start and after an
    exit code of 0 (``done`` returns the line to log, or raises ``RuntimeError`` when the run's
    folder does not show a finished run)."""
    name: str                                   # "suite/arm seed S", for messages
    target: Callable[..., None]
    args: tuple = ()
    prepare: Callable[[], None] = lambda: None
    done: Callable[[], str] = lambda: ""


def worker_setup(held: list[str], threads: int | None) -> None:
    """What every worker does first: adopt the parent's claims on ``held`` (the suite folder and the
    ``--out`` above it) and set its torch threads."""
    import torch

    from ..outdir import adopt

    for path in held:
        adopt(path)
    if threads:
        torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], parallel: int, log: Callable[[str], None] = print) -> int:
    """Run ``jobs`` in order, up to ``parallel`` at once, each in a fresh spawned process; returns how
    many finished. Ctrl-C or SIGTERM stops every running job after its step and raises
    ``KeyboardInterrupt`` (so does a job that exits with :data:`INTERRUPTED_EXIT`); a job that fails
    stops the others and raises :class:`~nanoseek.errors.UserError` naming it. Either way the jobs
    not yet finished are left to the next call."""
    import contextlib
    import multiprocessing
    import os
    import signal
    from multiprocessing.connection import wait

    from ..errors import UserError

    queue, n = list(jobs), len(jobs)
    ctx = multiprocessing.get_context("spawn")
    t_start, finished, stopped, failed = time.perf_counter(), 0, False, None
    live: dict = {}
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while queue or live:
            while queue and len(live) < parallel and failed is None:
                job = queue.pop(0)
                job.prepare()
                proc = ctx.Process(target=job.target, name=job.name, args=job.args)
                proc.start()
                live[proc] = job
            if not live:
                break
            wait([p.sentinel for p in live], timeout=5)
            for proc in [p for p in live if not p.is_alive()]:
                proc.join()
                job = live.pop(proc)
                if proc.exitcode == 0:
                    try:
                        line = job.done()
                    except RuntimeError as e:
                        failed = failed or f"{job.name} failed ({e})"
                        continue
                    finished += 1
                    log(f"[{finished}/{n}] {job.name}: {time.perf_counter() - t_start:.0f}s into the batch"
                        + (f", {line}" if line else ""))
                elif proc.exitcode == INTERRUPTED_EXIT:
                    stopped = True
                    log(f"{job.name}: interrupted")
                elif failed is None:
                    failed = f"{job.name} failed (exit code {proc.exitcode}; its error is printed above)"
            if (stopped or failed) and live:
                raise KeyboardInterrupt
            if stopped and not live:
                break
    except KeyboardInterrupt:
        stopped = True
    finally:
        for proc in live:                                   # each job saves and stops after its step
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in live:
            proc.join()
        signal.signal(signal.SIGTERM, old_term)
    if failed:
        raise UserError(f"{failed}; the other runs were stopped, the same command resumes them")
    if stopped or finished < n:
        log(f"stopped: {finished} of {n} runs finished; the same command resumes the rest")
        raise KeyboardInterrupt
    return finished


def fresh_run_dir(run_dir: Path, record: dict[str, Any]) -> None:
    """An empty ``run_dir`` holding only its arm record (whatever an unfinished run left is replaced)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_atomic(run_dir / ARM_FILE, json.dumps(record, indent=1) + "\n")


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
    be picklable (a module-level function). Returns ``{suite: run folders}``.
    """
    import contextlib
    import os

    from ..claims import HELD
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
        if not n:
            return done
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
    return done


__all__ = ["Job", "run_jobs", "worker_setup", "fresh_run_dir", "run_suites", "INTERRUPTED_EXIT"]
