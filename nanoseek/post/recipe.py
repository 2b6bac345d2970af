"""Multi-stage post-training recipes (DeepSeek-R1's pipeline) as one TOML file.

A recipe chains stages of the kinds ``sft``, ``dpo``, ``grpo`` and ``distill``; each stage is a
complete stage config (see :mod:`nanoseek.post.stage`) nested under ``[stages.NAME]``, run in
file order, each starting from the previous stage's final checkpoint::

    [recipe]
    init_from = "runs/pretrain"          # the base model
    out_dir = "runs/r1"                  # stage NAME runs in out_dir/NAME

    [defaults.train]                     # merged under every stage's tables (stage keys win)
    device = "auto"

    [stages.cold_start]
    kind = "sft"
    [stages.cold_start.sft]
    data = "tasks:arithmetic"
    ...

Two keys of a stage table steer the chain: ``init`` ("previous", the default: the last stage's
output; "base": the recipe's ``init_from``; or a path) and, for ``distill`` stages, ``teacher``
with the same values ("previous" samples from the last stage's output, i.e. rejection sampling).
DeepSeek-R1's rejection-sampling SFT retrained the *base* model on the RL model's verified
samples: ``init = "base"``, ``teacher = "previous"``.

(``[stages.NAME.distill] teacher`` is refused: the chain would overwrite it.)

``--set`` reaches any key: ``stages.final_rl.grpo.beta=0.01``, ``recipe.init_from=runs/x``.
Every stage is validated as a whole stage config when the recipe is read, before the first one
trains (a later stage's ``previous`` checkpoint does not exist yet: the base model stands in for
it), so a typo in the last stage fails at once, naming the stage and the key. With ``resume``,
stages whose ``stage.json`` says done are skipped and the first unfinished one resumes from its
last checkpoint. The kinds and their train functions are the registry's
(:mod:`nanoseek.post.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError
from nanoseek.train.config import apply_overrides, merge_tables, read_toml, resolve_config_path

from .registry import STAGE_KINDS, read_stage_record, stage_config_from_dict
from .stage import StageConfig, StageResult

RECIPE_KEYS = {"init_from", "out_dir", "name"}
STAGE_CHAIN_KEYS = {"kind", "init", "teacher"}


@dataclass
class RecipeStage:
    name: str
    kind: str
    init: str                          # "previous" | "base" | a path
    teacher: str | None                # kinds with a teacher (distill) only
    raw: dict[str, Any]                # the stage's tables, defaults merged


@dataclass
class Recipe:
    init_from: str
    out_dir: Path
    stages: list[RecipeStage] = field(default_factory=list)
    source: str = "<dict>"


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>", *, validate: bool = True) -> Recipe:
    """Check the recipe's structure and validate every stage's config (see :func:`validate_recipe`;
    ``validate=False``: the structure only, for :func:`recipe_to_toml`, which validates itself)."""
    unknown = set(raw) - {"recipe", "defaults", "stages"}
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)} in a recipe; valid: [recipe], "
                          "[defaults.*], [stages.NAME]")
    head = raw.get("recipe", {})
    bad = set(head) - RECIPE_KEYS
    if bad:
        raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in [recipe]; valid: {sorted(RECIPE_KEYS)}")
    if not head.get("init_from"):
        raise ConfigError(f"{source}: [recipe] init_from is required (the base model the recipe starts from)")
    out_dir = Path(head.get("out_dir") or f"runs/{Path(source).stem}")
    defaults = raw.get("defaults", {})
    stages_raw = raw.get("stages", {})
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{source}: a recipe needs at least one [stages.NAME] table")
    recipe = Recipe(init_from=str(head["init_from"]), out_dir=out_dir, source=source)
    for name, table in stages_raw.items():
        where = f"{source}: [stages.{name}]"
        kinds = list(STAGE_KINDS)
        if not isinstance(table, dict) or "kind" not in table:
            raise ConfigError(f"{where}: needs kind = " + " | ".join(f'"{k}"' for k in kinds))
        kind = table["kind"]
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: kind = {kind!r}: must be {', '.join(map(repr, kinds[:-1]))} or {kinds[-1]!r}")
        with_teacher = STAGE_KINDS[kind].teacher
        if "teacher" in table and not with_teacher:
            raise ConfigError(f"{where}: 'teacher' is only for "
                              f"{' / '.join(k for k, v in STAGE_KINDS.items() if v.teacher)} stages")
        rest = {k: v for k, v in table.items() if k not in STAGE_CHAIN_KEYS}
        for owner, tables in ((f"stages.{name}.{kind}", rest), (f"defaults.{kind}", defaults)):
            if with_teacher and isinstance(tables.get(kind), dict) and "teacher" in tables[kind]:
                raise ConfigError(f"{source}: [{owner}] teacher: a recipe's chain sets the teacher; write it as the "
                                  f"stage's own key instead: [stages.{name}] teacher = \"previous\" | \"base\" | PATH")
        recipe.stages.append(RecipeStage(name=name, kind=kind, init=str(table.get("init", "previous")),
                                         teacher=table.get("teacher") if with_teacher else None,
                                         raw=merge_tables(defaults, rest)))
    if recipe.stages[0].init == "previous":
        recipe.stages[0].init = "base"
    if validate:
        validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: Recipe) -> list[StageConfig]:
    """Every stage's config, validated now, before anything trains (one ConfigError naming the
    stage and the key otherwise). ``previous`` in a later stage stands for a checkpoint that does
    not exist yet; the base model stands in for it, as the checkpoint a stage's own keys are
    checked against (the real one is resolved when the stage starts)."""
    configs, previous = [], None
    for st in recipe.stages:
        configs.append(stage_config_from_dict(st.kind, _stage_raw(recipe, st, previous),
                                              source=f"{recipe.source} [stages.{st.name}]"))
        previous = recipe.init_from
    return configs


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, validate: bool = True) -> Recipe:
    path = resolve_config_path(path)
    raw = apply_overrides(read_toml(path), list(overrides), {"recipe": dict, "defaults": dict, "stages": dict})
    return recipe_from_dict(raw, source=str(path), validate=validate)


def recipe_to_toml(recipe: Recipe) -> str:
    """Every stage's resolved config (``--print-config``), in order, each under a ``# [stages.NAME]``
    line: validated as a run validates it (:func:`validate_recipe`) when the base model exists. A
    checkpoint the chain has not written yet (an earlier stage's output, or the base model before
    it is trained) is shown as a comment instead of ``init_from``, the stage parsed as one whose
    checkpoint is pending (:func:`~nanoseek.post.stage.parse_stage_config`)."""
    from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

    try:
        resolve_checkpoint(recipe.init_from)
        base_note = ""
    except LoadError:
        base_note = f"{recipe.init_from} (not found: the recipe's base model, to train first)"
    if not base_note:
        validate_recipe(recipe)
    out, previous = [], None
    for st in recipe.stages:
        written = {"base": (recipe.init_from, base_note)}
        if previous is not None:
            final = recipe.out_dir / previous / "final"
            written["previous"] = (str(final), "" if final.exists() else f"{final} (written by stage {previous})")
        missing = {ref: note for ref, (_, note) in written.items() if note}
        raw = _stage_raw(recipe, st, written.get("previous", (None,))[0], missing=missing)
        cfg = stage_config_from_dict(st.kind, raw, source=f"{recipe.source} [stages.{st.name}]",
                                     init_pending=st.init in missing)
        notes = [f"# [model] init_from = {missing[st.init]}"] if st.init in missing else []
        if st.teacher is not None and (st.teacher or "previous") in missing:
            notes.append(f"# [{st.kind}] teacher = {missing[st.teacher or 'previous']}")
        out.append("\n".join([f"# [stages.{st.name}]", *notes, cfg.to_toml()]))
        previous = st.name
    return "\n".join(out)


def _resolve(ref: str, base: str, previous: str | None) -> str:
    """A stage's ``init`` / ``teacher`` (one of CHAIN_REFS, or a path) -> the checkpoint it names."""
    if ref == "base":
        return base
    if ref == "previous":
        if previous is None:
            raise ConfigError("a stage refers to the 'previous' stage but it is the first one")
        return previous
    return ref


def run_recipe(recipe: Recipe, *, resume: bool = False, quiet: bool = False,
               progress: bool | None = None) -> list[StageResult]:
    """Run the stages in order; returns their results (skipped finished stages included)."""
    results: list[StageResult] = []
    previous: str | None = None
    for st in recipe.stages:
        run_dir = recipe.out_dir / st.name
        done = _finished(run_dir)
        if resume and done is not None:
            if not quiet:
                print(f"recipe: stage {st.name} already done -> {done['final_dir']}")
            previous = done["final_dir"]
            results.append(StageResult(kind=st.kind, run_dir=run_dir, final_dir=Path(done["final_dir"]),
                                       status="done", steps=done.get("steps", 0), extra={"skipped": True}))
            continue
        cfg = stage_config_from_dict(st.kind, _stage_raw(recipe, st, previous),
                                     source=f"{recipe.source} [stages.{st.name}]")
        if not quiet:
            print(f"recipe: stage {st.name} ({st.kind}) from {cfg.model.init_from} -> {run_dir}")
        res = STAGE_KINDS[st.kind].train(cfg, resume=bool(resume and (run_dir / "checkpoints").exists()), quiet=quiet,
                               progress=progress)
        results.append(res)
        if res.status not in ("done", "data_exhausted") or res.final_dir is None:
            if not quiet:
                print(f"recipe: stage {st.name} ended with status {res.status}; stopping")
            break
        previous = str(res.final_dir)
    return results


def _stage_raw(recipe: Recipe, st: RecipeStage, previous: str | None,
               missing: dict[str, str] | None = None) -> dict[str, Any]:
    """The stage's tables with the chain resolved: init_from, out_dir and (for kinds with a teacher)
    the teacher. ``missing``: chain references ("base", "previous") whose checkpoint does not exist
    yet: no init_from (pending), and the teacher keeps the reference (its check skips it)."""
    missing = missing or {}
    raw = merge_tables(st.raw, {"train": {"out_dir": str(recipe.out_dir / st.name)}})
    if st.init not in missing:
        raw = merge_tables(raw, {"model": {"init_from": _resolve(st.init, recipe.init_from, previous)}})
    if STAGE_KINDS[st.kind].teacher:
        ref = st.teacher or "previous"
        teacher = ref if ref in missing else _resolve(ref, recipe.init_from, previous)
        raw = merge_tables(raw, {st.kind: {"teacher": teacher}})
    return raw


def _finished(run_dir: Path) -> dict[str, Any] | None:
    info = read_stage_record(run_dir)              # a malformed stage.json is one ConfigError line
    if info is None:
        return None
    if info.get("status") in ("done", "data_exhausted") and info.get("final_dir") and Path(info["final_dir"]).exists():
        return info
    return None


__all__ = ["Recipe", "RecipeStage", "recipe_from_dict", "validate_recipe", "load_recipe", "recipe_to_toml",
           "run_recipe"]
