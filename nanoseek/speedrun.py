"""``nanoseek speedrun``: the DeepSeek story in one command, sized to a time budget.

raw text -> tokenizer -> DeepSeek-V3-architecture base model (MLA, shared + routed experts with
aux-loss-free balancing, MTP) -> few-shot evaluation -> cold-start SFT on reasoning traces ->
evaluation -> GRPO with verifiable rewards -> evaluation -> report card. Nothing is downloaded:
the corpus is the embedded default one (generated verifiable problems + shipped CC0 prose).

Everything lives in the run folder (``--out``, default ``runs/speedrun``)::

    RUN/data/      prepared shards + tokenizer          RUN/pretrain/  base model (metrics, final/)
    RUN/sft/       chat model                            RUN/grpo/      reasoning model
    RUN/*/eval.json  held-out evaluation of each stage  RUN/run.json   stage status and wall times
    RUN/*/external.json  the same on reasoning-gym tasks ([eval] external_tasks)
    RUN/*/tools.json     the tool tasks evaluated with tools ([tools] enabled, chat stages)
    RUN/*/phrasing.json  some of eval.json's problems in seen and unseen wordings ([eval] phrasing_problems)
    RUN/report.md, RUN/report.html                      the report card (refreshes while running)

Budget: ``--minutes`` is split by the ``[budget]`` fractions of the recipe
(``nanoseek/configs/train/speedrun.toml``, typed and checked whole before anything runs by
:mod:`nanoseek.speedrun_recipe`): pre-training, SFT and GRPO each stop on their share
of wall-clock time (the trainer's ``max_minutes``), evaluation sizes scale with the budget.
Every stage is evaluated on the SAME held-out problems (the test split, disjoint from training by
construction), so consecutive stages are compared with paired 95% intervals.

Resume: re-running into an existing folder skips finished stages (run.json says which) and
resumes an interrupted training stage from its last checkpoint. The settings must be the ones
the folder's stages were made with (run.json records them): a re-run with other settings is
refused, naming the differing keys, so run.json and the report always say how the model was
made (run.json ``config``: the recipe as written; ``resolved``: every setting, defaults filled in). The folder is claimed and locked (``nanoseek.outdir``): a non-empty folder that is not a
speedrun's is refused, and so is a second speedrun into the same folder while one runs.

Branch: ``--from RUN --redo STAGE`` starts a new folder from RUN's finished stages before STAGE
(copied, with their evaluations) and runs STAGE and what follows with this invocation's
settings: post-training ablations from one base model, e.g. ``--redo sft --set sft.data=...``.
Settings that the copied stages were made with (data, model, pre-training, evaluation) must not
differ, or the stages would not be comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoseek import limits
from nanoseek.atomic import write_atomic

if TYPE_CHECKING:  # the recipe module imports the trainer's config: loaded when a run starts, not for --help
    from nanoseek.speedrun_recipe import SpeedrunRecipe

RECIPE = "speedrun"
STAGES = ("data", "pretrain", "eval_base", "sft", "eval_sft", "grpo", "eval_grpo", "report")
# --redo STAGE: the stage folders copied from --from RUN, and the recipe tables they were made with
REDO_KEEPS = {"pretrain": ("data",), "sft": ("data", "pretrain"), "grpo": ("data", "pretrain", "sft")}
MADE_WITH = {"data": ("seed", "data"), "pretrain": ("model", "pretrain", "budget.pretrain", "minutes", "eval"),
             "sft": ("sft", "budget.sft")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=limits.positive_float, default=None,
                   help="total time budget in minutes (default: the recipe's, 30)")
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun); "
                   "re-running into it resumes")
    p.add_argument("--config", default=RECIPE, help="speedrun recipe TOML (default: the shipped 'speedrun')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a recipe value, e.g. --set budget.pretrain=0.6 (repeatable)")
    p.add_argument("--seed", type=limits.seed, default=None,
                   help="seed for data, init and sampling (default: recipe's)")
    p.add_argument("--from", dest="from_run", default=None, metavar="RUN",
                   help="start --out from this speedrun folder's stages before --redo (copied)")
    p.add_argument("--redo", choices=sorted(REDO_KEEPS, key=STAGES.index), default=None,
                   help="with --from: the first stage to run again (pretrain, sft or grpo)")
    p.add_argument("--threads", type=limits.threads, default=None,
                   help="torch intra-op threads (default: torch's, all cores). On a machine shared with other "
                        "jobs, 1 thread avoids the OpenMP oversubscription that can slow a step 4x")


# ----------------------------------------------------------------------------- run.json
def read_run_json(path: Path) -> dict:
    """A speedrun's ``run.json``, checked: a dict with ``status``, ``config``, ``stages`` (each with
    a ``name``) and ``steps`` (step -> status). Anything else is one UserError line naming the file
    (a file of that name in a user's folder is not a speedrun's record)."""
    from nanoseek.atomic import RecordError, read_record
    from nanoseek.errors import UserError

    try:
        data = json.loads(read_record(path))
    except RecordError:
        raise
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); not a speedrun record: choose another --out") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); choose another --out") from None
    ok = (isinstance(data, dict) and isinstance(data.get("status"), str) and isinstance(data.get("config"), dict)
          and isinstance(data.get("stages"), list)
          and all(isinstance(st, dict) and isinstance(st.get("name"), str) for st in data["stages"])
          and isinstance(data.get("steps"), dict)
          and all(isinstance(k, str) and isinstance(v, str) for k, v in data["steps"].items()))
    if not ok:
        raise UserError(f"{path}: not a nanoseek speedrun record (needs status, config, stages, steps); "
                        "choose another --out")
    return data


def is_speedrun_run(path: Path) -> bool:
    """A speedrun folder from before the ``.nanoseek.lock`` marker: a valid ``run.json``."""
    from nanoseek.errors import UserError

    try:
        read_run_json(path / "run.json")
    except UserError:
        return False
    return True


class RunState:
    """run.json: per-stage status, wall times and sizes (what the report reads), plus the
    bookkeeping of finished steps (``steps``: data, pretrain, eval_base, ...) that resume uses.
    Written atomically after every change.

    ``config`` is the recipe as written (after ``--set``) plus the run's minutes and seed;
    ``resolved`` (when given) every setting with its default filled in, the same shape as
    :func:`nanoseek.speedrun_recipe.resolved_settings` (what the report shows). A run.json written
    before ``resolved`` was recorded gets it on its next run."""

    def __init__(self, run_dir: Path, config: dict, resolved: dict | None = None):
        self.path = run_dir / "run.json"
        if self.path.exists():
            self.data = read_run_json(self.path)
        else:
            self.data = {"name": run_dir.name, "status": "running", "started": _now(), "device": "cpu",
                         "stages": [], "steps": {}}
        self.data["config"] = {k: v for k, v in config.items() if not k.startswith("_")}
        if resolved is not None:
            self.data["resolved"] = json.loads(json.dumps(resolved))
        self.data["status"] = "running"
        self.save()

    def stage(self, name: str) -> dict:
        for s in self.data["stages"]:
            if s["name"] == name:
                return s
        s = {"name": name, "dir": name, "status": "pending"}
        self.data["stages"].append(s)
        return s

    def done(self, step: str) -> bool:
        return self.data["steps"].get(step) == "done"

    def mark(self, step: str, status: str) -> None:
        self.data["steps"][step] = status
        self.save()

    def update(self, name: str, **fields: Any) -> None:
        self.stage(name).update(fields)
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.data)


def resolved_record(rc: SpeedrunRecipe, minutes: float, seed: int) -> dict:
    """What run.json records as ``resolved``: every setting of the recipe with its default filled
    in, plus this run's minutes and seed (the shape of ``speedrun_recipe.resolved_settings``)."""
    return {**rc.resolved(), "minutes": minutes, "seed": seed}


def _write_json(path: Path, data: dict) -> None:
    """run.json, written atomically."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def branch_run(src: Path, dst: Path, redo: str, config: dict) -> None:
    """Start the run folder ``dst`` from ``src``'s stages before ``redo`` (see module doc).

    Refuses when ``dst`` is not empty, when ``src`` has not finished those stages, or when
    ``config`` (this invocation's recipe, minutes and seed) differs from ``src``'s in a table the
    copied stages were made with. A ``dst`` already branched from ``src`` at ``redo`` is left as
    it is: the same command again resumes it."""
    from nanoseek.errors import UserError
    from nanoseek.outdir import visible_entries

    src_json = src / "run.json"
    if not src_json.is_file():
        raise UserError(f"--from {src}: no run.json there; not a speedrun folder")
    branch = {"run": str(src), "redo": redo}
    if (dst / "run.json").is_file():
        if read_run_json(dst / "run.json").get("branched_from") == branch:
            return
    if visible_entries(dst):
        raise UserError(f"--out {dst}: not empty; --from starts a new run folder (or resumes one it started)")
    old = read_run_json(src_json)
    kept_steps = STAGES[:STAGES.index(redo)]
    missing = [s for s in kept_steps if old.get("steps", {}).get(s) != "done"]
    if missing:
        raise UserError(f"--from {src}: step(s) {missing} not done there; finish that run first "
                        "(re-running into it resumes)")
    from nanoseek.speedrun_recipe import resolved_settings

    old_config, new_config = resolved_settings(old.get("config", {})), resolved_settings(json.loads(json.dumps(config)))
    for stage in REDO_KEEPS[redo]:
        for key in MADE_WITH[stage]:
            if _setting(old_config, key) != _setting(new_config, key):
                raise UserError(f"--redo {redo} copies stage '{stage}' from {src}, which was made with another "
                                f"'{key}' than this run's; redo from an earlier stage, or keep '{key}'")
    dst.mkdir(parents=True, exist_ok=True)
    for stage in REDO_KEEPS[redo]:
        shutil.copytree(src / stage, dst / stage)
    stages = [dict(s) for s in old.get("stages", []) if s.get("name") in REDO_KEEPS[redo]]
    for s in stages:
        if "eval" in s:
            s["eval"] = str(dst / s["name"] / "eval.json")
    data = {**old, "name": dst.name, "status": "running", "started": _now(), "stages": stages,
            "steps": {s: "done" for s in kept_steps}, "branched_from": branch}
    _write_json(dst / "run.json", data)


def _setting(config: dict, key: str) -> Any:
    """``config["a"]["b"]`` for the dotted ``key`` "a.b" (None where absent)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- stages
def _stage_data(run_dir: Path, rc: SpeedrunRecipe, seed: int, scale: float, log) -> dict:
    from nanoseek.data.corpus import default_corpus_records
    from nanoseek.data.prepare import PrepareConfig, prepare

    d = rc.data
    out = run_dir / "data"
    if (out / "manifest.json").exists():
        return json.loads((out / "manifest.json").read_text())
    n_docs = max(2000, int(d.task_docs * scale))
    tool_tasks = tuple(rc.tools.corpus_task_names) if rc.tools.enabled else ()   # their problems in the corpus: as tool calls
    docs = default_corpus_records(n_docs, seed=seed, tasks=tuple(d.tasks), task_levels=d.task_levels, tool_tasks=tool_tasks)
    log(f"data: generating {n_docs:,} task documents + shipped prose, training a {d.vocab_size}-token BPE")
    cfg = PrepareConfig(vocab_size=d.vocab_size, val_fraction=d.val_fraction, overwrite=True)
    return prepare(docs, out, cfg=cfg)


def _pretrain_config(run_dir: Path, rc: SpeedrunRecipe, minutes: float, seed: int, train: dict | None = None):
    """The pre-training stage's config; ``train``: [pretrain.train] keys added to the recipe's
    (the step settings :mod:`nanoseek.speedrun_machine` chose)."""
    from nanoseek.train.config import config_from_dict

    raw = rc.pretrain_raw(run_dir, minutes, seed)
    raw["train"].update(train or {})
    return config_from_dict(raw, source=f"{rc.source} [pretrain]")


def _pretrain_step_settings(state: RunState, rc: SpeedrunRecipe, minutes: float, resume: bool) -> tuple[dict, str]:
    """The pre-training step's compile / dtype (:mod:`nanoseek.speedrun_machine`), chosen when the
    stage first starts and recorded on it in run.json: a resumed stage keeps them (one that started
    before they were recorded keeps the trainer's defaults)."""
    from nanoseek.speedrun_machine import pretrain_step_settings

    rec = state.stage("pretrain")
    if "step_settings" in rec:
        kept = rec["step_settings"]
        if not (isinstance(kept, dict) and set(kept) <= {"compile", "dtype"}):
            from nanoseek.errors import UserError

            raise UserError(f"{state.path}: stages[pretrain].step_settings must be a table of compile / dtype, "
                            f"not {kept!r}; restore it or remove the key to choose again")
        return kept, f"{rec.get('step_settings_why', '')} (chosen when the stage started)"
    if resume:
        return {}, "eager fp32, as the stage started"
    chosen, why = pretrain_step_settings(rc.written.get("pretrain", {}).get("train", {}), minutes)
    state.update("pretrain", step_settings=chosen, step_settings_why=why)
    return chosen, why


def _stage_config(kind: str, run_dir: Path, rc: SpeedrunRecipe, init_from: Path, minutes: float, seed: int):
    from nanoseek.post.registry import stage_config_from_dict

    raw = rc.stage_raw(kind, {"init_from": str(init_from)}, run_dir / kind, minutes, seed)
    return stage_config_from_dict(kind, raw, source=f"{rc.source} [{kind}]")


EVAL_MODES = ("fewshot", "chat")        # the base model's and the post-trained models' evaluation modes


def _check_eval_prompts(run_dir: Path, rc: SpeedrunRecipe, minutes: float, seed: int, scale: float) -> None:
    """Every held-out problem the stage evaluations will draw ([eval] tasks and external_tasks, in
    every mode the stages use) fits the evaluation engine's context: checked as soon as the
    tokenizer exists, before pre-training spends its budget; a ConfigError naming the key otherwise."""
    from nanoseek.errors import ConfigError
    from nanoseek.eval.harness import EvalConfig, check_prompts_fit
    from nanoseek.infer.engine import DEFAULT_MAX_SEQ_LEN
    from nanoseek.infer.loading import find_tokenizer, load_tokenizer
    from nanoseek.speedrun_recipe import where
    from nanoseek.tasks.generators import split_specs

    e = rc.eval
    tok = load_tokenizer(find_tokenizer(run_dir / "data"))
    context = min(int(_pretrain_config(run_dir, rc, minutes, seed).model.build_config().max_position_embeddings),
                  DEFAULT_MAX_SEQ_LEN)
    tools = _tool_settings(rc)
    for key, tasks, n, levels, modes, tooled in (
            ("eval.tasks", rc.eval_tasks(), e.problems, e.levels, EVAL_MODES, {}),
            ("eval.external_tasks", e.external_tasks, e.external_problems, None, EVAL_MODES, {}),
            ("eval.phrasing_problems", rc.phrasing_tasks(), e.phrasing_problems, e.levels, EVAL_MODES, {}),
            ("tools.tasks", rc.tools.specs if tools else [], e.problems, e.levels, ("chat",), tools)):
        if not tasks:
            continue
        for mode in modes:
            cfg = EvalConfig(tasks=split_specs(tasks), n_problems=max(e.min_problems, int(round(n * scale))), k=1,
                             mode=mode, max_new_tokens=e.max_new_tokens, seed=seed, levels=levels,
                             few_shot=e.few_shot, **tooled)
            try:
                check_prompts_fit(cfg, tok, context)
            except ValueError as err:
                raise ConfigError(f"{where(rc, key)}: {key}: {err}") from None


def check_tool_fit(rc: SpeedrunRecipe, tok, problems_per_level: int = 4) -> None:
    """With [tools] on: the tool tasks' ideal traces (prompt with the tools' description, the call, the
    tool's output, the answer), tokenized with the run's tokenizer, fit [sft.optim] seq_len (a row) and the
    reply fits [grpo] / [eval] max_new_tokens (the engine counts the tool's output in it); a ConfigError
    naming the key and the size needed otherwise, before pre-training spends its budget."""
    from nanoseek.errors import ConfigError
    from nanoseek.post.common import chat_row
    from nanoseek.tasks.generators import get_task, parse_task_specs
    from nanoseek.tasks.reply import render_prompt, tool_sft_messages
    from nanoseek.tasks.tool_use import ToolUse, require_tool_tokens, with_system

    t = rc.tools
    if not t.enabled:
        return
    try:
        require_tool_tokens(tok, "[tools] enabled")
    except ValueError as e:
        raise ConfigError(f"{rc.source}: {e}") from None
    use = ToolUse.of(t.tools, t.tool_tasks, t.describe)
    box = use.toolbox()
    row = reply = 0
    for name, levels in parse_task_specs(t.specs):
        task = get_task(name)
        prompt = use.prompt_tools(name)
        for level in levels or task.levels:
            for p in task.generate("train", problems_per_level, seed=0, level=level, unique=False):
                messages = with_system(tool_sft_messages(p, box), prompt["system"])
                ids, _, _ = chat_row(tok, messages, tools=prompt["tools"])
                row = max(row, len(ids))
                reply = max(reply, len(ids) - len(render_prompt(tok, p, "chat", **prompt)))
    limits = [("sft.optim.seq_len", rc.sft.optim.seq_len, row, t.sft),
              ("grpo.max_new_tokens", rc.grpo.algo.max_new_tokens, reply, t.grpo),
              ("eval.max_new_tokens", rc.eval.max_new_tokens, reply, t.eval)]
    what = {"full": "prompt with the tools' description, ", "names": "prompt naming the tools, "}.get(use.describe, "") \
        + "call, output and answer"
    for key, have, need, used in limits:
        if used and have < need:
            raise ConfigError(f"{rc.source}: [tools] enabled: the tool tasks' traces need {key} >= {need} tokens "
                              f"({what}), it is {have}: --set {key}={need}")


def _tool_settings(rc: SpeedrunRecipe) -> dict[str, str]:
    """The evaluation's tool settings ([tools] with eval on: the built-ins for the tool tasks; else {})."""
    t = rc.tools
    return ({"tools": t.tools, "tool_tasks": t.tool_tasks, "describe_tools": t.describe}
            if t.use("eval") else {})


def _evaluate(stage_dir: Path, mode: str, rc: SpeedrunRecipe, scale: float, seed: int, log) -> dict:
    import torch

    from nanoseek.eval.harness import evaluate
    from nanoseek.infer.loading import load_tokenizer, find_tokenizer
    from nanoseek.model.registry import from_pretrained

    e = rc.eval
    final = stage_dir / "final"
    model = from_pretrained(final, dtype=torch.float32).eval()
    tok = load_tokenizer(find_tokenizer(final))
    n = max(e.min_problems, int(round(e.problems * scale)))
    tasks = rc.eval_tasks()
    log(f"eval {stage_dir.name}: {n} held-out problems per task ({','.join(tasks)}) x {e.k} samples "
        f"({mode}, T={e.temperature})")
    res = evaluate(model, tok, tasks, n_problems=n, k=e.k, mode=mode, temperature=e.temperature, top_p=e.top_p,
                   max_new_tokens=e.max_new_tokens, seed=seed, levels=e.levels, few_shot=e.few_shot,
                   batch_size=e.batch_size)
    res.save(stage_dir / "eval.json")
    log(f"eval {stage_dir.name}: pass@1 {_fmt(res.summary())}")
    out = {"eval": str(stage_dir / "eval.json")}
    if e.external_tasks:                # the same settings on tasks nanoseek did not write (reasoning-gym)
        n_ext = max(e.min_problems, int(round(e.external_problems * scale)))
        ext = evaluate(model, tok, e.external_tasks, n_problems=n_ext, k=e.k, mode=mode, temperature=e.temperature,
                       top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=seed, few_shot=e.few_shot,
                       batch_size=e.batch_size)
        ext.save(stage_dir / "external.json")
        log(f"eval {stage_dir.name}: external tasks ({len(ext.task_names)}, {ext.wall_s:.0f} s): pass@1 "
            f"{_fmt(ext.summary())}")
        out.update(external=str(stage_dir / "external.json"), external_wall_s=round(ext.wall_s, 1))
    phrased = rc.phrasing_tasks()
    if phrased:                         # a sample of the same held-out problems in other wordings (the robustness table)
        n_ph = max(e.min_problems, int(round(e.phrasing_problems * scale)))
        ph = evaluate(model, tok, phrased, n_problems=n_ph, k=e.k, mode=mode, temperature=e.temperature,
                      top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=seed, levels=e.levels, few_shot=e.few_shot,
                      batch_size=e.batch_size)
        ph.save(stage_dir / "phrasing.json")
        log(f"eval {stage_dir.name}: wordings ({ph.wall_s:.0f} s): pass@1 {_fmt(ph.summary())}")
        out.update(phrasing=str(stage_dir / "phrasing.json"), phrasing_wall_s=round(ph.wall_s, 1))
    tools = _tool_settings(rc)
    if tools and mode != "fewshot":     # the tool tasks again, with tools (the base model has no chat turns)
        tl = evaluate(model, tok, rc.tools.specs, n_problems=n, k=e.k, mode=mode, temperature=e.temperature,
                      top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=seed, levels=e.levels, few_shot=e.few_shot,
                      batch_size=e.batch_size, **tools)
        tl.save(stage_dir / "tools.json")
        use = tl.summary().get("tools", {})
        log(f"eval {stage_dir.name}: tool tasks with tools ({tl.wall_s:.0f} s): pass@1 {_fmt(tl.summary())}, "
            f"{use.get('calls_per_sample', 0):.2f} calls per sample, {use.get('failed', 0)} failed")
        out.update(tools=str(stage_dir / "tools.json"), tools_wall_s=round(tl.wall_s, 1))
    return out


# ----------------------------------------------------------------------------- main
def run(args) -> int:
    from nanoseek.errors import UserError
    from nanoseek.outdir import claim

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from nanoseek.speedrun_recipe import load_recipe

    rc = load_recipe(args.config, args.overrides)
    minutes = float(args.minutes if args.minutes is not None else rc.speedrun.minutes)
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}")
    seed = args.seed if args.seed is not None else rc.speedrun.seed
    run_dir = Path(args.out)
    config = rc.record(minutes, seed)
    if (args.from_run is None) != (args.redo is None):
        raise UserError("--from RUN and --redo STAGE go together")
    with claim(run_dir, "speedrun", flag="--out", own=is_speedrun_run):
        fresh_branch = args.from_run is not None and not (run_dir / "run.json").is_file()
        if args.from_run is not None:
            branch_run(Path(args.from_run), run_dir, args.redo, config)
        if not fresh_branch:
            check_same_settings(run_dir, config)
        return _run(args, rc, run_dir, config, minutes, seed)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_same_settings(run_dir: Path, config: dict) -> None:
    """Refuse to continue a run folder whose recorded stages were made with other settings.

    run.json records the config the run's stages were made with; a re-run that changed it would
    skip the finished stages but record (and report) the new settings as theirs. So once any step
    has started, the settings must match; the error names every differing key. To change settings
    for the later stages, branch: ``--from RUN --redo STAGE`` (which checks the copied stages).
    """
    from nanoseek.errors import UserError
    from nanoseek.speedrun_recipe import resolved_settings

    path = run_dir / "run.json"
    if not path.is_file():
        return
    data = read_run_json(path)
    if not data.get("steps"):
        return                                  # nothing was made yet: the new settings are the run's
    old = _flatten(resolved_settings(data.get("config", {})))
    new = _flatten(resolved_settings(json.loads(json.dumps(config))))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UserError(f"{run_dir} was made with other settings: {shown}{more}; re-run with its settings to resume "
                        f"it, branch with --from {run_dir} --redo STAGE --out NEW, or choose another --out")


def _run(args, rc: SpeedrunRecipe, run_dir: Path, config: dict, minutes: float, seed: int) -> int:
    from nanoseek.errors import UserError
    from nanoseek.errors import ConfigError

    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir, config, resolved_record(rc, minutes, seed))
    budget = dataclasses.asdict(rc.budget)      # {stage kind: fraction of the minutes}
    scale = min(1.0, minutes / rc.speedrun.minutes)
    t_start = time.time()

    def log(msg: str) -> None:
        elapsed = (time.time() - t_start) / 60
        print(f"[speedrun {elapsed:5.1f}/{minutes:.0f} min] {msg}", flush=True)

    def timed(step: str, fn, stage: str, **extra):
        """Run one step unless run.json says it is done; record its wall time on ``stage``."""
        if state.done(step):
            log(f"{step}: already done, skipping")
            return None
        training = step == stage
        state.mark(step, "running")
        if training:
            state.update(stage, status="running", started=_now(), **extra)
        t0 = time.time()
        try:
            out = fn() or {}
            if out.get("status_detail") == "interrupted":   # Ctrl-C or SIGTERM: the trainer saved and stopped
                raise KeyboardInterrupt
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            if status == "interrupted" and training:
                log(f"{step}: interrupted; the same command resumes it from its last checkpoint")
            state.mark(step, status)
            state.update(stage, status=status, error=f"{step}: {type(e).__name__}: {e}")
            state.data["status"] = status
            state.save()
            raise
        wall = round(time.time() - t0, 1)
        if training:
            state.update(stage, status="done", wall_s=wall, finished=_now(), **out)
        else:
            state.update(stage, eval_wall_s=wall, **out)
        state.mark(step, "done")
        _report(run_dir, log)
        return out

    try:
        timed("data", lambda: _data_summary(_stage_data(run_dir, rc, seed, scale, log)), "data")
        if not state.done("pretrain"):
            _check_eval_prompts(run_dir, rc, rc.budget.pretrain * minutes, seed, scale)
            if rc.tools.enabled:
                from nanoseek.infer.loading import find_tokenizer, load_tokenizer

                check_tool_fit(rc, load_tokenizer(find_tokenizer(run_dir / "data")))

        def pretrain_stage():
            from nanoseek.train.checkpoint import latest_checkpoint
            from nanoseek.train.pretrain import pretrain

            stage_minutes = rc.budget.pretrain * minutes
            resume = latest_checkpoint(run_dir / "pretrain") is not None
            step, why = _pretrain_step_settings(state, rc, stage_minutes, resume)
            cfg = _pretrain_config(run_dir, rc, stage_minutes, seed, train=step)
            log(f"pretrain: {stage_minutes:.1f} min budget; the step: {why}")
            res = pretrain(cfg, resume=resume)
            return _fit_summary(res)
        timed("pretrain", pretrain_stage, "pretrain", eval_mode="fewshot")
        timed("eval_base", lambda: _evaluate(run_dir / "pretrain", "fewshot", rc, scale, seed, log), "pretrain")

        def post_stage(kind: str, init_from: Path):
            def go():
                from nanoseek.train.checkpoint import latest_checkpoint

                cfg = _stage_config(kind, run_dir, rc, init_from, budget[kind] * minutes, seed)
                log(f"{kind}: {budget[kind] * minutes:.1f} min budget")
                from nanoseek.post.registry import STAGE_KINDS

                res = STAGE_KINDS[kind].train(cfg, resume=latest_checkpoint(run_dir / kind) is not None)
                return {"steps": res.steps, "status_detail": res.status}
            return go
        timed("sft", post_stage("sft", run_dir / "pretrain" / "final"), "sft", eval_mode="chat")
        timed("eval_sft", lambda: _evaluate(run_dir / "sft", "chat", rc, scale, seed, log), "sft")
        timed("grpo", post_stage("grpo", run_dir / "sft" / "final"), "grpo", eval_mode="chat")
        timed("eval_grpo", lambda: _evaluate(run_dir / "grpo", "chat", rc, scale, seed, log), "grpo")
    except ConfigError as e:
        raise UserError(str(e)) from None
    state.data.update(status="done", finished=_now(), wall_s=round(sum(
        s.get("wall_s", 0) + s.get("eval_wall_s", 0) for s in state.data["stages"]), 1))
    state.save()
    md, html = _report(run_dir, log)
    _print_summary(run_dir, log)
    print("\nChat with it or serve it:")
    print(f"  nanoseek chat --model {run_dir / 'grpo'}")
    print(f"  nanoseek serve --model {run_dir / 'grpo'}   # then open http://127.0.0.1:8000/")
    print(f"Report: {html}")
    return 0


def _fmt(summary: dict) -> str:
    p = summary.get("pass@1")
    if isinstance(p, dict) and "mean" in p:
        return f"{100 * p['mean']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}] (N={p.get('n')})"
    return str(p)


def _data_summary(manifest: dict) -> dict:
    out = {}
    for key in ("tokens", "documents"):
        v = manifest.get("train", {}).get(key) if isinstance(manifest.get("train"), dict) else None
        if v is not None:
            out[f"train_{key}"] = v
    return out


def _fit_summary(res) -> dict:
    out = {}
    for key, name in (("step", "steps"), ("tokens", "tokens"), ("status", "status_detail")):
        v = getattr(res, key, None)
        if v is not None:
            out[name] = v
    return out


def _report(run_dir: Path, log):
    from nanoseek.eval.report import write_report

    try:
        return write_report(run_dir)
    except Exception as e:  # a report failure must not lose a finished stage
        log(f"report: could not be written ({type(e).__name__}: {e})")
        return None, None


def _print_summary(run_dir: Path, log) -> None:
    from nanoseek.eval.results import EvalResult, paired_comparison

    prev = prev_ext = None
    for stage in ("pretrain", "sft", "grpo"):
        path = run_dir / stage / "eval.json"
        if not path.exists():
            continue
        r = EvalResult.load(path)
        line = f"{stage:9s} pass@1 {_fmt(r.summary())}"
        if prev is not None:
            for c in paired_comparison(prev, r):
                if c.task == "overall" or len(paired_comparison(prev, r)) == 1:
                    line += f" | vs previous: {c.diff} ({c.verdict})"
        log(line)
        ext_path = run_dir / stage / "external.json"
        if ext_path.exists():
            ext = EvalResult.load(ext_path)
            line = f"{'':9s} external pass@1 {_fmt(ext.summary())}"
            if prev_ext is not None:
                overall = [c for c in paired_comparison(prev_ext, ext) if c.task == "overall"] or \
                    paired_comparison(prev_ext, ext)[:1]
                line += "".join(f" | vs previous: {c.diff} ({c.verdict})" for c in overall)
            log(line)
            prev_ext = ext
        prev = r
