"""The ``rl`` suite: GRPO vs DAPO vs Dr. GRPO vs GSPO vs CISPO from one SFT checkpoint, judged on
held-out accuracy paired per problem.

The pre-training suites (:mod:`.suites`, :mod:`.runner`) train ``TrainConfig`` arms and compare
validation losses; an RL arm is a ``nanoseek grpo`` stage config and is compared on what RL is
for, held-out pass@1. This module is that suite end to end:

* :data:`ARMS`: the five arms, each a set of ``--set`` overrides on top of :data:`COMMON` (the
  shipped ``r1-zero`` GRPO config with the chat template, two passes per rollout, 8 x 8 rollouts
  of 128 tokens). Every arm starts from the same SFT checkpoint, draws the same prompts, runs the
  same optimizer steps with the same rollouts per step (tokens cannot be matched in RL: response
  lengths are what the arms change); seed s sets ``grpo.seed`` and ``train.seed``.
* :func:`stage_config`: the arm's config, built as ``nanoseek grpo --config r1-zero --set ...``
  builds it (:func:`nanoseek.post.registry.load_stage_config`), trained by the registry's
  ``train_grpo`` into ``OUT/rl/runs/ARM/seedS``.
* :func:`evaluate_run`: the run's final model on the same held-out problems for every arm and
  seed, with ``nanoseek eval``'s harness (:func:`nanoseek.eval.harness.evaluate`, prompt mode from
  the stage as ``--mode auto`` picks it), saved as the run's ``eval.json`` with every problem's
  pass@1.
* :func:`judge_arm`: an arm against GRPO: the paired 95% interval of the per-problem pass@1
  differences (:func:`nanoseek.eval.stats.paired_difference`) per seed and pooled (each problem's
  pass@1 averaged over seeds first), and a verdict by the pre-training suites' rule
  (:func:`nanoseek.ablate.results.compare`, ``suites.claim_status``): a difference counts when the
  95% t interval of the per-seed differences excludes zero, and here also when the pooled paired
  interval does; one seed is "unresolved (one seed; ...)".

A finished run whose ``config.toml`` is the identical config is reused (and its ``eval.json`` too,
when it was made with the same evaluation settings); anything else in a run folder is replaced.
``--jobs N`` trains and evaluates N runs at once, each in its own process (:mod:`.pool`).
The suite folder is claimed and locked (:mod:`nanoseek.outdir`). Reports (``report.md``,
``results.json``, the reward-curve plot) are :mod:`.rl_report`.

Deliberately left out: sizing the steps from a wall-clock budget (a rollout's time depends on how
long the policy's answers get, which changes as it trains, so a probe of a few steps would not
predict a run), and a KL-matched or token-matched comparison.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_atomic
from ..errors import ConfigError
from .results import ARM_FILE, ArmResult, ReportError, compare, made_with, same_config

SUITE = "rl"
BASE_CONFIG = "r1-zero"          # the shipped GRPO config (nanoseek/configs/train/r1-zero.toml) every arm starts from
EVAL_FILE = "eval.json"
EVAL_BATCH = 256                 # rows decoded at once: a small policy is per-step overhead bound (each sample has
                                 # its own seed, so the scores do not depend on it: nanoseek.eval.harness)
START = "start"                  # OUT/rl/start/eval.json: the SFT checkpoint itself on the same held-out problems
COMMON: dict[str, Any] = {       # on top of BASE_CONFIG for every arm (docs/ablations.md)
    "grpo.template": "chat", "grpo.num_iterations": 2, "grpo.prompts_per_step": 8, "grpo.group_size": 8,
    "grpo.max_new_tokens": 128,
}


@dataclass(frozen=True)
class RLArm:
    """One RL algorithm: ``--set`` overrides on top of :data:`COMMON`; a value may be a function of
    the run's ``grpo.max_new_tokens`` (DAPO's overlong buffer is a fifth of it)."""
    name: str
    label: str
    overrides: dict[str, Any]
    claim: str
    note: str = ""

    def settings(self, max_new_tokens: int) -> dict[str, Any]:
        return {k: v(max_new_tokens) if callable(v) else v for k, v in self.overrides.items()}


ARMS: tuple[RLArm, ...] = (
    RLArm("grpo", "GRPO (DeepSeekMath / R1)", {},
          "the baseline: PPO's clipped token-level surrogate (eps 0.2 / 0.2), group-normalised advantages, "
          "per-sequence token mean (DeepSeekMath, arXiv 2402.03300; DeepSeek-R1)",
          "policy_loss clip, eps 0.2 / 0.2, loss_agg grpo, scale_rewards true"),
    RLArm("dapo", "DAPO",
          {"grpo.eps_high": 0.28, "grpo.loss_agg": "dapo", "grpo.filter_zero_std": True,
           "grpo.overlong_buffer": lambda n: max(1, n // 5)},
          "clip-higher, dynamic sampling, a token-level loss and overlong reward shaping reach a higher accuracy "
          "than GRPO at the same training steps (DAPO, arXiv 2503.14476: AIME 50 vs GRPO's 30 on Qwen2.5-32B)",
          "eps_high 0.28, token-level loss, zero-std groups resampled (up to max_rollout_attempts rollouts per "
          "step), soft overlong penalty over the last max_new_tokens/5 tokens"),
    RLArm("dr_grpo", "Dr. GRPO", {"grpo.loss_agg": "dr_grpo", "grpo.scale_rewards": False},
          "removing GRPO's length and std normalisations removes a bias towards long wrong answers and "
          "reaches the same or better accuracy with shorter responses (Dr. GRPO, 'Understanding R1-Zero-Like "
          "Training', arXiv 2503.20783)",
          "constant normaliser (sequences x max length), advantages r - mean (no std division)"),
    RLArm("gspo", "GSPO", {"grpo.policy_loss": "gspo"},
          "a sequence-level importance ratio, clipped per sequence, trains more stably and efficiently than "
          "GRPO's token-level ratios, above all for MoE models (GSPO, arXiv 2507.18071)",
          "sequence-level ratio (geometric mean of token ratios) clipped to [1 - 3e-4, 1 + 4e-4]"),
    RLArm("cispo", "CISPO", {"grpo.policy_loss": "cispo", "grpo.loss_agg": "dapo"},
          "clipping the importance-sampling weight instead of the update keeps every token's gradient and "
          "learns faster than GRPO and DAPO (MiniMax-M1, arXiv 2506.13585: DAPO's accuracy in half the steps)",
          "detached IS weight clipped to [0, 5] times A log pi, token-level loss"),
)
BASELINE = "grpo"


def arm(name: str) -> RLArm:
    for a in ARMS:
        if a.name == name:
            return a
    raise ConfigError(f"no rl arm {name!r} (arms: {', '.join(a.name for a in ARMS)})")


# ---------------------------------------------------------------------------- the plan
@dataclass
class RLPlan:
    """Everything that is the same for every run of the suite (saved as ``plan.json``)."""
    model: str                              # the SFT checkpoint every arm starts from (resolved)
    seeds: list[int]
    steps: int                              # optimizer steps per run (num_iterations per rollout)
    overrides: list[str] = field(default_factory=list)     # --set items for every arm (COMMON + the user's)
    eval: dict[str, Any] = field(default_factory=dict)     # EvalConfig fields (tasks, n_problems, k, ...)
    arms: list[str] = field(default_factory=lambda: [a.name for a in ARMS])
    config: str = BASE_CONFIG
    device: str = "auto"
    command: str = ""
    suite: str = SUITE
    kind: str = "rl"
    planned_seeds: list[int] = field(default_factory=list)   # as Plan's (read by the shared report helpers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RLPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _sets(d: dict[str, Any]) -> list[str]:
    return [f"{k}={_literal(v)}" for k, v in d.items()]


def make_plan(model: str, steps: int, seeds: int = 1, seed_base: int = 0, overrides: list[str] | tuple = (),
              eval_settings: dict[str, Any] | None = None, arms: list[str] | None = None, device: str = "auto",
              command: str = "") -> RLPlan:
    """The suite's plan; checks the model, every arm's config and the evaluation before anything trains."""
    from ..eval.harness import EvalConfig
    from ..train.checkpoint import LoadError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(model)
    except LoadError as e:
        raise ConfigError(f"--model {model}: {e}") from None
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 for the rl suite, got {seeds}")
    owned = {"model.init_from": "--model", "train.out_dir": "--out", "train.max_steps": "--steps",
             "grpo.seed": "--seed", "train.seed": "--seed", "train.device": "--device",
             **{k: "the arms (what they differ in)" for a in ARMS for k in a.overrides}}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in owned:
            raise ConfigError(f"--set {item}: {key} is set by {owned[key]}, not by --set")
    names = arms or [a.name for a in ARMS]
    for n in names:
        arm(n)
    if BASELINE not in names:
        raise ConfigError(f"the rl suite compares every arm with {BASELINE}: keep it among the arms")
    plan = RLPlan(str(ckpt), list(range(seed_base, seed_base + seeds)), steps, _sets(COMMON) + list(overrides),
                  arms=list(names), device=device, command=command)
    cfgs = [stage_config(arm(n), plan, plan.seeds[0], "unused") for n in names]   # every arm's config is valid
    settings = {"batch_size": EVAL_BATCH, **(eval_settings or {})}
    if not settings.get("tasks"):              # default: held-out problems of the tasks the arms train on
        g = cfgs[0].algo
        if g.prompts.endswith(".jsonl"):
            raise ConfigError(f"grpo.prompts = {g.prompts!r} is a file: name the held-out tasks with --eval-tasks")
        settings["tasks"] = g.prompts
        if g.level is not None and "levels" not in settings:
            settings["levels"] = [g.level]
    if isinstance(settings["tasks"], str):
        from ..tasks.generators import split_specs
        settings["tasks"] = split_specs(settings["tasks"])
    try:
        plan.eval = dataclasses.asdict(EvalConfig(**settings).validate())
        for k in ("mode", "ks"):            # the stage's own prompt mode; filled in by evaluate
            plan.eval.pop(k)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rl suite evaluation: {e}") from None
    plan.planned_seeds = list(plan.seeds)
    return plan


def stage_config(a: RLArm, plan: RLPlan, seed: int, run_dir: str | Path):
    """The arm's GRPO StageConfig at ``seed``: ``nanoseek grpo --config r1-zero --model MODEL --out RUN
    --steps N --set COMMON... --set ARM... --set grpo.seed=S --set train.seed=S``."""
    from ..post.registry import load_stage_config

    fixed = _sets({"model.init_from": plan.model, "train.out_dir": str(run_dir), "train.max_steps": plan.steps,
                   "train.device": plan.device})
    base = load_stage_config(plan.config, "grpo", plan.overrides + fixed)
    seeds = _sets({"grpo.seed": seed, "train.seed": seed})
    return load_stage_config(plan.config, "grpo",
                             plan.overrides + _sets(a.settings(base.algo.max_new_tokens)) + fixed + seeds)


# ---------------------------------------------------------------------------- running
def _finished(run_dir: Path, config_text: str) -> bool:
    from ..atomic import read_record
    try:
        stage = json.loads(read_record(run_dir / "stage.json"))
        return stage.get("status") == "done" and same_config((run_dir / "config.toml").read_text(), config_text)
    except (OSError, ValueError):
        return False


def _eval_current(run_dir: Path, settings: dict[str, Any]) -> bool:
    return made_with(Path(run_dir) / EVAL_FILE, settings)


def evaluate_run(run_dir: str | Path, settings: dict[str, Any], device: str = "cpu", label: str = "",
                 model: str | Path | None = None):
    """The run's final model (or ``model``) on the plan's held-out problems, as ``nanoseek eval
    --model RUN`` does it (prompt mode ``auto``: the stage's own); saves ``run_dir/eval.json`` and
    returns the EvalResult."""
    from ..eval.cli import plan as eval_jobs
    from ..eval.harness import EvalConfig, evaluate_checkpoint

    [(_, ckpt, _, mode)] = eval_jobs(str(model or Path(run_dir) / "final"), None, "auto")
    result = evaluate_checkpoint(ckpt, EvalConfig(**settings), mode, device=device, label=label or Path(run_dir).name)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    result.save(Path(run_dir) / EVAL_FILE)
    return result


def run_suite(plan: RLPlan, suite_dir: str | Path, train_fn: Callable | None = None, eval_fn: Callable | None = None,
              log: Callable[[str], None] = print, jobs: int = 1, threads: int | None = None) -> list[Path]:
    """Train and evaluate every arm x seed into ``suite_dir/runs`` (seed by seed, so an interrupted
    suite has complete pairs); ``suite_dir`` is claimed and locked while it runs. ``jobs`` > 1 runs
    that many at once, each trained and then evaluated in its own process with ``threads`` torch
    threads (:func:`nanoseek.ablate.pool.run_jobs`; ``train_fn`` and ``eval_fn`` must then be
    module-level functions); the runs and their results are the same either way."""
    from ..outdir import claim
    from .runner import is_suite_dir

    with claim(suite_dir, "ablate", flag="--out", own=is_suite_dir):
        return _run_suite(plan, Path(suite_dir), train_fn, eval_fn, log, jobs, threads)


def _train_fn(train_fn: Callable | None) -> Callable:
    if train_fn is None:
        from ..post.registry import STAGE_KINDS
        train_fn = STAGE_KINDS["grpo"].train
    return train_fn


def _arm_record(name: str, seed: int) -> dict[str, Any]:
    return {"suite": SUITE, "arm": name, "label": arm(name).label, "seed": seed}


def _pending(plan: RLPlan, suite_dir: Path):
    """Every run of the plan, seed by seed: (index, arm name, seed, run folder, config, trained?)."""
    i = 0
    for seed in plan.seeds:
        for name in plan.arms:
            i += 1
            run_dir = suite_dir / "runs" / name / f"seed{seed}"
            cfg = stage_config(arm(name), plan, seed, run_dir)
            yield i, name, seed, run_dir, cfg, _finished(run_dir, cfg.to_toml()) and (run_dir / ARM_FILE).is_file()


def _run_suite(plan: RLPlan, suite_dir: Path, train_fn, eval_fn, log, jobs: int = 1, threads: int | None = None):
    suite_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(suite_dir / "plan.json", json.dumps(plan.to_dict(), indent=1) + "\n")
    if jobs > 1:
        return _run_parallel(plan, suite_dir, train_fn, eval_fn, log, jobs, threads)
    train_fn, eval_fn = _train_fn(train_fn), eval_fn or evaluate_run
    if not _eval_current(suite_dir / START, plan.eval):       # where every arm starts: RL's gain is against it
        t0 = time.perf_counter()
        res = eval_fn(suite_dir / START, plan.eval, device=plan.device, label=START, model=plan.model)
        log(f"the start ({plan.model}): held-out pass@1 {res.pass1()} in {time.perf_counter() - t0:.0f}s")
    done, n_runs = [], len(plan.seeds) * len(plan.arms)
    for i, name, seed, run_dir, cfg, trained in _pending(plan, suite_dir):
        if trained:
            log(f"[{i}/{n_runs}] {name} seed {seed}: already trained in {run_dir}, reused")
        else:
            from .pool import fresh_run_dir
            fresh_run_dir(run_dir, _arm_record(name, seed))
            t0 = time.perf_counter()
            result = train_fn(cfg, resume=False, quiet=True, progress=False)
            if result.status == "interrupted":
                log(f"[{i}/{n_runs}] {name} seed {seed}: interrupted at step {result.steps}; stopping the suite")
                raise KeyboardInterrupt
            log(f"[{i}/{n_runs}] {name} seed {seed}: {result.status} after {result.steps} steps in "
                f"{time.perf_counter() - t0:.0f}s")
        if not _eval_current(run_dir, plan.eval):
            t0 = time.perf_counter()
            res = eval_fn(run_dir, plan.eval, device=plan.device, label=f"{name}/seed{seed}")
            log(f"   held-out pass@1 {res.pass1()} in {time.perf_counter() - t0:.0f}s")
        done.append(run_dir)
    return done


def _train_and_evaluate_in_worker(cfg, run_dir: Path, train: bool, settings: dict[str, Any], device: str, label: str,
                                  threads: int | None, held: list[str], train_fn: Callable | None,
                                  eval_fn: Callable | None, model: str | None = None) -> None:
    """One run of :func:`_run_parallel` in its own process: train it (unless ``train`` is false: only
    its evaluation is missing, or it is the start, ``model``), then evaluate it. Exit codes as
    :func:`nanoseek.ablate.pool.run_jobs` reads them."""
    import sys

    from .pool import INTERRUPTED_EXIT, worker_setup

    worker_setup(held, threads)
    try:
        if train:
            result = _train_fn(train_fn)(cfg, resume=False, quiet=True, progress=False)
            if result.status == "interrupted":
                sys.exit(INTERRUPTED_EXIT)
        if model is None:
            (eval_fn or evaluate_run)(run_dir, settings, device=device, label=label)
        else:
            (eval_fn or evaluate_run)(run_dir, settings, device=device, label=label, model=model)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


def _run_parallel(plan: RLPlan, suite_dir: Path, train_fn, eval_fn, log, jobs: int, threads: int | None) -> list[Path]:
    import os

    from ..claims import HELD
    from .pool import Job, fresh_run_dir, run_jobs

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    held = sorted(HELD)                                 # the suite folder and the --out above it
    done, queue = [], []
    start = suite_dir / START
    if not _eval_current(start, plan.eval):

        def start_done() -> str:
            if not _eval_current(start, plan.eval):
                raise RuntimeError(f"exit code 0 but {start / EVAL_FILE} was not written")
            return "evaluated"

        queue.append(Job(f"{SUITE}/the start ({plan.model})", _train_and_evaluate_in_worker,
                         (None, start, False, plan.eval, plan.device, START, threads, held, None, eval_fn, plan.model),
                         done=start_done))
    for _, name, seed, run_dir, cfg, trained in _pending(plan, suite_dir):
        if trained and _eval_current(run_dir, plan.eval):
            log(f"{name} seed {seed}: already trained and evaluated in {run_dir}, reused")
            done.append(run_dir)
            continue

        def finish(run_dir=run_dir, text=cfg.to_toml()) -> str:
            if not (_finished(run_dir, text) and _eval_current(run_dir, plan.eval)):
                raise RuntimeError(f"exit code 0 but {run_dir} holds no finished, evaluated run")
            done.append(run_dir)
            from ..eval.results import EvalFileError, EvalResult
            try:
                return f"held-out pass@1 {EvalResult.load(run_dir / EVAL_FILE).pass1()}"
            except EvalFileError:
                return "evaluated"

        queue.append(Job(f"{SUITE}/{name} seed {seed}", _train_and_evaluate_in_worker,
                         (cfg, run_dir, not trained, plan.eval, plan.device, f"{name}/seed{seed}", threads, held,
                          train_fn, eval_fn),
                         prepare=(lambda: None) if trained else
                         (lambda run_dir=run_dir, rec=_arm_record(name, seed): fresh_run_dir(run_dir, rec)),
                         done=finish))
    if queue:
        log(f"{len(queue)} jobs, {min(jobs, len(queue))} at a time, each trained and evaluated in its own process "
            f"({threads} thread(s))")
        run_jobs(queue, jobs, log)
    return done


# ---------------------------------------------------------------------------- reading back
@dataclass
class RLSeedRun:
    """One finished, evaluated run: per-problem pass@1 and the per-step rollout curve."""
    seed: int
    run_dir: str
    pass1: float                            # mean over the held-out problems
    scores: dict[str, float]                # "task/id" -> pass@1 (the paired comparison's input)
    curve: list[dict[str, float]]           # {"step", "reward_mean", "accuracy", "response_len_mean"} per step
    wall_s: float
    config_seed: int                        # [train] seed of the run's config.toml

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


CURVE_KEYS = ("reward_mean", "accuracy", "response_len_mean")


def load_rl_run(run_dir: str | Path) -> RLSeedRun:
    """Read one run folder (``stage.json``, ``config.toml``, ``metrics.jsonl``, ``eval.json``)."""
    import tomllib

    from ..eval.results import EvalFileError, EvalResult
    from ..train.metrics import read_metrics, step_records

    run_dir = Path(run_dir)
    if not _finished(run_dir, (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""):
        raise ReportError(f"{run_dir}: the run did not finish (no stage.json with status done)")
    try:
        ev = EvalResult.load(run_dir / EVAL_FILE)
        arm_rec = json.loads((run_dir / ARM_FILE).read_text())
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (EvalFileError, OSError, ValueError) as e:
        raise ReportError(f"{run_dir}: {e}") from None
    steps = step_records(read_metrics(run_dir))
    curve = [{"step": s, **{k: float(r[k]) for k in CURVE_KEYS if k in r}} for s, r in sorted(steps.items())]
    last = steps[max(steps)] if steps else {}
    p1 = ev.pass1()
    return RLSeedRun(seed=int(arm_rec["seed"]), run_dir=str(run_dir), pass1=p1.mean if p1 else float("nan"),
                     scores=ev.scores(), curve=curve, wall_s=float(last.get("elapsed", 0.0)),
                     config_seed=int(cfg.get("train", {}).get("seed", -1)))


def load_start(suite_dir: str | Path) -> dict[str, float] | None:
    """The start's per-problem held-out pass@1 (``OUT/rl/start/eval.json``), None where it was not
    evaluated (a suite run before the start was)."""
    from ..eval.results import EvalFileError, EvalResult

    try:
        return EvalResult.load(Path(suite_dir) / START / EVAL_FILE).scores()
    except (EvalFileError, OSError):
        return None


def collect(plan: RLPlan, suite_dir: str | Path) -> dict[str, ArmResult]:
    out = {}
    for name in plan.arms:
        a = arm(name)
        res = ArmResult(name, a.label, {}, a.note)
        res.runs = [load_rl_run(Path(suite_dir) / "runs" / name / f"seed{s}") for s in plan.seeds]
        out[name] = res
    return out


# ---------------------------------------------------------------------------- judging
def _paired(base: dict[str, float], other: dict[str, float]):
    from ..eval.stats import paired_difference

    shared = [p for p in base if p in other]
    if not shared:
        raise ReportError("no held-out problem in common between the arms (were they evaluated alike?)")
    return paired_difference([base[p] for p in shared], [other[p] for p in shared])


def judge_arm(a: ArmResult, base: ArmResult) -> dict[str, Any]:
    """``a`` against the baseline on held-out pass@1: per-seed and pooled paired 95% intervals of
    the per-problem differences (a - base) and the status by the suites' rule (see the module docstring)."""
    from .results import claim_status, combine_statuses, points

    by_seed = {r.seed: r for r in base.runs}
    per_seed = {r.seed: _paired(by_seed[r.seed].scores, r.scores) for r in a.runs if r.seed in by_seed}
    seeds = sorted(per_seed)

    def pooled_scores(arm_result: ArmResult) -> dict[str, float]:
        runs = [r for r in arm_result.runs if r.seed in per_seed]
        shared = set.intersection(*(set(r.scores) for r in runs))
        return {p: statistics.fmean(r.scores[p] for r in runs) for p in runs[0].scores if p in shared}

    pooled = _paired(pooled_scores(base), pooled_scores(a))
    comp = compare(a, base, "pass1")
    if comp.clear is not None:
        comp = dataclasses.replace(comp, clear=comp.clear and (pooled.low > 0 or pooled.high < 0))
    # the claims: higher held-out pass@1 than GRPO; no difference at all points nowhere
    raw = "unresolved: no difference" if comp.diff == 0 else claim_status(comp, expect_lower=False, unit=points)
    return {"status": combine_statuses([raw]), "raw_status": raw, "diff": pooled.to_dict(),
            "per_seed": {s: per_seed[s].to_dict() for s in seeds}, "seed_spread": comp.spread, "clear": comp.clear,
            "over_seeds": comp.interval.to_dict() if comp.interval else None}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe(label: str, j: dict[str, Any]) -> str:
    d = j["diff"]
    per = ", ".join(f"seed {s}: {_pct(v['mean'])}" for s, v in j["per_seed"].items())
    t = j.get("over_seeds")
    seeds = (f"; over the seeds (Student's t) [{_pct(t['low'])}, {_pct(t['high'])}]" if t else "")
    return (f"{label} vs GRPO: held-out pass@1 {_pct(d['mean'])} points [{_pct(d['low'])}, {_pct(d['high'])}] "
            f"(paired over {d['n']} problems, pass@1 averaged over {len(j['per_seed'])} seed(s); {per}{seeds})")


def versus_start(a: ArmResult, start: dict[str, float]) -> dict[str, Any]:
    """``a`` against the start it trained from: the paired 95% interval of the per-problem pass@1
    differences, each problem's pass@1 averaged over the arm's seeds (what RL gained at all)."""
    shared = set.intersection(*(set(r.scores) for r in a.runs)) & set(start)
    mine = {p: statistics.fmean(r.scores[p] for r in a.runs) for p in shared}
    return _paired(start, mine).to_dict()


def judge(results: dict[str, ArmResult]) -> tuple[dict[str, dict[str, Any]], str, str]:
    """(per-arm judgements, the suite's status, its summary) for every arm against GRPO."""
    from .results import combine_statuses

    base = results[BASELINE]
    per_arm = {n: judge_arm(r, base) for n, r in results.items() if n != BASELINE}
    if not per_arm:
        return {}, "unresolved: only the baseline ran", "only the baseline ran"
    status = combine_statuses([j["raw_status"] for j in per_arm.values()])
    summary = "; ".join(f"{describe(results[n].label, j)}: {j['status']}" for n, j in per_arm.items()) + "."
    return per_arm, status, summary


__all__ = ["ARMS", "COMMON", "BASE_CONFIG", "BASELINE", "RLArm", "RLPlan", "RLSeedRun", "arm", "make_plan",
           "stage_config", "evaluate_run", "run_suite", "load_rl_run", "load_start", "collect", "judge_arm", "judge",
           "versus_start", "describe", "SUITE", "START"]
