"""Tool tasks and tool-using SFT traces: the big_arithmetic task, Task.tool_call, the ideal reply made with
the real calculator, which problems get tools (ToolUse), the prompt that describes the tools, SFT data and
its masks on a tool trace (the tool's output never trained)."""

from __future__ import annotations

import json

import pytest

from nanoseek.post.datasets import DataError, parse_sft
from nanoseek.tasks.generators import TASKS, get_task
from nanoseek.tasks.reply import encode_chat_tools, extract_answer, render_prompt, tool_sft_messages
from nanoseek.tasks.tool_use import ToolUse
from nanoseek.tools.calculator import evaluate
from nanoseek.tools.format import TOOLS_HEADER, ToolCall
from nanoseek.tools.toolbox import Toolbox
from post_helpers import tiny_tokenizer, tool_tokenizer

CALC = Toolbox.builtin("calculator")


def _tool_tasks():
    return [name for name in sorted(TASKS) if ToolUse("calculator").applies(name)]


def test_tool_tasks_are_the_ones_with_a_tool_call():
    assert set(_tool_tasks()) == {"arithmetic", "big_arithmetic"}
    for name in sorted(set(TASKS) - set(_tool_tasks())):
        p = get_task(name).generate("train", 1, seed=0)[0]
        assert get_task(name).tool_call(p) is None and tool_sft_messages(p, CALC) is None


@pytest.mark.parametrize("name", ["arithmetic", "big_arithmetic"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_level_trace_calls_the_real_tool_and_answers_its_output(name, split):
    """For every level: the call's expression evaluates to the gold answer, the tool message holds the
    calculator's real output, the final answer verifies; the user turn is the question alone."""
    task = get_task(name)
    for level in task.levels:
        for p in task.generate(split, 30, seed=3, level=level, allow_fewer=True):
            msgs = tool_sft_messages(p, CALC)
            assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
            [call] = msgs[1]["tool_calls"]
            args = json.loads(call["function"]["arguments"])
            assert call["function"]["name"] == "calculator" and set(args) == {"expression"}
            assert str(evaluate(args["expression"])) == p.answer               # the call computes the answer
            assert msgs[2]["content"] == CALC.run(ToolCall("calculator", call["function"]["arguments"])).output
            assert msgs[2]["tool_call_id"] == call["id"]
            answer = extract_answer(msgs[3]["content"])
            assert answer == p.answer and task.verify(answer, p)
            assert msgs[0] == {"role": "user", "content": p.prompt}


def test_big_arithmetic_is_beyond_head_math_and_disjoint_by_split():
    t = get_task("big_arithmetic")
    train = {p.canonical for p in t.generate("train", 300, seed=0)}
    test = t.generate("test", 300, seed=0)
    assert not train & {p.canonical for p in test}
    for p in test:                      # L1 sums of 4-5 digits, L2 3x2-digit products, L3 3x3 + 4 digits
        assert int(p.answer) >= 1000 and str(evaluate(p.canonical)) == p.answer
        assert t.tool_call(p) == ("calculator", {"expression": p.canonical})     # whatever the wording
    assert {p.level for p in test} == {1, 2, 3}


def test_a_wrong_tool_output_is_refused_not_trained():
    """A trace is only written when the real tool's output is the gold answer."""
    p = get_task("big_arithmetic").generate("train", 1, seed=0)[0]
    box = Toolbox().register(lambda expression: "41", name="calculator")
    with pytest.raises(ValueError, match="not"):
        tool_sft_messages(p, box)
    assert tool_sft_messages(p, Toolbox()) is None           # the task's tool is not in the box


def test_tool_use_settings_are_checked_and_select_tasks():
    assert not ToolUse().enabled and ToolUse().specs_for("big_arithmetic") is None
    use = ToolUse.of("calculator", "big_arithmetic")
    assert use.applies("big_arithmetic") and not use.applies("arithmetic") and not use.applies("compare")
    assert use.specs_for("big_arithmetic")[0]["function"]["name"] == "calculator"
    assert ToolUse.of(["calculator"], None).applies("arithmetic")
    with pytest.raises(ValueError, match="unknown built-in tool 'abacus'"):
        ToolUse.of("abacus")
    with pytest.raises(ValueError, match="unknown task 'algebra'"):
        ToolUse.of("calculator", "algebra")
    with pytest.raises(ValueError, match="no tools are on"):
        ToolUse.of("", "big_arithmetic")


@pytest.mark.parametrize("template", ["chat", "chat-think"])
def test_the_prompt_describes_the_tools_only_when_given(template):
    tk = tool_tokenizer()
    p = get_task("big_arithmetic").generate("test", 1, seed=0)[0]
    plain = tk.decode(render_prompt(tk, p, template))
    tooled = tk.decode(render_prompt(tk, p, template, tools=CALC.openai_tools()))
    assert TOOLS_HEADER.strip() not in plain and TOOLS_HEADER.strip() in tooled
    assert '"expression"' in tooled and p.prompt in tooled
    assert tooled.endswith(plain[len(tk.decode([tk.bos_id])):])           # same question and generation prompt
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(tk, p, "r1-zero", tools=CALC.openai_tools())


def test_sft_records_with_tools_are_validated():
    good = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "4"},
                         {"role": "assistant", "content": "Answer: 4"}],
            "tools": CALC.openai_tools()}
    ex = parse_sft("f:1", good)
    assert ex.tools == CALC.openai_tools() and ex.messages[1]["content"] == ""
    bad = [({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools\\[0\\].function.name"),
           ({"messages": [{"role": "user", "content": "q", "tool_calls": []}]}, "only assistant messages may call"),
           ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "x"}}]}]},
            "arguments"),
           ({"messages": [{"role": "user", "content": "q", "tool_call_id": "c"}]}, "tool_call_id")]
    for patch, match in bad:
        with pytest.raises(DataError, match=match):
            parse_sft("f:2", {**good, **patch})


def _template_takes_tool_messages(tk) -> bool:
    from nanoseek.data.chat_template import TokenizerError

    try:
        tk.encode_chat([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c", "content": "4"}])
        return True
    except TokenizerError:
        return False


@pytest.mark.parametrize("name", ["big_arithmetic", "arithmetic"])
def test_sft_mask_on_a_tool_trace_trains_the_call_and_answer_never_the_output(name):
    """The chat template's mask on the generated trace: the call block and the final answer are targets,
    the tool's output tokens (and the prompt with the tools' description) never are."""
    from nanoseek.post.common import IGNORE, chat_row
    from nanoseek.post.sft import task_sft_examples
    from nanoseek.tools.format import ToolTokens

    tk = tool_tokenizer()
    if not _template_takes_tool_messages(tk):
        pytest.skip("this chat template has no tool messages yet (the tool-use template lands with issue 20)")
    t = ToolTokens.of(tk)
    examples = task_sft_examples(name, 6, seed=1, tool_use=ToolUse.of("calculator"))
    for ex in examples:
        assert ex.tools and ex.messages[2]["role"] == "tool"
        ids, labels, _ = chat_row(tk, ex.messages, tools=ex.tools)
        trained = [ids[i + 1] for i, lab in enumerate(labels) if lab != IGNORE]
        begin, end = ids.index(t.output_begin), ids.index(t.output_end)
        assert all(labels[i - 1] == IGNORE for i in range(begin, end + 1))     # the output is never a target
        assert t.calls_begin in trained and t.calls_end in trained                # the call is
        output = ex.messages[2]["content"]
        assert tk.decode(ids[begin + 1:end]) == output
        answer = tk.decode([x for x in trained if x not in t.ids], skip_special_tokens=True)
        assert answer.endswith(f"Answer: {output}") and '"expression"' in answer
        assert TOOLS_HEADER.strip() in tk.decode(ids)


def test_sft_section_tools_need_chat_traces_and_known_names():
    from nanoseek.post.sft import SFTSection

    with pytest.raises(ValueError, match="r1-zero"):
        SFTSection(data="tasks:big_arithmetic", num_examples=4, template="r1-zero", tools="calculator").validate()
    with pytest.raises(ValueError, match="abacus"):
        SFTSection(data="tasks:big_arithmetic", num_examples=4, tools="abacus").validate()


def test_tools_kwarg_falls_back_to_a_system_message_on_templates_without_tools():
    """encode_chat_tools works on a template that refuses ``tools=`` (a system turn with the same text)
    and on one that takes it; either way the description is in the prompt and the user turn is intact."""
    for tk in (tiny_tokenizer(), tool_tokenizer()):
        ids, mask = encode_chat_tools(tk, [{"role": "user", "content": "What is 2 + 2?"}], CALC.openai_tools(),
                                      add_generation_prompt=True)
        text = tk.decode(ids)
        assert TOOLS_HEADER.strip() in text and "What is 2 + 2?" in text and not any(mask)


def test_tool_traces_with_a_tokenizer_without_tool_tokens_are_refused():
    from nanoseek.post.sft import task_sft_examples, tokenize_examples
    from post_helpers import WithoutToolTokens

    examples = task_sft_examples("big_arithmetic", 2, tool_use=ToolUse.of("calculator"))
    with pytest.raises(DataError, match="cannot call tools"):
        tokenize_examples(WithoutToolTokens(tool_tokenizer()), examples, 256)


def test_corpus_writes_tool_tasks_as_their_call_and_nothing_after_it():
    """Pre-training text of a tool task (``tool_tasks``): the SFT trace's reasoning and the call as the
    chat writes it between the tool-call tokens (name + JSON arguments: the question's operands
    copied, the expression the real tool evaluates to the gold answer), then the document ends: the
    tool's output is never a pre-training target, and neither is an answer only the tool can give;
    other tasks keep their worked steps, and without ``tool_tasks`` nothing changes."""
    from nanoseek.data.corpus import task_documents
    from nanoseek.tasks.generators import corpus_document

    specs = ("big_arithmetic:1-2", "arithmetic:1-2")
    plain = list(task_documents(40, tasks=specs))
    tooled = list(task_documents(40, tasks=specs, tool_tasks=("big_arithmetic",)))
    assert [d.origin for d in plain] == [d.origin for d in tooled]
    n_tool = 0
    for d, t in zip(plain, tooled):
        if not d.origin.startswith("task:big_arithmetic"):
            assert d.text == t.text
            continue
        n_tool += 1
        question, _, rest = t.text.partition("\nSolution:\n")
        reasoning, call, end = rest.split("\n")
        assert reasoning == "This needs the calculator tool." and end == ""
        assert call.startswith("calculator{") and "Answer" not in t.text
        expr = json.loads(call[len("calculator"):])["expression"]
        gold = d.text.rsplit("Answer: ", 1)[1].strip()
        assert str(evaluate(expr)) == gold and gold not in rest  # the call the tool answers; its output not written
        assert all(tok in question.replace(",", "") for tok in expr.split() if tok.isdigit())   # operands copied
        assert t.text != d.text
    assert n_tool == 20
    p = get_task("compare").generate("train", 1, seed=0)[0]
    assert corpus_document(p, with_tool=True) == corpus_document(p)     # no tool call: worked steps


def test_a_share_of_a_task_calls_and_the_draw_is_fixed_per_problem():
    """``NAME=SHARE``: the task gets the tools (prompts, rollouts, evaluation) and that share of its
    problems' cold-start traces call them; the draw depends on the problem only, never on the process."""
    from nanoseek.post.sft import task_sft_examples

    use = ToolUse.of("calculator", "big_arithmetic,arithmetic=0.3")
    assert use.task_names == ["big_arithmetic", "arithmetic"] and dict(use.task_shares) == {"big_arithmetic": 1.0, "arithmetic": 0.3}
    assert use.applies("arithmetic") and not use.applies("compare")
    problems = get_task("arithmetic").generate("train", 2000, seed=4)
    drawn = [use.calls(p) for p in problems]
    assert 0.26 < sum(drawn) / len(drawn) < 0.34
    assert drawn == [ToolUse.of("calculator", "arithmetic=0.3").calls(p) for p in problems]
    assert all(use.calls(p) for p in get_task("big_arithmetic").generate("train", 50, seed=4))
    examples = task_sft_examples("arithmetic:1-2", 400, seed=2, tool_use=use)
    tooled = [e for e in examples if e.messages[1].get("tool_calls")]
    assert 0.2 < len(tooled) / len(examples) < 0.4
    assert all(e.messages[-1]["content"] == f"Answer: {e.messages[2]['content']}" for e in tooled)
    for bad in ("arithmetic=0", "arithmetic=2", "arithmetic=x", "arithmetic=nan", "arithmetic="):
        with pytest.raises(ValueError, match="the share after '=' must be"):
            ToolUse.of("calculator", bad)
    with pytest.raises(ValueError, match="'arithmetic' is named twice with different shares"):
        ToolUse.of("calculator", "arithmetic=0.5,arithmetic")
