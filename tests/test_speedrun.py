"""The speedrun's orchestration: recipe parsing and errors, resume bookkeeping, and (slow) a
whole smoke run end to end."""

import json

import pytest

from nanoseek.cli import UserError, main
from nanoseek.speedrun import RunState, load_recipe


def test_shipped_recipe_loads_and_overrides_apply():
    rc = load_recipe("speedrun", ["budget.pretrain=0.5", "eval.k=2"])
    assert rc["budget"]["pretrain"] == 0.5 and rc["eval"]["k"] == 2
    assert sum(rc["budget"][s] for s in ("pretrain", "sft", "grpo")) < 1.0  # evals and data need time too
    assert rc["model"]["num_nextn_predict_layers"] == 1 and rc["model"]["n_routed_experts"] > 0


@pytest.mark.parametrize("override, message", [
    ("budget.pretrian=0.5", "unknown key 'pretrian'"),
    ("nosuch.key=1", "TABLE.KEY=VALUE"),
    ("budget", "TABLE.KEY=VALUE"),
    ('data.tasks=["compare:1-2", "modular:7"]', "data.tasks: task spec 'modular:7': modular has levels"),
    ('eval.tasks="arithmetic,compar"', "eval.tasks: task spec 'compar': unknown task"),
    ('sft.data="tasks:arithmetic:x"', "sft.data: task spec 'arithmetic:x': levels must be"),
    ('grpo.prompts="word_problem:1"', "grpo.prompts: task spec 'word_problem:1'"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


def test_unknown_recipe_table_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[speedrun]\nminutes = 1\n[budgett]\npretrain = 0.5\n")
    with pytest.raises(UserError, match="budgett"):
        load_recipe(str(bad), [])


def test_run_state_survives_a_restart(tmp_path):
    state = RunState(tmp_path, {"minutes": 3})
    state.mark("data", "done")
    state.update("pretrain", status="running")
    state.mark("pretrain", "running")
    again = RunState(tmp_path, {"minutes": 3})          # a re-run into the same folder
    assert again.done("data") and not again.done("pretrain")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"


def test_cli_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["speedrun", "--minutes", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_speedrun_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done"
    assert all(run["steps"][s] == "done" for s in ("data", "pretrain", "eval_base", "sft", "eval_sft", "grpo",
                                                     "eval_grpo"))
    for stage in ("pretrain", "sft", "grpo"):
        assert (out / stage / "final" / "config.json").exists() and (out / stage / "eval.json").exists()
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html.split("<body", 1)[-1].replace("http://127.0.0.1", "")
    # re-running into the folder resumes: every step is already done
    assert main(["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]) == 0
