"""The speedrun recipe (``nanoseek/configs/train/speedrun.toml``) as one typed, validated dataclass.

The recipe's tables are the stage sections the stages themselves use, plus four small ones::

    [speedrun]  minutes, seed                 RunSection: the reference budget and the run's seed
    [budget]    pretrain, sft, grpo           BudgetSection: fractions of --minutes per training stage
    [data]      task_docs, tasks, ...         CorpusSection: the embedded corpus and its tokenizer
    [model]     preset + HF config fields     the trainer's ModelSection (a model config)
    [pretrain.optim|train|spike|data]         the trainer's OptimSection, TrainSection, SpikeSection, DataSection
    [sft], [grpo] + their .optim/.train/.spike  the post-training stage's section (SFTSection, GRPOSection) and
                                              the trainer's sections under that kind's defaults (the registry's)
    [eval]      tasks, problems, k, ...       EvalSection: the held-out evaluation after every stage (and
                                              on external_tasks, reasoning-gym's, into external.json)
    [tools]     enabled, tools, tasks, ...    ToolsSection: tool use (off by default): the tool tasks' SFT
                                              traces call the tool, GRPO rolls them out through the tool
                                              loop, each chat stage evaluates them with tools (tools.json)

``--set TABLE.KEY=VALUE`` goes through the trainer's parser (:func:`nanoseek.train.config.apply_overrides`),
and every table and key is checked before anything runs (:func:`load_recipe`): an unknown table or
key, a value of the wrong type, a missing key, a bad task spec, and each training stage's whole
config (built as it will be when the stage starts: schedule keys, ranges, memory) fail in a second
with one line naming the key. The tables as written (after ``--set``) are kept too: the stages'
configs are built from them exactly as from a stage TOML (a key written next to a schedule that
ignores it is an error, a key not written takes the kind's default), and run.json records them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError, UserError
from nanoseek.eval.harness import EvalConfig
from nanoseek.train.config import (DataSection, ModelSection, OptimSection, SpikeSection, TrainSection,
                                   apply_overrides, parse_section, read_toml, resolve_config_path)

POST_KINDS = ("sft", "grpo")
STAGE_TABLES = ("optim", "train", "spike")                 # the trainer's tables under [pretrain] / [sft] / [grpo]


# ----------------------------------------------------------------------------- the speedrun's own tables
@dataclass
class RunSection:
    """``[speedrun]``."""
    minutes: float                    # the reference budget; --minutes scales stage times and eval sizes
    seed: int = 0                     # data, init and sampling (--seed overrides)


@dataclass
class BudgetSection:
    """``[budget]``: fractions of --minutes for the training stages (the rest: data + evals)."""
    pretrain: float
    sft: float
    grpo: float


@dataclass
class CorpusSection:
    """``[data]``: the embedded default corpus (generated problems + shipped prose) and its BPE."""
    task_docs: int                    # generated task documents at the reference budget (scaled, at least 2000)
    tasks: list[str]                  # the curriculum: NAME[:LEVELS] (nanoseek.tasks.generators.parse_task_specs)
    vocab_size: int                   # the trained BPE's vocabulary
    val_fraction: float               # documents held out for validation
    task_levels: int | dict | None = None   # levels for the names in `tasks` without their own (None: all)


@dataclass
class EvalSection:
    """``[eval]``: the same held-out (test-split) problems for every stage. The recipe writes every
    key without a default; the two with one take the evaluation's own (``EvalConfig``, their home)."""
    tasks: str | list[str]
    problems: int                     # per task at the reference budget (scaled for shorter runs)
    min_problems: int                 # ...but never fewer
    k: int                            # samples per problem: pass@1 averaged over k, pass@k, maj@k
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int                   # rows decoded at once
    few_shot: int = EvalConfig.few_shot                  # examples in the base model's prompt
    levels: list[int] | None = EvalConfig.levels         # levels for the task names without their own (None: all)
    # held-out tasks nanoseek did not write (rg:NAME(config) only, nanoseek.tasks.rg), evaluated after every stage
    # with the settings above into STAGE/external.json: the report's external section (empty: none)
    external_tasks: list[str] = field(default_factory=list)
    external_problems: int = 200                         # per external task at the reference budget (scaled)
    # held-out problems per built-in task (a prefix of the evaluation's own, whose scores give the original wording's
    # column) asked in a seen and in an unseen paraphrase (nanoseek.tasks.phrasing) after every stage into
    # STAGE/phrasing.json: the report's phrasing robustness (scaled like problems; 0: none)
    phrasing_problems: int = 50


@dataclass
class ToolsSection:
    """``[tools]``: tool use in the run, off unless ``enabled``. ``tasks`` (a task spec whose tasks have a
    tool call, :meth:`nanoseek.tasks.generators.Task.tool_call`) are the tool tasks: with ``sft`` they join
    the [sft] data with traces that call the tool (its real output); with ``grpo`` they join the [grpo]
    prompts, which describe or name the tools (``describe``) and are rolled out through the engine's tool loop; with ``eval`` they
    join [eval] tasks (without tools, in eval.json) and every chat stage evaluates them with tools into
    STAGE/tools.json (the report's "Tool use": with vs without tools, calls per task). The other tasks stay
    head math: their prompts never describe the tools. A tool task written ``SPEC=SHARE`` (``"arithmetic:1-2=0.05"``)
    gets the tools everywhere, but only that share of its cold-start traces calls them (the rest are solved
    in the head) and its corpus documents stay worked steps: GRPO, with the tools in its rollouts, learns how
    often the call pays (nanoseek.tasks.tool_use); ``offer`` below 1 asks only that share of such a task's training
    problems with the tools (the rest without, worked in the head), which with prompts that name or describe the
    tools teaches the model both policies."""
    enabled: bool = False
    tools: str = "calculator"         # the built-ins (nanoseek.tools.toolbox.BUILTINS)
    tasks: list[str] = field(default_factory=lambda: ["big_arithmetic:1-2"])
    sft: bool = True                  # cold start: the tool tasks' traces show the call
    grpo: bool = True                 # GRPO: the tool tasks' prompts, rolled out with the tools
    grpo_weight: float = 1.0          # each tool task's share of GRPO's prompt pool against another source's 1
                                      # (added to [grpo] prompt_weights; a weight written there wins)
    eval: bool = True                 # each chat stage: the tool tasks evaluated with tools (tools.json)
    failure_penalty: float = 0.0      # GRPO's reward minus this per failed call
    describe: bool | str = "full"     # what the tool tasks' prompts say of the tools: "full" (true; V3.1's description),
                                      # "names" (a system turn naming them) or "none" (false: built in); nanoseek.tasks.tool_use
    offer: float = 1.0                # share of a SPEC=SHARE task's training problems asked with the tools (the rest
                                      # without, worked in the head: with describe "full" or "names" the model learns both)

    @property
    def specs(self) -> list[str]:
        """The tool tasks' specs without their ``=SHARE``."""
        return [item.partition("=")[0].strip() for item in self.tasks]

    @property
    def task_names(self) -> list[str]:
        from nanoseek.tasks.generators import parse_task_specs

        return list(dict.fromkeys(name for name, _ in parse_task_specs(self.specs)))

    @property
    def tool_tasks(self) -> str:
        """The stages' ``tool_tasks``: each task's name, with its ``=SHARE`` when it has one."""
        from nanoseek.tasks.generators import parse_task_specs

        out = {}
        for item in self.tasks:
            spec, eq, share = item.partition("=")
            for name, _ in parse_task_specs([spec.strip()]):
                out.setdefault(name, f"{name}={share.strip()}" if eq else name)
        return ",".join(out.values())

    @property
    def corpus_task_names(self) -> list[str]:
        """The tasks whose corpus documents are written as their tool call: those without a share."""
        from nanoseek.tasks.tool_use import ToolUse

        partial = {name for name, share in ToolUse(self.tools, self.tool_tasks).task_shares if share < 1.0}
        return [n for n in self.task_names if n not in partial]

    def use(self, stage: str) -> bool:
        """Whether ``stage`` ("sft", "grpo", "eval") uses the tools."""
        return self.enabled and bool(getattr(self, stage))


@dataclass
class PretrainTables:
    """``[pretrain.*]``: the trainer's sections (its out_dir, seed, max_minutes and data dir are the speedrun's)."""
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    spike: SpikeSection = field(default_factory=SpikeSection)
    data: DataSection = field(default_factory=DataSection)


@dataclass
class PostTables:
    """``[sft]`` / ``[grpo]``: the stage's own section plus the trainer's, under the kind's defaults."""
    algo: Any                         # SFTSection | GRPOSection
    optim: OptimSection
    train: TrainSection
    spike: SpikeSection


@dataclass
class SpeedrunRecipe:
    speedrun: RunSection
    budget: BudgetSection
    data: CorpusSection
    model: ModelSection
    pretrain: PretrainTables
    sft: PostTables
    grpo: PostTables
    eval: EvalSection
    tools: ToolsSection = field(default_factory=ToolsSection)
    source: str = "<dict>"
    written: dict[str, Any] = field(default_factory=dict)  # the tables as written (after --set)

    def record(self, minutes: float, seed: int) -> dict[str, Any]:
        """What run.json records: the tables as written, plus this run's minutes and seed."""
        return {**copy.deepcopy(self.written), "minutes": minutes, "seed": seed}

    def resolved(self) -> dict[str, Any]:
        """Every setting with its default filled in (what two runs' settings are compared by)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "written"):
                continue
            value = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                value.update(value.pop("fields"))
            for kind in POST_KINDS:
                if f.name == kind:
                    value.update(value.pop("algo"))
            out[f.name] = value
        return out

    def pretrain_raw(self, run_dir: Path, minutes: float, seed: int) -> dict[str, Any]:
        """The pre-training config's tables (``nanoseek.train.config.config_from_dict``)."""
        p, m = self.written.get("pretrain", {}), self.written.get("model", {})
        return {
            "model": {"preset": self.model.preset, **{k: v for k, v in m.items() if k != "preset"}},
            "data": {"source": "packed", "dir": str(run_dir / "data"), **p.get("data", {})},
            "optim": dict(p.get("optim", {})),
            "train": {**p.get("train", {}), "out_dir": str(run_dir / "pretrain"), "seed": seed,
                      "max_minutes": minutes},
            "spike": dict(p.get("spike", {})),
        }

    def stage_raw(self, kind: str, model: dict[str, Any], out_dir: Path, minutes: float, seed: int) -> dict[str, Any]:
        """The ``kind`` stage config's tables (``nanoseek.post.registry.stage_config_from_dict``);
        the stage's own ``seed`` is the run's unless the recipe writes one."""
        s = self.written.get(kind, {})
        algo = {k: v for k, v in s.items() if k not in STAGE_TABLES}
        algo.setdefault("seed", seed)
        algo.update(self.tool_keys(kind, algo))
        return {"model": model, kind: algo, "optim": dict(s.get("optim", {})),
                "train": {**s.get("train", {}), "out_dir": str(out_dir), "seed": seed, "max_minutes": minutes},
                "spike": dict(s.get("spike", {}))}


    def tool_keys(self, kind: str, algo: dict[str, Any]) -> dict[str, Any]:
        """What ``[tools]`` adds to the ``kind`` stage's section ({} when it does not use tools): the tool
        tasks appended to its data / prompts, the built-ins and the tasks that get them."""
        t = self.tools
        if not t.use(kind):
            return {}
        from nanoseek.tasks.generators import split_specs

        key = "data" if kind == "sft" else "prompts"
        current = algo.get(key, getattr(getattr(self, kind).algo, key))
        if kind == "sft" and not current.startswith("tasks:"):
            raise ConfigError(f"{self.source}: [tools] sft = true needs generated [sft] data (tasks:SPEC) to add the "
                              f"tool tasks to, not {current!r}")
        joined = ",".join(dict.fromkeys(split_specs(current.removeprefix("tasks:")) + t.specs))   # once each
        out = {key: ("tasks:" + joined) if kind == "sft" else joined, "tools": t.tools,
               "tool_tasks": t.tool_tasks, "describe_tools": t.describe, "tool_offer": t.offer}
        if kind == "grpo":
            out["tool_failure_penalty"] = t.failure_penalty
            if t.grpo_weight != 1.0:            # the tool tasks' weights, unless [grpo] prompt_weights names them
                from nanoseek.post.datasets import DataError, parse_weights

                written = algo.get("prompt_weights", self.grpo.algo.prompt_weights)
                try:
                    named = set(parse_weights(written))
                except DataError:               # the stage's check_sources names the bad item
                    named = set()
                extra = [f"{name}={t.grpo_weight:g}" for name in t.task_names if name not in named]
                out["prompt_weights"] = ",".join(x for x in [written.strip(), *extra] if x)
        return out

    def eval_tasks(self) -> list[str]:
        """[eval] tasks, plus the tool tasks when the evaluations use tools (evaluated without tools here)."""
        from nanoseek.tasks.generators import split_specs

        tasks = split_specs(self.eval.tasks)
        return list(dict.fromkeys(tasks + self.tools.specs)) if self.tools.use("eval") else tasks

    def phrasing_tasks(self) -> list[str]:
        """The phrasing evaluation's items: every built-in task of [eval] tasks (not the tool tasks: head math
        on them scores ~0 in any wording) asked in each wording group (``reword:GROUP:ITEM``,
        :class:`nanoseek.tasks.sources.RewordSource`); empty when it is off."""
        from nanoseek.tasks.generators import split_specs
        from nanoseek.tasks.phrasing import GROUPS
        from nanoseek.tasks.sources import BuiltinSource, resolve

        if not self.eval.phrasing_problems:
            return []
        items = [i.partition("@")[0] for i in split_specs(self.eval.tasks) if isinstance(resolve(i), BuiltinSource)]
        return [f"reword:{g}:{i}" for i in items for g in GROUPS if g != "original"]   # original: eval.json's


TABLES = {"speedrun": RunSection, "budget": BudgetSection, "data": CorpusSection, "model": ModelSection,
          "pretrain": PretrainTables, "sft": PostTables, "grpo": PostTables, "eval": EvalSection,
          "tools": ToolsSection}


def _table(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")
    return value


def _split(raw: dict[str, Any], name: str, tables: tuple[str, ...], source: str) -> tuple[dict, dict[str, dict]]:
    """``raw[name]`` -> (its own keys, {sub-table: dict}); a sub-table that is not a table is an error."""
    table = _table(raw, name, source)
    subs = {t: _table(table, t, f"{source}: [{name}]").copy() for t in tables}
    return {k: v for k, v in table.items() if k not in tables}, subs


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>", overrides: tuple[str, ...] = ()) -> SpeedrunRecipe:
    """Every table parsed into its dataclass: unknown tables and keys, wrong types, missing keys
    and values out of range are one ConfigError line naming the key, and ``--set 'KEY=...'`` when
    one of ``overrides`` gave the value (:func:`where`). (The stages' cross-field checks are
    :func:`check_recipe`'s.)"""
    from nanoseek.model.registry import all_field_names
    from nanoseek.post.registry import STAGE_KINDS   # here, not at the top: it imports torch

    unknown = [k for k in raw if k not in TABLES]
    if unknown:
        raise ConfigError(f"{source}: unknown table [{unknown[0]}]. Valid tables: "
                          f"{', '.join('[' + t + ']' for t in TABLES)}")
    simple = {name: parse_section(TABLES[name], _table(raw, name, source), name, source)
              for name in ("speedrun", "budget", "data", "eval", "tools")}
    model = parse_section(ModelSection, _table(raw, "model", source), "model", source,
                          extra_keys=set(all_field_names()))
    own, subs = _split(raw, "pretrain", (*STAGE_TABLES, "data"), source)
    if own:
        raise ConfigError(f"{source}: unknown key '{next(iter(own))}' in [pretrain]. Valid keys: "
                          f"the tables {', '.join('[pretrain.' + t + ']' for t in (*STAGE_TABLES, 'data'))}")
    pretrain = PretrainTables(**{t: parse_section(type(getattr(PretrainTables(), t)), subs[t], f"pretrain.{t}", source)
                                 for t in subs})
    post = {}
    for kind in POST_KINDS:
        own, subs = _split(raw, kind, STAGE_TABLES, source)
        section, defaults = STAGE_KINDS[kind].section, STAGE_KINDS[kind].defaults.tables()
        tables = {t: parse_section(type(defaults[t]), subs[t], f"{kind}.{t}", source, default=defaults[t])
                  for t in STAGE_TABLES}
        post[kind] = PostTables(algo=parse_section(section, own, kind, source), **tables)
    rc = SpeedrunRecipe(model=model, pretrain=pretrain, **post, **simple, source=source, written=copy.deepcopy(raw))
    rc.overrides = tuple(overrides)             # not a setting: names --set in errors (where())
    _check_values(rc)
    return rc


def _check_values(rc: SpeedrunRecipe) -> None:
    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{where(rc, key)}: [{key.split('.')[0]}] {key.split('.', 1)[1]} = {value!r}: {why}")

    if not rc.speedrun.minutes > 0:
        raise bad("speedrun.minutes", rc.speedrun.minutes, "must be positive")
    for kind in ("pretrain", "sft", "grpo"):
        share = getattr(rc.budget, kind)
        if not 0 < share <= 1:
            raise bad(f"budget.{kind}", share, "must be in (0, 1] (a fraction of --minutes)")
    d, e = rc.data, rc.eval
    for key in ("task_docs", "vocab_size"):
        if getattr(d, key) < 1:
            raise bad(f"data.{key}", getattr(d, key), "must be >= 1")
    if not 0 <= d.val_fraction < 1:
        raise bad("data.val_fraction", d.val_fraction, "must be in [0, 1)")
    for key in ("problems", "min_problems", "k", "max_new_tokens", "batch_size", "external_problems"):
        if getattr(e, key) < 1:
            raise bad(f"eval.{key}", getattr(e, key), "must be >= 1")
    if e.few_shot < 0:
        raise bad("eval.few_shot", e.few_shot, "must be >= 0")
    if e.phrasing_problems < 0:
        raise bad("eval.phrasing_problems", e.phrasing_problems, "must be >= 0 (0: no phrasing robustness table)")
    t = rc.tools
    if t.failure_penalty < 0:
        raise bad("tools.failure_penalty", t.failure_penalty, "must be >= 0")
    from nanoseek.tasks.generators import parse_task_specs
    from nanoseek.tasks.tool_use import DESCRIBE, ToolUse

    if not t.tools.strip():
        raise bad("tools.tools", t.tools, "name at least one built-in tool (e.g. calculator)")
    try:
        ToolUse.of(t.tools)
    except ValueError as err:
        raise bad("tools.tools", t.tools, str(err)) from None
    try:
        specs = parse_task_specs(t.specs)
        ToolUse.of(t.tools, t.tool_tasks)          # the shares
    except ValueError as err:
        raise bad("tools.tasks", t.tasks, str(err)) from None
    if isinstance(t.describe, str) and t.describe not in DESCRIBE:
        raise bad("tools.describe", t.describe, f"must be one of {', '.join(DESCRIBE)} (or true / false)")
    if not (t.grpo_weight > 0 and math.isfinite(t.grpo_weight)):
        raise bad("tools.grpo_weight", t.grpo_weight, "must be a number > 0 (a tool task's share of GRPO's prompts "
                  "against another source's 1)")
    if not 0.0 < t.offer <= 1.0:
        raise bad("tools.offer", t.offer, "must be in (0, 1] (the share of training problems asked with the tools)")
    for name, _ in specs:
        if not ToolUse(t.tools).applies(name):
            raise bad("tools.tasks", t.tasks, f"task {name!r} has no tool call (its ideal reply uses no tool)")


def _check_task_specs(rc: SpeedrunRecipe) -> None:
    """Task names/levels in [data] tasks and [eval] tasks, and the stages' data sources ([sft] data,
    [grpo] prompts: each section's own ``check_sources``, as a stage config runs it) are checked
    before anything runs, so a typo fails in a second, naming the key."""
    from nanoseek.data.corpus import corpus_specs
    from nanoseek.tasks.sources import parse_sources

    for key, spec, parse in (("data.tasks", rc.data.tasks, corpus_specs), ("eval.tasks", rc.eval.tasks, parse_sources),
                             ("eval.external_tasks", rc.eval.external_tasks, parse_sources)):
        if key == "eval.external_tasks" and not spec:
            continue                            # no external section
        try:
            parsed = parse(spec)
        except ValueError as e:
            raise ConfigError(f"{where(rc, key)}: {key}: {e}") from None
        if key == "eval.external_tasks":        # the report's section is "written and graded by reasoning-gym"
            for src in parsed:
                if not src.name.startswith("rg:"):
                    raise ConfigError(f"{where(rc, key)}: {key}: {src.name!r} is not a reasoning-gym task (rg:NAME); "
                                      "external tasks are the ones nanoseek did not write: evaluate it in eval.tasks")
    for kind in POST_KINDS:
        try:                                    # as the stage runs it: with the tool tasks [tools] adds
            dataclasses.replace(getattr(rc, kind).algo, **rc.tool_keys(kind, {})).check_sources()
        except ValueError as e:                 # a DataError "key: why"
            raise ConfigError(f"{where(rc, kind + '.' + str(e).partition(':')[0])}: {kind}.{e}") from None
    _check_external_untrained(rc)


def training_specs(rc: SpeedrunRecipe) -> dict[str, str]:
    """The task specs each training stage draws from: config key -> spec ([sft] data only when generated)."""
    from nanoseek.post.sft import task_spec

    out = {"data.tasks": ",".join(rc.data.tasks) if isinstance(rc.data.tasks, list) else rc.data.tasks,
           "grpo.prompts": rc.grpo.algo.prompts}
    sft = task_spec(rc.sft.algo.data)
    if sft is not None:
        out["sft.data"] = sft
    return out


def _check_external_untrained(rc: SpeedrunRecipe) -> None:
    """A reasoning-gym dataset config that [eval] external_tasks evaluates is never a training source as
    well: training may use reasoning-gym, but with other generator settings (the hash split keeps the
    questions apart either way; the external score is meant to measure settings not trained on)."""
    from nanoseek.tasks.generators import split_specs
    from nanoseek.tasks.sources import resolve

    external = {resolve(item).name for item in rc.eval.external_tasks}
    for key, spec in training_specs(rc).items():
        for item in split_specs(spec):
            if item.strip().lower().startswith("rg:") and resolve(item).name in external:
                raise ConfigError(f"{where(rc, key)}: {key}: {resolve(item).name!r} is also in eval.external_tasks; "
                                  "train on other settings of that dataset (e.g. other digit counts or terms)")


def check_recipe(rc: SpeedrunRecipe) -> SpeedrunRecipe:
    """Each training stage's whole config, built now as it will be when the stage starts (at the
    reference budget, in a placeholder folder), so its cross-field checks run before anything trains."""
    from nanoseek.post.registry import stage_config_from_dict
    from nanoseek.train.config import config_from_dict

    _check_task_specs(rc)
    rc.model.build_config()
    where = Path("<run>")
    minutes, seed = rc.speedrun.minutes, rc.speedrun.seed
    config_from_dict(rc.pretrain_raw(where, rc.budget.pretrain * minutes, seed), source=f"{rc.source} [pretrain]")
    model = {"preset": rc.model.preset, **rc.model.fields}     # the checkpoint pre-training will write
    for kind in POST_KINDS:
        stage_config_from_dict(kind, rc.stage_raw(kind, model, where / kind, getattr(rc.budget, kind) * minutes, seed),
                               source=f"{rc.source} [{kind}]", init_pending=True)
    return rc


def _override_schema() -> dict[str, Any]:
    """TABLES as ``--set`` checks them: [sft] / [grpo] are the kind's section keys plus the
    sub-tables [KIND.optim], [KIND.train], [KIND.spike]."""
    from nanoseek.post.registry import STAGE_KINDS

    schema: dict[str, Any] = dict(TABLES)
    for kind in POST_KINDS:
        entry = STAGE_KINDS[kind]
        schema[kind] = {**{f.name: None for f in dataclasses.fields(entry.section)},
                        **{t: type(getattr(entry.defaults, t)) for t in STAGE_TABLES}}
    return schema


def where(rc: SpeedrunRecipe, key: str) -> str:
    """Where the value of ``key`` ("eval.external_tasks") came from: ``--set 'KEY=...'`` when a
    ``--set`` gave it, else the recipe file; the head of an error line about that value."""
    for text in getattr(rc, "overrides", ()):
        if text.partition("=")[0].strip() == key:
            return f"--set {text!r}"
    return rc.source


REPLACED_TABLES = ("model",)     # an extending recipe's table that replaces the base's whole


def read_recipe_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe TOML as a raw dict, with ``extends = "NAME"`` resolved: the recipe is the named one
    (a shipped name or a path) with this file's keys merged in, table by table, except [model],
    which replaces the base's whole (another model family has other fields: the V4 speedrun,
    ``speedrun-v4.toml``, is the V3 one with another [model])."""
    raw = read_toml(path)
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'extends' must be a recipe name or path, got {base_name!r}")
    base_path = resolve_config_path(base_name)
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: 'extends = {base_name!r}' extends itself")
    merged = read_recipe_toml(base_path, seen + (path.resolve(),))

    def merge(into: dict, new: dict, top: bool) -> dict:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict) and not (top and k in REPLACED_TABLES):
                into[k] = merge(dict(into[k]), v, False)
            else:
                into[k] = v
        return into

    return merge(merged, raw, True)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> SpeedrunRecipe:
    """Read a speedrun recipe (a path or the shipped ``speedrun``; ``extends``: :func:`read_recipe_toml`),
    apply ``--set``, validate it all."""
    try:
        path = resolve_config_path(name_or_path)
        raw = apply_overrides(read_recipe_toml(path), list(overrides), _override_schema())
        return check_recipe(recipe_from_dict(raw, source=str(path), overrides=tuple(overrides)))
    except ConfigError as e:
        raise UserError(str(e)) from None


def resolved_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run.json ``config`` (tables as written + minutes + seed) with every default filled in, so
    two runs compare by what they ran with, not by how their recipes were written; a record this
    version cannot parse compares as it is."""
    tables = {k: v for k, v in config.items() if k in TABLES}
    rest = {k: v for k, v in config.items() if k not in TABLES and not k.startswith("_")}
    try:
        return {**recipe_from_dict(copy.deepcopy(tables), "run.json").resolved(), **rest}
    except (ConfigError, TypeError):
        return {k: v for k, v in config.items() if not k.startswith("_")}


__all__ = ["RunSection", "BudgetSection", "CorpusSection", "EvalSection", "ToolsSection", "PretrainTables", "PostTables",
           "SpeedrunRecipe", "TABLES", "recipe_from_dict", "check_recipe", "load_recipe", "where", "resolved_settings"]
