"""One default per setting: a shipped TOML writes only what it chooses differently from the
defaults (the trainer's sections, a post-training kind's registry defaults, a stage's own section,
the speedrun recipe's tables), and every shipped TOML resolves to the values pinned here."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from nanoseek.post.registry import STAGE_KINDS
from nanoseek.speedrun_recipe import TABLES as SPEEDRUN_TABLES, PretrainTables
from nanoseek.train.config import SECTIONS, TRAIN_CONFIG_DIR

STAGE_KIND = {"sft": "sft", "dpo": "dpo", "distill": "distill", "r1-zero": "grpo"}


def _sections():
    return {kind: k.section for kind, k in STAGE_KINDS.items()}


def _field_defaults(obj_or_cls) -> dict:
    out = {}
    for f in dataclasses.fields(obj_or_cls):
        if not isinstance(obj_or_cls, type):
            out[f.name] = getattr(obj_or_cls, f.name)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _restated(table: dict, defaults: dict, where: str) -> list[str]:
    return [f"{where} {k} = {v!r}" for k, v in table.items()
            if not isinstance(v, dict) and k in defaults and defaults[k] == v and type(defaults[k]) is type(v)
            or k == "out_dir" and v == f"runs/{where.split(':')[0]}"]


def _stage_tables(raw: dict, kind: str, where: str) -> list[str]:
    """A stage's tables ([kind], [optim], [train], [spike]) against the kind's defaults."""
    d = STAGE_KINDS[kind].defaults
    found = _restated(raw.get(kind, {}), _field_defaults(_sections()[kind]), f"{where} [{kind}]")
    for t in ("optim", "train", "spike"):
        found += _restated(raw.get(t, {}), _field_defaults(getattr(d, t)), f"{where} [{t}]")
    return found


def restated_defaults(name: str) -> list[str]:
    """The keys of shipped TOML ``name`` whose value is the default they would get unwritten."""
    raw = tomllib.loads((TRAIN_CONFIG_DIR / f"{name}.toml").read_text())
    if name == "speedrun":
        found = []
        for t in ("speedrun", "budget", "data", "eval", "model"):
            found += _restated(raw.get(t, {}), _field_defaults(SPEEDRUN_TABLES[t]), f"{name}: [{t}]")
        for t, value in raw.get("pretrain", {}).items():
            found += _restated(value, _field_defaults(type(getattr(PretrainTables(), t))), f"{name}: [pretrain.{t}]")
        for kind in ("sft", "grpo"):
            tables = raw.get(kind, {})
            own = {k: v for k, v in tables.items() if k not in ("optim", "train", "spike")}
            found += _stage_tables({kind: own, **{t: tables.get(t, {}) for t in ("optim", "train", "spike")}},
                                   kind, f"{name}: [{kind}]")
        return found
    if "stages" in raw:
        found = []
        for st, table in raw["stages"].items():
            defaults = raw.get("defaults", {})            # merged under every stage's tables
            names = {*defaults, *(t for t, v in table.items() if isinstance(v, dict))}
            merged = {t: {**defaults.get(t, {}), **table.get(t, {})} for t in names}
            found += _stage_tables(merged, table["kind"], f"{name}: [stages.{st}]")
        return found
    if name in STAGE_KIND:
        return _stage_tables(raw, STAGE_KIND[name], f"{name}:")
    found = []
    for t, cls in SECTIONS.items():
        found += _restated(raw.get(t, {}), _field_defaults(cls), f"{name}: [{t}]")
    return found


@pytest.mark.parametrize("name", sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.toml")))
def test_shipped_toml_writes_no_default(name):
    assert restated_defaults(name) == []


# ------------------------------------------------------------------ the resolved values, pinned
PINNED = Path(__file__).with_name("shipped_configs_resolved.json")


def _normalised(x, base: Path, run: Path):
    if isinstance(x, dict):
        return {k: _normalised(v, base, run) for k, v in x.items()}
    if isinstance(x, list):
        return [_normalised(v, base, run) for v in x]
    if isinstance(x, str):
        return x.replace(str(base.resolve()), "<base>").replace(str(base), "<base>").replace(str(run), "<run>")
    return x


def resolved_shipped_configs(base: Path, run: Path) -> dict:
    """{name: resolved config} for every shipped TOML (a stage's init_from: ``base``; the speedrun's
    stages at the reference 30 minutes, seed 0, in run folder ``run``)."""
    from nanoseek import speedrun as sp
    from nanoseek.post.recipe import load_recipe as load_multi_stage
    from nanoseek.post.registry import load_stage_config, stage_config_from_dict
    from nanoseek.speedrun_recipe import load_recipe
    from nanoseek.train.config import load_config

    out = {name: load_config(name).to_dict() for name in ("tiny", "bench-moe", "v4-tiny")}
    for name, kind in STAGE_KIND.items():
        out[name] = load_stage_config(name, kind, [f"model.init_from={base}"] if kind != "distill" else []).to_dict()
    for st in load_multi_stage("r1", [f"recipe.init_from={base}"]).stages:
        raw = {**st.raw, "model": {"init_from": str(base)}}
        out[f"r1/{st.name}"] = stage_config_from_dict(st.kind, raw, source="r1").to_dict()
    rc = load_recipe("speedrun", [])
    out["speedrun/pretrain"] = sp._pretrain_config(run, rc, rc.budget.pretrain * 30.0, 0).to_dict()
    for kind in ("sft", "grpo"):
        out[f"speedrun/{kind}"] = sp._stage_config(kind, run, rc, base, getattr(rc.budget, kind) * 30.0, 0).to_dict()
    resolved = rc.resolved()
    out["speedrun/tables"] = {t: resolved[t] for t in ("speedrun", "budget", "data", "eval")}
    return _normalised(out, base, run)


def test_shipped_tomls_resolve_to_the_pinned_values(tmp_path, monkeypatch):
    """Every value each shipped TOML resolves to (the file, the kind's and the trainer's defaults)
    equals tests/shipped_configs_resolved.json, computed before the defaults were consolidated
    (one default per setting): a default changed elsewhere cannot move a shipped recipe silently.
    A deliberate change regenerates the file and says so."""
    import json

    from nanoseek.model.checkpoint import save_pretrained
    from post_helpers import tiny_model, tiny_tokenizer

    base = tmp_path / "base"
    tk = tiny_tokenizer()
    save_pretrained(tiny_model(tk.vocab_size), base)
    tk.save(base)
    monkeypatch.chdir(tmp_path)              # distill.toml's teacher (checked when read) is a checkpoint here
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "final_rl").symlink_to(base, target_is_directory=True)
    got = resolved_shipped_configs(base, tmp_path / "run")
    want = json.loads(PINNED.read_text())
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
