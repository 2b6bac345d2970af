"""Run a suite: matched pre-training runs of every arm x seed through the shared training loop.

Matching, by construction:

* **data and seeds**: every arm's :class:`~nanoseek.train.config.TrainConfig` is built by
  :func:`train_config` from the same :class:`Plan`: the same prepared data directory, batch shape,
  schedule and validation batches; seed s sets ``[train] seed``, which seeds both the data
  order (the ``PackedLoader``) and the initialisation, so at seed s every arm sees the same
  batches in the same order (tests check the first batches and the recorded seeds);
* **tokens, not time**: every run trains the same number of steps x tokens. :func:`make_plan`
  sizes it from the budget: a short throughput probe of every arm (:func:`probe_arms`: a few real
  optimizer steps and one validation forward) predicts each arm's seconds per step, and the steps
  are the most that fit ``arms x seeds`` runs (plus their validations and start-up) into the
  budget. ``seeds="auto"`` takes the most seeds (up to 3) that still leave ``min_steps`` per run.

Runs go to ``OUT/SUITE/runs/ARM/seedN`` via :func:`nanoseek.train.pretrain.pretrain`, seed by seed
(all arms of seed 0 first, so an interrupted suite still has complete pairs). An arm's simulated
GEMM precision is applied by :class:`SimulatedPrecisionHook` when the loop starts. A run folder
that already finished with the identical config is reused, and a run identical to one another suite
finished under the same ``--out`` (the base model is an arm of five suites) is copied from it
(:func:`find_twin`, marked ``reused_from``); any other content there is replaced.
:func:`nanoseek.ablate.parallel.run_suites` trains the runs of several suites in parallel processes (``--jobs``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_atomic
from ..errors import ConfigError
from ..model.config import ModelConfig, load_model_config
from ..train.loop import Hook
from .results import ARM_FILE, same_config
from .suites import Arm, Suite

MODEL_PRESET = "tiny"         # [model] preset the arm's fields override (every differing field is written)
MAX_AUTO_SEEDS = 3
STARTUP_S = 2.0               # per run: building the model, verifying shards, the peak-FLOP probe, saving


@dataclass
class Plan:
    """Everything that is the same for every run of a suite (saved as ``plan.json``)."""
    suite: str
    data_dir: str
    seeds: list[int]
    steps: int
    micro_batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    eval_every: int = 10
    val_batches: int = 8
    device: str = "auto"
    budget_minutes: float | None = None
    probe: dict[str, dict[str, float]] = field(default_factory=dict)   # arm -> step_s, eval_s, startup_s
    planned_seeds: list[int] = field(default_factory=list)   # before a slow machine made run_suite stop early
    command: str = ""
    downstream_problems: int | None = None   # per task, where the suite has a downstream evaluation (None: its
                                             # default; 0: none)

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.micro_batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_suite_dir(path: Path) -> bool:
    """A suite folder from before the ``.nanoseek.lock`` marker: a ``plan.json`` that reads as a :class:`Plan`
    (or as the rl suite's :class:`~nanoseek.ablate.rl.RLPlan`: ``kind = "rl"``, a ``model`` instead of ``data_dir``)."""
    from nanoseek.atomic import read_record

    try:
        data = json.loads(read_record(Path(path) / "plan.json"))
    except (OSError, ValueError):
        return False
    source = "model" if isinstance(data, dict) and data.get("kind") == "rl" else "data_dir"
    return (isinstance(data, dict) and isinstance(data.get("suite"), str) and isinstance(data.get(source), str)
            and isinstance(data.get("seeds"), list) and isinstance(data.get("steps"), int))


def schedule_for(steps: int) -> tuple[int, int]:
    """(warmup_steps, eval_every) for a run of ``steps``: 5% warm-up (>= 1), about 8 validations."""
    return max(1, min(100, steps // 20)), max(1, steps // 8)


# ---------------------------------------------------------------------------- configs
def model_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The ``[model]`` fields that turn the preset into ``cfg`` (every field that differs)."""
    preset = load_model_config(MODEL_PRESET)
    return {k: getattr(cfg, k) for k in ModelConfig.field_names() if getattr(cfg, k) != getattr(preset, k)}


def train_config(arm: Arm, plan: Plan, seed: int, run_dir: str | Path):
    """The arm's :class:`~nanoseek.train.config.TrainConfig` at ``seed`` (validated, model checked)."""
    from ..train.config import config_from_dict

    raw = {
        "model": {"preset": MODEL_PRESET, **model_fields(arm.model)},
        "data": {"source": "packed", "dir": str(plan.data_dir), "val_batches": plan.val_batches},
        "optim": {"lr": plan.lr * arm.lr_scale, "min_lr": plan.min_lr * arm.lr_scale,
                  "warmup_steps": plan.warmup_steps, "schedule": "wsd", "decay_fraction": 0.2,
                  "micro_batch_size": plan.micro_batch_size, "grad_accum": 1, "seq_len": plan.seq_len, **arm.optim},
        "train": {"out_dir": str(run_dir), "max_steps": plan.steps, "seed": seed, "device": plan.device,
                  "dtype": "float32", "eval_every": plan.eval_every, "save_every": 0, "keep_last": 1,
                  "log_every": 1, **arm.train},
        "spike": {"enabled": False},        # a skipped step in one arm only would unmatch the arms
    }
    cfg = config_from_dict(raw, source=f"ablate {plan.suite}/{arm.name}")
    built = cfg.model.build_config()
    if built != arm.model:
        diff = [f.name for f in dataclasses.fields(ModelConfig) if getattr(built, f.name) != getattr(arm.model, f.name)]
        raise ConfigError(f"ablate {plan.suite}/{arm.name}: the run config does not rebuild the arm's model "
                          f"(fields {diff})")
    return cfg


# ---------------------------------------------------------------------------- precision hook
class SimulatedPrecisionHook(Hook):
    """Switch the model to simulated ``fmt`` GEMMs (``nanoseek.model.fp8``) when the loop starts or resumes."""

    def __init__(self, fmt: str, block: int = 128):
        self.fmt, self.block = fmt, block
        self.modules: list[str] = []

    def on_event(self, trainer, record: dict[str, Any]) -> None:
        if record.get("event") in ("start", "resume") and not self.modules:
            from ..model.fp8 import enable_simulated_precision
            self.modules = enable_simulated_precision(trainer.model, self.fmt, self.block)


def precision_hooks(arm: Arm, suite: Suite) -> list:
    if arm.precision is None:
        return []
    return [SimulatedPrecisionHook(arm.precision, suite.extra.get("block", 128))]


# ---------------------------------------------------------------------------- probing and planning
def probe_arms(suite: Suite, plan: Plan, steps: int = 3, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step (median of ``steps`` after one warm-up) and per validation pass of every arm."""
    import tempfile

    import torch

    from ..train.optim import build_optimizer
    from ..train.pretrain import build_pretraining

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])      # its one-off import is not an arm's start-up
    out = {}
    for arm in suite.arms:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = train_config(arm, plan, plan.seeds[0], tmp)
            model, task, _ = build_pretraining(cfg)
        if arm.precision:
            from ..model.fp8 import enable_simulated_precision
            enable_simulated_precision(model, arm.precision, suite.extra.get("block", 128))
        opt = build_optimizer(model, cfg.optim)
        batches = task.batches()
        startup = time.perf_counter() - t0
        times = []
        model.train()
        for i in range(steps + 1):
            batch = next(batches)
            t = time.perf_counter()
            loss, _ = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_expert_bias(0.0)
            if i:
                times.append(time.perf_counter() - t)
        model.eval()
        with torch.no_grad():
            t = time.perf_counter()
            model(batch.input_ids, labels=batch.labels)
            fwd = time.perf_counter() - t
        step_s = statistics.median(times)
        out[arm.name] = {"step_s": step_s, "eval_s": fwd * plan.val_batches, "startup_s": startup}
        log(f"  probe {arm.name}: {step_s:.3f} s/step, {fwd * plan.val_batches:.2f} s/validation")
    return out


def solve_steps(probe: dict[str, dict[str, float]], seconds: float, n_seeds: int) -> int:
    """Most steps per run such that every arm x ``n_seeds`` run (with ~9 validations) fits ``seconds``."""
    per_seed = seconds / n_seeds
    fixed = sum(9 * p["eval_s"] + STARTUP_S + p["startup_s"] for p in probe.values())
    per_step = sum(p["step_s"] for p in probe.values())
    return int((per_seed - fixed) // per_step)


def make_plan(suite: Suite, data_dir: str | Path, budget_minutes: float | None, seeds: str | int = "auto",
              seed_base: int = 0, steps: int | None = None, min_steps: int = 100, micro_batch_size: int = 8,
              seq_len: int = 128, lr: float = 3e-3, val_batches: int = 8, device: str = "auto",
              command: str = "", log: Callable[[str], None] = print, downstream_problems: int | None = None) -> Plan:
    """Size the suite to the budget (see the module docstring); ``steps`` skips the sizing."""
    t0 = time.perf_counter()
    n_fixed = None if seeds == "auto" else int(seeds)
    if n_fixed is not None and n_fixed < 1:
        raise ConfigError(f"--seeds must be 'auto' or >= 1, got {seeds}")
    plan = Plan(suite.name, str(data_dir), list(range(seed_base, seed_base + (n_fixed or 1))), steps or 1,
                micro_batch_size, seq_len, lr, lr / 10, 1, 1, val_batches, device, budget_minutes, command=command,
                downstream_problems=downstream_problems)
    if steps is None:
        if budget_minutes is None:
            raise ConfigError("give --budget-minutes (or --steps)")
        plan.probe = probe_arms(suite, plan, log=log)
        # 90% of what is left of the budget: the machine is shared and validation times vary
        seconds = 0.9 * (60 * budget_minutes - (time.perf_counter() - t0))
        candidates = [n_fixed] if n_fixed else list(range(MAX_AUTO_SEEDS, 0, -1))
        for n in candidates:
            plan.steps = solve_steps(plan.probe, seconds, n)
            plan.seeds = list(range(seed_base, seed_base + n))
            if plan.steps >= min_steps:
                break
        if plan.steps < 10:
            need = sum(p["step_s"] * min_steps + 9 * p["eval_s"] + STARTUP_S + p["startup_s"]
                       for p in plan.probe.values()) * len(plan.seeds) / 0.9 / 60
            raise ConfigError(f"--budget-minutes {budget_minutes} leaves {plan.steps} steps per run for "
                              f"{len(suite.arms)} arms x {len(plan.seeds)} seed(s); give at least {need:.1f} minutes")
    plan.warmup_steps, plan.eval_every = schedule_for(plan.steps)
    plan.planned_seeds = list(plan.seeds)
    return plan


# ---------------------------------------------------------------------------- running
def _finished(run_dir: Path, config_text: str) -> bool:
    from ..train.metrics import events, read_metrics
    try:
        if not same_config((run_dir / "config.toml").read_text(), config_text):
            return False
        return bool(events(read_metrics(run_dir), "done"))
    except (OSError, ValueError):
        return False


def twin_key(config_text: str, precision: str | None) -> str:
    """What makes two runs the same run: the resolved config without its header comment and its
    out_dir, and the simulated GEMM precision (applied by a hook, not written in the config)."""
    lines = [ln for ln in config_text.splitlines() if not ln.startswith("#") and not ln.startswith("out_dir = ")]
    return "\n".join(lines) + f"\nprecision = {precision!r}\n"


def find_twin(suite_dir: str | Path, key: str, suite: str) -> Path | None:
    """A finished run with ``key`` in another suite under the same folder (``--out``) as ``suite_dir``:
    the base model is an arm of five suites (moe, mla, no-mtp, fp32, adamw-lr1x), the same run each time."""
    for cfg_file in sorted(Path(suite_dir).parent.glob("*/runs/*/seed*/config.toml")):
        run = cfg_file.parent
        try:
            text = cfg_file.read_text()
            record = json.loads((run / ARM_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (record.get("suite") != suite and not record.get("reused_from")
                and twin_key(text, record.get("precision")) == key and _finished(run, text)):
            return run
    return None


def copy_twin(src: Path, dst: Path, config_text: str, record: dict[str, Any]) -> None:
    """Make ``dst`` the finished run ``src`` (its twin in another suite): metrics and final model
    copied, this suite's config and arm record written, ``reused_from`` naming the source. The arm
    record is written last, so a copy cut short is not taken for a finished run."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "latest", ".nanoseek.lock", ARM_FILE))
    write_atomic(dst / "config.toml", config_text)
    write_atomic(dst / ARM_FILE, json.dumps({**record, "reused_from": str(src)}, indent=1) + "\n")


def arm_record(suite: Suite, arm, seed: int, plan: Plan) -> dict[str, Any]:
    """The ``ablate_arm.json`` of a run: which suite, arm and seed it is."""
    return {"suite": suite.name, "arm": arm.name, "label": arm.label, "seed": seed, "precision": arm.precision,
            "tokens_per_step": plan.micro_batch_size * plan.seq_len}


def run_suite(suite: Suite, plan: Plan, suite_dir: str | Path, train_fn: Callable | None = None,
              log: Callable[[str], None] = print, deadline: float | None = None) -> list[Path]:
    """Train every arm x seed of ``plan`` into ``suite_dir/runs``; returns the run folders.

    ``deadline`` (a ``time.perf_counter()`` value): before starting another seed, the time of
    the seeds done so far predicts whether its runs still fit; if not, the suite stops with
    the complete seeds it has and ``plan.seeds`` is cut to them (``plan.planned_seeds`` keeps
    the plan). An interrupted run (Ctrl-C / SIGTERM) stops the suite. ``suite_dir`` is claimed and
    locked (:mod:`nanoseek.outdir`) while the suite runs.
    """
    from ..outdir import claim

    with claim(suite_dir, "ablate", flag="--out", own=is_suite_dir):
        return _run_suite(suite, plan, suite_dir, train_fn, log, deadline)


def _run_suite(suite: Suite, plan: Plan, suite_dir: str | Path, train_fn: Callable | None,
               log: Callable[[str], None], deadline: float | None) -> list[Path]:
    from ..train.config import config_to_toml

    if train_fn is None:
        from ..train.pretrain import pretrain as train_fn
    suite_dir = Path(suite_dir)
    suite_dir.mkdir(parents=True, exist_ok=True)
    if not plan.planned_seeds:
        plan.planned_seeds = list(plan.seeds)

    def save_plan() -> None:
        write_atomic(suite_dir / "plan.json", json.dumps(plan.to_dict(), indent=1) + "\n")

    save_plan()
    done: list[Path] = []
    n_runs, i = len(plan.seeds) * len(suite.arms), 0
    t_start = time.perf_counter()
    for k, seed in enumerate(list(plan.seeds)):
        if deadline is not None and k > 0:
            per_seed = (time.perf_counter() - t_start) / k
            if time.perf_counter() + per_seed > deadline:
                plan.seeds = plan.seeds[:k]
                save_plan()
                log(f"   the budget leaves no time for seed {seed} (a seed takes {per_seed:.0f}s on this machine "
                    f"now): stopping with {k} of {len(plan.planned_seeds)} planned seeds")
                break
        for arm in suite.arms:
            i += 1
            run_dir = suite_dir / "runs" / arm.name / f"seed{seed}"
            cfg = train_config(arm, plan, seed, run_dir)
            text = config_to_toml(cfg)
            if _finished(run_dir, text) and (run_dir / ARM_FILE).is_file():
                log(f"[{i}/{n_runs}] {arm.name} seed {seed}: already finished in {run_dir}, reused")
                done.append(run_dir)
                continue
            twin = find_twin(suite_dir, twin_key(text, arm.precision), suite.name)
            if twin is not None:
                copy_twin(twin, run_dir, text, arm_record(suite, arm, seed, plan))
                log(f"[{i}/{n_runs}] {arm.name} seed {seed}: the same run as {twin}, copied")
                done.append(run_dir)
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            write_atomic(run_dir / ARM_FILE, json.dumps(arm_record(suite, arm, seed, plan), indent=1) + "\n")
            t0 = time.perf_counter()
            result = train_fn(cfg, progress=False, quiet=True, hooks=precision_hooks(arm, suite))
            if getattr(result, "status", "done") == "interrupted":
                log(f"[{i}/{n_runs}] {arm.name} seed {seed}: interrupted at step {result.step}; stopping the suite")
                raise KeyboardInterrupt
            val = getattr(result, "last_eval", {}).get("val_loss")
            log(f"[{i}/{n_runs}] {arm.name} seed {seed}: {getattr(result, 'step', plan.steps)} steps in "
                f"{time.perf_counter() - t0:.0f}s" + (f", val loss {val:.4f}" if val is not None else ""))
            done.append(run_dir)
    evaluate_downstream(suite, plan, suite_dir, log=log)
    return done


def suite_runs(suite: Suite, plan: Plan, suite_dir: str | Path) -> list[tuple[str, int, Path]]:
    """(arm, seed, run folder) of every run of the plan."""
    return [(arm.name, seed, Path(suite_dir) / "runs" / arm.name / f"seed{seed}")
            for seed in plan.seeds for arm in suite.arms]


def evaluate_downstream(suite: Suite, plan: Plan, suite_dir: str | Path, jobs: int = 1, threads: int | None = None,
                        log: Callable[[str], None] = print) -> None:
    """The suite's downstream evaluations its runs lack (:mod:`.downstream`; nothing for a suite without)."""
    from .downstream import evaluate_suite, for_plan

    ds = for_plan(suite.downstream, plan.downstream_problems)
    if ds is not None:
        evaluate_suite(ds, suite_runs(suite, plan, suite_dir), plan.device, jobs, threads, log)


def run_and_report(suite: Suite, plan: Plan, suite_dir: str | Path, train_fn: Callable | None = None,
                   log: Callable[[str], None] = print, started: float | None = None) -> dict[str, Any]:
    """:func:`run_suite` then :func:`~nanoseek.ablate.report.write_suite_report`; returns the results dict.

    ``started``: ``time.perf_counter()`` when the suite began (before the probe): with
    ``plan.budget_minutes`` it sets the deadline after which no further seed starts.
    """
    from .report import write_suite_report

    started = time.perf_counter() if started is None else started
    deadline = started + 60 * plan.budget_minutes if plan.budget_minutes else None
    run_suite(suite, plan, suite_dir, train_fn, log, deadline=deadline)
    return write_suite_report(suite, suite_dir, plan.to_dict())


__all__ = ["Plan", "train_config", "model_fields", "SimulatedPrecisionHook", "probe_arms", "solve_steps", "make_plan",
           "run_suite", "run_and_report", "schedule_for", "twin_key", "find_twin", "copy_twin", "arm_record",
           "suite_runs", "evaluate_downstream"]
