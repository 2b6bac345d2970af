"""``nanoseek ablate --jobs N``: the runs of several suites trained N at a time, each in its own process.

:func:`run_suites` queues exactly the runs :func:`nanoseek.ablate.runner.run_suite` would train (the
same configs from :func:`~nanoseek.ablate.runner.train_config`, the same reuse of finished runs),
seed by seed across the suites, and starts each in a fresh spawned process (:func:`_train_in_worker`)
that trains it through the shared loop. The parent holds the suite folders' claims; a worker adopts
them (:func:`nanoseek.outdir.adopt`) for the run folder it fills. A run's result is read back from its
folder, so nothing but an exit code crosses the process boundary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic
from .results import ARM_FILE
from .runner import (Plan, _finished, arm_record, copy_twin, find_twin, is_suite_dir, precision_hooks,
                     train_config, twin_key)
from .suites import Suite

INTERRUPTED_EXIT = 3       # a worker's exit code when its run was stopped by SIGINT / SIGTERM


def _train_in_worker(cfg, hooks: list, threads: int | None, train_fn: Callable | None, held: list[str]) -> None:
    """One run in its own process (:func:`run_suites`). The parent holds the claims on ``held`` (the
    suite folder, the ``--out`` above it); the worker adopts them for the run folder inside. Exits
    with :data:`INTERRUPTED_EXIT` when the run was stopped, 0 when it finished, 1 when it raised."""
    import sys

    import torch

    from ..outdir import adopt

    for path in held:
        adopt(path)
    if threads:
        torch.set_num_threads(threads)
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
    """Train the pending runs of several suites, up to ``jobs`` at once, each in its own process.

    The runs are those :func:`run_suite` would train, queued seed by seed across the suites (the
    first seed of every suite first, so a stopped batch leaves complete pairs); finished runs with
    the identical config are reused as there, and a run that is the same as one of another suite
    (the base model is an arm of five suites) is trained once and copied
    (:func:`~nanoseek.ablate.runner.find_twin`). Each run is a fresh (spawned) process training
    through the same ``train_fn`` with ``threads`` torch threads (default: the machine's cores
    shared among the jobs). Every run is the one a sequential suite would train (same config, data
    order and seed), so the results do not depend on ``jobs`` (tested); only the wall-clock figures
    do, since the runs share the machine. Ctrl-C or SIGTERM stops every running run after its
    current step (an unfinished run is redone next time) and raises ``KeyboardInterrupt``; a run
    that fails stops the others and raises :class:`~nanoseek.errors.UserError` naming it.
    ``train_fn`` must be picklable (a module-level function). Returns ``{suite: run folders}``.
    """
    import contextlib
    import multiprocessing
    import os
    import signal
    from multiprocessing.connection import wait

    from ..claims import HELD
    from ..errors import UserError
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
        ctx = multiprocessing.get_context("spawn")
        t_start, finished, stopped, failed = time.perf_counter(), 0, False, None
        live: dict = {}
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while queue or live:
                while queue and len(live) < jobs and failed is None:
                    suite, plan, arm, seed, run_dir, cfg, text = queue.pop(0)
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    run_dir.mkdir(parents=True)
                    write_atomic(run_dir / ARM_FILE, json.dumps(arm_record(suite, arm, seed, plan), indent=1) + "\n")
                    proc = ctx.Process(target=_train_in_worker, name=f"{suite.name}/{arm.name}/seed{seed}",
                                       args=(cfg, precision_hooks(arm, suite), threads, train_fn, held))
                    proc.start()
                    live[proc] = (suite, arm, seed, run_dir, text)
                if not live:
                    break
                wait([p.sentinel for p in live], timeout=5)
                for proc in [p for p in live if not p.is_alive()]:
                    proc.join()
                    suite, arm, seed, run_dir, text = live.pop(proc)
                    where = f"{suite.name}/{arm.name} seed {seed}"
                    if proc.exitcode == 0 and _finished(run_dir, text):
                        finished += 1
                        done[suite.name].append(run_dir)
                        val = _last_val_loss(run_dir)
                        log(f"[{finished}/{n}] {where}: {time.perf_counter() - t_start:.0f}s into the batch"
                            + (f", val loss {val:.4f}" if val is not None else ""))
                        for t_suite, t_arm, t_seed, t_dir, t_text, record in twins.get(twin_key(text, arm.precision), []):
                            copy_twin(run_dir, t_dir, t_text, record)
                            done[t_suite.name].append(t_dir)
                            log(f"   {t_suite.name}/{t_arm.name} seed {t_seed}: the same run, copied")
                    elif proc.exitcode == INTERRUPTED_EXIT:
                        stopped = True
                        log(f"{where}: interrupted")
                    elif failed is None:
                        failed = f"{where} failed (exit code {proc.exitcode}; its error is printed above)"
                if (stopped or failed) and live:
                    raise KeyboardInterrupt
                if stopped and not live:
                    break
        except KeyboardInterrupt:
            stopped = True
        finally:
            for proc in live:                                   # each run saves and stops after its step
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
            for proc in live:
                proc.join()
            signal.signal(signal.SIGTERM, old_term)
        if failed:
            raise UserError(f"{failed}; the other runs were stopped, the same command resumes them")
        if stopped or queue:
            log(f"stopped: {finished} of {n} runs finished; the same command resumes the rest")
            raise KeyboardInterrupt
    return done


__all__ = ["run_suites", "INTERRUPTED_EXIT"]
