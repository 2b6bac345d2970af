"""The stage registry is the only "kind -> code" table, and ``post/`` is layered around it.

Every registered kind round-trips through the command line (``nanoseek KIND``), the multi-stage
recipe and the config parser, reaching the registry's section class and train function (stubbed
here: nothing trains); ``stage.py`` imports no algorithm module; ``post/`` has no import cycle
(function-level imports counted); no other module branches on kind names. A recipe whose last
stage has a typo fails before anything trains or any folder is made.
"""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import nanoseek
from nanoseek.cli import COMMANDS, main
from nanoseek.post.recipe import load_recipe, recipe_from_dict, run_recipe
from nanoseek.post.registry import STAGE_KINDS, stage_config_from_dict
from nanoseek.post.stage import StageResult
from nanoseek.errors import ConfigError
from post_helpers import saved_tiny_checkpoint

PKG = Path(nanoseek.__file__).parent


@pytest.fixture
def base(tmp_path):
    """A saved tiny checkpoint with its tokenizer."""
    return saved_tiny_checkpoint(tmp_path / "base")


@pytest.fixture
def stub_trains(monkeypatch, base):
    """Replace every registered train function by one that records its config and trains nothing."""
    calls = []

    def stub(cfg, *, resume=False, quiet=False, progress=None):
        calls.append(cfg)
        return StageResult(kind=cfg.kind, run_dir=Path(cfg.train.out_dir), final_dir=base, status="done", steps=0)

    for kind, entry in list(STAGE_KINDS.items()):
        monkeypatch.setitem(STAGE_KINDS, kind, dataclasses.replace(entry, train=stub))
    return calls


def test_every_kind_round_trips_through_the_cli(base, tmp_path, stub_trains, capsys):
    for kind, entry in STAGE_KINDS.items():
        assert kind in COMMANDS                                   # a `nanoseek KIND` command
        model = ["--model", str(base)] if entry.init_required else []
        if entry.teacher:                                         # the shipped config's teacher is not trained here
            model += ["--set", f"{kind}.teacher={base}"]
        assert main([kind, *model, "--out", str(tmp_path / kind), "--steps", "1", "--quiet"]) == 0
        cfg = stub_trains[-1]
        assert cfg.kind == kind and type(cfg.algo) is entry.section and cfg.train.max_steps == 1
        assert f"{kind}: done after 0 steps" in capsys.readouterr().out
    assert [c.kind for c in stub_trains] == list(STAGE_KINDS)


def test_every_kind_round_trips_through_a_recipe(base, tmp_path, stub_trains):
    raw = {"recipe": {"init_from": str(base), "out_dir": str(tmp_path / "r")},
           "defaults": {"train": {"max_steps": 1}},
           "stages": {f"s_{kind}": {"kind": kind} for kind in STAGE_KINDS}}
    results = run_recipe(recipe_from_dict(raw), quiet=True)
    assert [r.kind for r in results] == [c.kind for c in stub_trains] == list(STAGE_KINDS)
    for cfg in stub_trains:
        assert type(cfg.algo) is STAGE_KINDS[cfg.kind].section
        assert cfg.train.out_dir == str(tmp_path / "r" / f"s_{cfg.kind}")
        if STAGE_KINDS[cfg.kind].teacher:                          # "previous": the stage before's output
            assert cfg.algo.teacher == str(base)


def test_unknown_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown stage kind 'ppo'; expected one of \['distill', 'dpo', 'grpo', 'sft'\]"):
        stage_config_from_dict("ppo", {})
    with pytest.raises(ConfigError, match="kind = 'ppo': must be 'sft', 'dpo', 'grpo' or 'distill'"):
        recipe_from_dict({"recipe": {"init_from": "x"}, "stages": {"a": {"kind": "ppo"}}})


LAST_STAGE_TYPO = """
[recipe]
init_from = "{base}"
out_dir = "{out}"
[defaults.train]
max_steps = 1
[stages.cold_start]
kind = "sft"
[stages.rl]
kind = "grpo"
[stages.final_rl]
kind = "grpo"
[stages.final_rl.grpo]
tempelate = "chat"
"""


def test_a_typo_in_the_last_stage_fails_before_the_first_trains(base, tmp_path, stub_trains, capsys):
    out = tmp_path / "r1"
    path = tmp_path / "recipe.toml"
    path.write_text(LAST_STAGE_TYPO.format(base=base, out=out))
    with pytest.raises(ConfigError, match=r"\[stages\.final_rl\].*tempelate"):
        load_recipe(path)
    assert main(["grpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[stages.final_rl]" in err and "tempelate" in err and len(err.strip().splitlines()) == 1
    assert stub_trains == [] and not out.exists()              # nothing trained, no folder made
    # a bad value (not only a bad key) in the last stage, and a --set typo, fail the same way
    path.write_text(LAST_STAGE_TYPO.format(base=base, out=out).replace("tempelate", "group_size = 1\n#"))
    assert main(["grpo", "--config", str(path)]) == 2
    assert "[stages.final_rl]: [grpo] group_size = 1: must be >= 2" in capsys.readouterr().err
    path.write_text(LAST_STAGE_TYPO.format(base=base, out=out).replace("tempelate", "template"))
    assert main(["grpo", "--config", str(path), "--set", "stages.final_rl.optim.lr_typo=1"]) == 2
    assert "lr_typo" in capsys.readouterr().err
    assert stub_trains == [] and not out.exists()
    assert main(["grpo", "--config", str(path)]) == 0 and [c.kind for c in stub_trains] == ["sft", "grpo", "grpo"]


@pytest.mark.parametrize("kind, key, value, why", [
    ("grpo", "prompts", '"nosuch"', "task spec 'nosuch': unknown task"),
    ("grpo", "prompts", '"/nonexist.jsonl"', "/nonexist.jsonl: no such file"),
    ("grpo", "prompts", '"{tmp}/dir.jsonl"', "dir.jsonl: not a regular file"),
    ("grpo", "prompts", '"rg:leg_countin"', "unknown reasoning-gym dataset 'rg:leg_countin'; close matches: "
                                            "rg:leg_counting"),
    ("grpo", "level", "9", "task 'arithmetic' has levels [1, 2, 3, 4], not 9"),
    ("sft", "data", '"tasks:nosuch"', "task spec 'nosuch': unknown task"),
    ("sft", "data", '"/nonexist.jsonl"', "/nonexist.jsonl: no such file"),
    ("dpo", "data", '"/nonexist.jsonl"', "/nonexist.jsonl: no such file"),
    ("dpo", "data", '"auto:nosuch"', "task spec 'nosuch': unknown task"),
    ("distill", "prompts", '"/nonexist.jsonl"', "/nonexist.jsonl: no such file"),
    ("distill", "teacher", '"/nonexist"', "/nonexist: no such file or directory"),
    # evaluation-only sources (HumanEval has no training split), alone or mixed with trainable ones
    ("grpo", "prompts", '"humaneval"', "task 'humaneval' is for evaluation only"),
    ("grpo", "prompts", '"arithmetic:1,humaneval:0-3"', "task 'humaneval' is for evaluation only"),
    ("sft", "data", '"tasks:humaneval"', "task 'humaneval' is for evaluation only"),
    ("sft", "data", '"tasks:rg:leg_counting,HumanEval:2"', "task 'humaneval' is for evaluation only"),
    ("dpo", "data", '"auto:humaneval"', "task 'humaneval' is for evaluation only"),
    ("distill", "prompts", '"countdown,humaneval"', "task 'humaneval' is for evaluation only"),
])
def test_a_bad_data_source_in_the_last_stage_fails_before_the_first_trains(base, tmp_path, stub_trains, capsys,
                                                                           kind, key, value, why):
    """A value naming data that is not there (a task spec, a level, a file, an unknown reasoning-gym dataset,
    a teacher) fails when the recipe is read, naming the file, the stage and the key; one line."""
    out = tmp_path / "r1"
    (tmp_path / "dir.jsonl").mkdir()
    path = tmp_path / "recipe.toml"
    extra = '\nnum_examples = 8' if kind == "sft" else ""
    line = f"{key} = {value.replace('{tmp}', str(tmp_path))}{extra}"
    stage_key = key == "teacher"                               # a recipe's teacher is the stage's own key
    path.write_text(LAST_STAGE_TYPO.format(base=base, out=out).replace(
        'kind = "grpo"\n[stages.final_rl.grpo]',
        f'kind = "{kind}"\n{line if stage_key else ""}\n[stages.final_rl.{kind}]').replace(
        'tempelate = "chat"', "" if stage_key else line))
    assert main(["grpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} [stages.final_rl]: [{kind}] {key}: " in err and why in err and len(err.strip().splitlines()) == 1
    assert stub_trains == [] and not out.exists()              # nothing trained, no folder made


def test_a_single_stage_command_checks_its_data_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """`nanoseek sft --data /nonexist.jsonl` fails at config time (no model is loaded: none exists here)."""
    import nanoseek.post.stage as stage

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(stage, "load_model", no_model)
    base = saved_tiny_checkpoint(tmp_path / "base")
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "[sft] data: " in err and "none.jsonl: no such file" in err and "sft.toml" in err
    assert main(["grpo", "--model", str(base), "--set", "grpo.level=9", "--out", str(tmp_path / "o")]) == 2
    assert "[grpo] level: task 'arithmetic' has levels" in capsys.readouterr().err
    for args, key in ((["sft", "--data", "tasks:humaneval", "--set", "sft.num_examples=4"], "[sft] data: "),
                      (["grpo", "--set", "grpo.prompts=humaneval"], "[grpo] prompts: ")):
        assert main([*args, "--model", str(base), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert key + "task 'humaneval' is for evaluation only" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_distill_teacher_that_does_not_exist_is_one_line(base, tmp_path, capsys):
    assert main(["distill", "--set", f"distill.teacher={tmp_path / 'nope'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "[distill] teacher: " in err and "nope: no such file or directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_teacher_inside_a_recipe_s_distill_table_is_refused(base, tmp_path):
    raw = {"recipe": {"init_from": str(base)}, "defaults": {"train": {"max_steps": 1}},
           "stages": {"a": {"kind": "sft"}, "b": {"kind": "distill", "distill": {"teacher": str(base)}}}}
    with pytest.raises(ConfigError, match=r"\[stages\.b\.distill\] teacher: a recipe's chain sets the teacher; "
                                          r"write it as the stage's own key instead: \[stages\.b\] teacher ="):
        recipe_from_dict(raw)
    raw["stages"]["b"] = {"kind": "distill", "teacher": str(base)}
    assert recipe_from_dict(raw).stages[1].teacher == str(base)


def test_load_error_is_a_user_error():
    from nanoseek.errors import UserError
    from nanoseek.train.checkpoint import LoadError

    assert issubclass(LoadError, UserError) and issubclass(LoadError, ValueError)


# ----------------------------------------------------------------------------- layering, statically


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports anywhere (top level and inside functions), as dotted names."""
    pkg = ".".join(["nanoseek", *path.relative_to(PKG).parts[:-1]])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                out.add(f"{base}.{node.module}" if node.module else base)
                if not node.module:
                    out |= {f"{base}.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


def test_stage_is_the_foundation_and_post_has_no_import_cycle():
    post = {f"nanoseek.post.{p.stem}": p for p in (PKG / "post").glob("*.py")}
    assert "nanoseek.post.registry" in post and "nanoseek.post.rollout" in post
    graph = {m: {i for i in _imports(p) if i in post} for m, p in post.items()}
    algorithms = {f"nanoseek.post.{k}" for k in STAGE_KINDS} | {"nanoseek.post.registry"}
    assert not graph["nanoseek.post.stage"] & algorithms, graph["nanoseek.post.stage"]
    assert not graph["nanoseek.post.rollout"] & algorithms, graph["nanoseek.post.rollout"]

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        for n in sorted(graph[m]):
            visit(n, path + [m])

    for m in graph:
        visit(m, [])


def test_no_module_but_the_registry_branches_on_kind_names():
    kinds = "|".join(STAGE_KINDS)
    branch = re.compile(rf"""kind\s*(==|!=)\s*["']|["']({kinds})["']\s*:\s*(\w*(train|run)_|\w+Section\b)""")
    files = [*(PKG / "post").glob("*.py"), PKG / "speedrun.py"]
    hits = [f"{f.name}:{i}: {line.strip()}" for f in files if f.name != "registry.py"
            for i, line in enumerate(f.read_text().splitlines(), 1) if branch.search(line)]
    assert hits == []
    # the plumbing reaches a kind's train function through the registry only
    plumbing = [PKG / "post" / "cli_common.py", PKG / "post" / "recipe.py", PKG / "speedrun.py"]
    imported = [(f.name, m) for f in plumbing for m in _imports(f) if m in {f"nanoseek.post.{k}" for k in STAGE_KINDS}]
    assert imported == []
