"""Reading run folders: stage discovery and order, the prompt mode a stage implies, tolerant JSONL."""

from __future__ import annotations

import json
import os

import pytest

from nanoseek.eval.runs import (RunError, eval_mode_of, find_stages, numeric, read_jsonl, stage_of_checkpoint,
                                step_records)


def _stage(root, name, kind=None, toml=None, mtime=None):
    d = root / name
    (d / "final").mkdir(parents=True)
    (d / "final" / "config.json").write_text("{}")
    if kind:
        (d / "stage.json").write_text(json.dumps({"kind": kind, "status": "done", "steps": 3}))
    if toml is not None:
        (d / "config.toml").write_text(toml)
        if mtime is not None:
            os.utime(d / "config.toml", (mtime, mtime))
    return d


def test_eval_mode_from_stage_files(tmp_path):
    assert eval_mode_of(_stage(tmp_path, "a", toml='[data]\ndir = "d"\n[model]\npreset = "tiny"\n')) == "fewshot"
    assert eval_mode_of(_stage(tmp_path, "b", kind="sft", toml="[sft]\n")) == "chat"
    assert eval_mode_of(_stage(tmp_path, "c", kind="grpo", toml='[grpo]\ntemplate = "chat-think"\n')) == "chat-think"
    assert eval_mode_of(_stage(tmp_path, "d", kind="grpo", toml='[grpo]\ntemplate = "r1-zero"\n')) == "r1-zero"
    assert eval_mode_of(_stage(tmp_path, "e", kind="distill")) == "chat"
    assert eval_mode_of(_stage(tmp_path, "f")) is None
    # a checkpoint below a stage: the first folder above it that tells
    assert stage_of_checkpoint(tmp_path / "c" / "final") == ("c", "chat-think")
    assert stage_of_checkpoint(_stage(tmp_path, "sft") / "final") == ("sft", "chat")     # by name
    assert stage_of_checkpoint(tmp_path / "f" / "final") == (None, None)


def test_eval_mode_recorded_in_stage_json_comes_first(tmp_path):
    """A stage written now records its eval_mode; one written before (no eval_mode) keeps the old rules."""
    new = _stage(tmp_path, "x", toml="[grpo]\n")         # the config alone would say r1-zero
    (new / "stage.json").write_text(json.dumps({"kind": "grpo", "status": "done", "steps": 3,
                                                "eval_mode": "chat-think"}))
    assert eval_mode_of(new) == "chat-think"
    assert stage_of_checkpoint(new / "final") == ("x", "chat-think")
    renamed = _stage(tmp_path, "y")                     # a new kind the fallback rules do not know
    (renamed / "stage.json").write_text(json.dumps({"kind": "tool_rl", "status": "done", "steps": 3,
                                                    "eval_mode": "r1-zero"}))
    assert eval_mode_of(renamed) == "r1-zero"
    old = _stage(tmp_path, "z", kind="grpo", toml='[grpo]\ntemplate = "chat"\n')     # pre-eval_mode stage.json
    assert eval_mode_of(old) == "chat"
    assert eval_mode_of(_stage(tmp_path, "w", kind="tool_rl")) is None


def test_stage_order_known_names_then_start_time_for_recipe_names(tmp_path):
    known = tmp_path / "known"
    for name in ("grpo", "pretrain", "sft"):
        _stage(known, name)
    (known / "checkpoints").mkdir()                       # not a stage
    assert [s.name for s in find_stages(known)] == ["pretrain", "sft", "grpo"]
    recipe = tmp_path / "recipe"
    _stage(recipe, "final_rl", kind="grpo", toml="[grpo]\n", mtime=3000)
    _stage(recipe, "cold_start", kind="sft", toml="[sft]\n", mtime=1000)
    _stage(recipe, "reasoning_rl", kind="grpo", toml="[grpo]\n", mtime=2000)
    stages = find_stages(recipe)
    assert [s.name for s in stages] == ["cold_start", "reasoning_rl", "final_rl"]
    assert stages[0].eval_mode == "chat" and stages[0].stage_json()["status"] == "done"


def test_run_json_order_pending_stages_and_errors(tmp_path):
    _stage(tmp_path, "sft")
    _stage(tmp_path, "pretrain")
    (tmp_path / "run.json").write_text(json.dumps(
        {"stages": [{"name": "base", "dir": "pretrain", "eval_mode": "fewshot"}, "sft", {"name": "grpo"}]}))
    assert [s.name for s in find_stages(tmp_path)] == ["base", "sft"]
    stages = find_stages(tmp_path, include_pending=True)
    assert [s.name for s in stages] == ["base", "sft", "grpo"] and stages[0].eval_mode == "fewshot"
    (tmp_path / "run.json").write_text(json.dumps({"stages": [{"dir": "x"}]}))
    with pytest.raises(RunError, match="needs a"):
        find_stages(tmp_path)
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(RunError, match="run.json:1"):
        find_stages(tmp_path)
    with pytest.raises(RunError, match="no such run folder"):
        find_stages(tmp_path / "missing")


def test_jsonl_records_numbers_and_resumed_steps(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 2}\n[1, 2]\n{"step": 2, "loss": "nan"}\n{"step": 1, "loss": 1.5}\n')
    recs, offset, problems = read_jsonl(p)
    assert len(recs) == 3 and offset == p.stat().st_size and "not an object" in problems[0]
    assert [r["loss"] for r in step_records(recs)] == [1.5, "nan"]        # the resumed step 1 wins
    assert numeric("nan") != numeric("nan") and numeric(True) is None and numeric("x") is None
