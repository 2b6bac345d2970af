"""The process pool of ``nanoseek ablate --jobs N``: runs started N at a time, each in a fresh process.

:func:`run_jobs` starts each :class:`Job` in a fresh spawned process, N at a time, forwards Ctrl-C /
SIGTERM to every running job (each stops after its step: the training loop's own handler), and
stops the batch when a job fails. Nothing but an exit code crosses the process boundary; a job's
result is read back from its folder. The parent holds the suite folders' claims; a worker adopts
them (:func:`worker_setup`, :func:`nanoseek.outdir.adopt`) for the run folder it fills.

Its users: the pre-training suites' training (:func:`nanoseek.ablate.parallel.run_suites`), their
downstream evaluations (:mod:`.downstream`) and the ``rl`` suite (:func:`nanoseek.ablate.rl.run_suite`).
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


__all__ = ["Job", "run_jobs", "worker_setup", "fresh_run_dir", "INTERRUPTED_EXIT"]
