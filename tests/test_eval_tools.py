"""Evaluation with tools (``nanoseek eval --tools``): the tool tasks' prompts describe the tools and their
samples run through the tool loop (a scripted engine returning the design's Completion fields); results
record tool calls and failed calls per problem; tools.json round-trips; the report's tables show accuracy
with and without tools, paired, and the calls per task."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from nanoseek.eval.harness import EvalConfig, evaluate
from nanoseek.eval.results import EvalResult
from nanoseek.eval.tables import TOOL_HEADER, tool_rows
from nanoseek.tools.format import TOOLS_HEADER
from post_helpers import tiny_model, tool_completion, tool_tokenizer

HEAD = "<think>\nThis needs the calculator tool.\n</think>\n\n"


@pytest.fixture
def sampling_with_tools(monkeypatch):
    """SamplingParams with the engine's ``tools`` field (the tool loop's; a stand-in until it exists)."""
    from nanoseek.infer import sampling

    if "tools" not in {f.name for f in dataclasses.fields(sampling.SamplingParams)}:
        cls = dataclasses.make_dataclass("SamplingParams", [("tools", str, dataclasses.field(default="off"))],
                                         bases=(sampling.SamplingParams,))
        monkeypatch.setattr(sampling, "SamplingParams", cls)


class ToolEngine:
    """``generate(prompts, params, toolbox=None)``; a tool prompt's sample k: k even calls the calculator
    (k % 4 == 2 with a broken expression, then a wrong answer), k odd answers without a call."""

    max_batch_size, max_seq_len = 16, 2048

    def __init__(self, tk):
        self.tk, self.calls = tk, []

    def generate(self, prompts, params, toolbox=None):
        out = []
        for ids in prompts:
            text = self.tk.decode(ids)
            self.calls.append((TOOLS_HEADER.strip() in text, params.tools if hasattr(params, "tools") else "off",
                               toolbox))
            question = text.rsplit("What is ", 1)[-1].split("?")[0] if "What is " in text else None
            comps = []
            for k in range(params.n):
                if toolbox is None or question is None:
                    body = HEAD + "Answer: 3"
                    ids_ = self.tk.encode_text(body) + [self.tk.eos_id]
                    comps.append(SimpleNamespace(token_ids=ids_, text=body, reasoning=None, finish_reason="stop",
                                                 stop_reason="eos", completion_tokens=len(ids_)))
                elif k % 2:
                    body = HEAD + "Answer: 3"
                    ids_ = self.tk.encode_text(body) + [self.tk.eos_id]
                    comps.append(SimpleNamespace(token_ids=ids_, text=body, final_text=body, model_mask=[1] * len(ids_),
                                                 tool_calls=[], tool_results=[], reasoning=None, finish_reason="stop",
                                                 stop_reason="eos", completion_tokens=len(ids_)))
                else:
                    bad = k % 4 == 2
                    expr = question + (" *" if bad else "")
                    from nanoseek.tools.calculator import calculator

                    final = "Answer: 1" if bad else f"Answer: {calculator(question)}"
                    comps.append(tool_completion(self.tk, toolbox, HEAD, json.dumps({"expression": expr}), final))
            out.append(comps)
        return out


def _eval(tk, **kw):
    cfg = EvalConfig(tasks=["big_arithmetic:1", "compare:1"], n_problems=6, k=4, mode="chat", max_new_tokens=64, **kw)
    return evaluate(tiny_model(tk.vocab_size, max_position_embeddings=2048), tk, cfg, engine=ToolEngine(tk))


def test_eval_with_tools_records_calls_per_problem(sampling_with_tools, tmp_path):
    tk = tool_tokenizer()
    engine = ToolEngine(tk)
    cfg = EvalConfig(tasks=["big_arithmetic:1", "compare:1"], n_problems=6, k=4, mode="chat", max_new_tokens=64,
                     tools="calculator", tool_tasks="big_arithmetic")
    res = evaluate(tiny_model(tk.vocab_size, max_position_embeddings=2048), tk, cfg, engine=engine)
    # the tool task's requests describe and run the tools; compare's do neither
    assert {(described, mode, tb is not None) for described, mode, tb in engine.calls} == \
        {(True, "run", True), (False, "off", False)}
    big = [p for p in res.problems if p.task == "big_arithmetic"]
    assert len(big) == 6 and all(p.tool_calls == [1, 0, 1, 0] and p.tool_failed == [0, 0, 1, 0] for p in big)
    assert all(p.correct == [True, False, False, False] for p in big)      # the final answer, not the tool output
    assert all(not p.tool_calls and not p.tool_failed for p in res.problems if p.task == "compare")
    tools = res.summary("big_arithmetic")["tools"]
    assert tools == {"n": 6, "calls_per_sample": 0.5, "use_rate": 0.5, "calls": 12, "failed": 6, "failed_rate": 0.5}
    assert "tools" not in res.summary("compare")
    assert res.config["tools"] == "calculator" and res.config["tool_tasks"] == "big_arithmetic"
    # tools.json round-trips the per-problem fields
    back = EvalResult.load(res.save(tmp_path / "tools.json"))
    assert [p.tool_calls for p in back.problems] == [p.tool_calls for p in res.problems]
    assert back.summary("big_arithmetic")["tools"] == tools


def test_with_and_without_tools_table_pairs_the_same_problems(sampling_with_tools):
    tk = tool_tokenizer()
    with_tools = _eval(tk, tools="calculator", tool_tasks="big_arithmetic")
    without = _eval(tk)
    assert all(not p.tool_calls for p in without.problems)
    header, rows = tool_rows(with_tools, without)
    assert header == TOOL_HEADER and [r[0] for r in rows] == ["big_arithmetic"]
    [row] = rows
    assert row[1] == "6" and row[2].startswith("0.0%") and row[3].startswith("25.0%")
    assert row[4].startswith("+25.0 pts") and row[5] == "0.50" and row[6] == "50.0%" and row[7] == "50.0%"
    assert tool_rows(with_tools)[1][0][2] == "-"                 # no baseline: shown as missing, not invented


def test_eval_config_refuses_tools_outside_chat_modes_and_unknown_names():
    with pytest.raises(ValueError, match="chat mode"):
        EvalConfig(tasks=["big_arithmetic"], mode="fewshot", tools="calculator").validate()
    with pytest.raises(ValueError, match="abacus"):
        EvalConfig(tasks=["big_arithmetic"], tools="abacus").validate()
    with pytest.raises(ValueError, match="algebra"):
        EvalConfig(tasks=["big_arithmetic"], tools="calculator", tool_tasks="algebra").validate()


def test_eval_cli_takes_tools_flags():
    import argparse

    from nanoseek.eval import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--model", "m", "--tools", "calculator", "--tool-tasks", "big_arithmetic"])
    assert args.tools == "calculator" and args.tool_tasks == "big_arithmetic"


def test_report_shows_a_tool_use_section(tmp_path, sampling_with_tools):
    from nanoseek.eval.report import build_sections

    tk = tool_tokenizer()
    stage = tmp_path / "sft"
    stage.mkdir()
    _eval(tk).save(stage / "eval.json")
    _eval(tk, tools="calculator", tool_tasks="big_arithmetic").save(stage / "tools.json")
    _, _, sections, notes = build_sections(tmp_path)
    tool = [s for s in sections if s.title == "Tool use"]
    assert tool, [s.title for s in sections]
    text = json.dumps([b for b in tool[0].blocks], default=str)
    assert "big_arithmetic" in text and "+25.0 pts" in text


def test_a_tokenizer_without_tool_tokens_is_one_line():
    from post_helpers import WithoutToolTokens

    with pytest.raises(ValueError, match="cannot call tools"):
        _eval(WithoutToolTokens(tool_tokenizer()), tools="calculator")


def test_tools_that_no_task_gets_are_noted(sampling_with_tools):
    tk = tool_tokenizer()
    cfg = EvalConfig(tasks=["compare:1"], n_problems=3, k=1, mode="chat", max_new_tokens=16, tools="calculator")
    res = evaluate(tiny_model(tk.vocab_size, max_position_embeddings=2048), tk, cfg, engine=ToolEngine(tk))
    assert any("no task evaluated here gets them" in n for n in res.notes)
    assert all(not p.tool_calls for p in res.problems)


def _result(rows, tools=False):
    from nanoseek.eval.results import EvalResult, ProblemResult

    problems = [ProblemResult(task=t, id=i, level=1, gold="1", correct=c, format_ok=[True] * len(c), answers=["1"] * len(c),
                              tokens=[5] * len(c), truncated=[False] * len(c),
                              tool_calls=[1] * len(c) if tools else []).compute_curves() for t, i, c in rows]
    return EvalResult.build({"tools": "calculator", "tool_tasks": "arithmetic"} if tools else {}, problems)


def test_the_held_out_evaluation_as_used_scores_the_tool_tasks_with_their_tools(tmp_path):
    """with_tools(eval.json, tools.json): the tool tasks' problems from the evaluation with tools, the rest
    unchanged; the report pairs it between stages (a model that delegates sums to the calculator is
    scored with the calculator, next to the evaluation without it)."""
    from nanoseek.eval.report import build_sections
    from nanoseek.eval.results import with_tools

    plain = _result([("compare", "c1", [True, True]), ("arithmetic", "a1", [False, False]), ("arithmetic", "a2", [True, False])])
    tooled = _result([("arithmetic", "a1", [True, True]), ("arithmetic", "a2", [True, True])], tools=True)
    used = with_tools(plain, tooled)
    assert [(p.task, p.id, p.score) for p in used.problems] == [("compare", "c1", 1.0), ("arithmetic", "a1", 1.0), ("arithmetic", "a2", 1.0)]
    assert used.pass1().mean == 1.0 and plain.pass1().mean == 0.5 and used.config["tools"] == "calculator"
    for name, (p, t) in {"sft": (plain, _result([("arithmetic", "a1", [False, False]), ("arithmetic", "a2", [True, False])], True)),
                         "grpo": (plain, tooled)}.items():
        (tmp_path / name).mkdir()
        p.save(tmp_path / name / "eval.json")
        t.save(tmp_path / name / "tools.json")
    _, _, sections, _ = build_sections(tmp_path)
    text = json.dumps([s.blocks for s in sections if s.title == "Tool use"], default=str)
    assert "as the model is used" in text and "+50.0 pts" in text     # 0.5 -> 1.0 overall with the tool
