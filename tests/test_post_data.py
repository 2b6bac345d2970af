"""Post-training data formats: valid records load; every malformed one names file:line and the field."""

import json
import sys
import types

import pytest

from nanoseek.cli import UserError
from nanoseek.post.datasets import (DataError, load_rl_prompts, read_preferences, read_rl_prompts,
                                    read_sft, write_jsonl)


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


GOOD_SFT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", "reasoning": "2 + 2 = 4"}], "id": "a"}


def test_sft_reads_valid_records_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path, [GOOD_SFT, "", GOOD_SFT])
    ex = read_sft(p)
    assert len(ex) == 2 and ex[0].messages[2]["reasoning"] == "2 + 2 = 4" and ex[0].meta == {"id": "a"}
    assert ex[1].where == f"{p}:3"


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "invalid JSON at column"),
    ("[1, 2]", "expected a JSON object"),
    ({"msgs": []}, "unknown key(s) ['msgs']"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role: unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "messages[0]: missing field 'content'"),
    ({"messages": [{"role": "assistant", "content": 5}]}, "messages[0].content: must be a string"),
    ({"messages": [{"role": "user", "content": "q", "reasoning": "r"}]}, "only assistant messages may carry reasoning"),
    ({"messages": [{"role": "assistant", "content": "a", "contnet": "x"}]}, "unknown key(s) ['contnet']"),
])
def test_sft_errors_name_file_and_line(tmp_path, bad, needle):
    p = _write(tmp_path, [GOOD_SFT, GOOD_SFT, bad])
    with pytest.raises(DataError) as e:
        read_sft(p)
    assert str(e.value).startswith(f"{p}:3: ") and needle in str(e.value)
    assert isinstance(e.value, UserError)  # the CLI prints it as one line, exit status 2


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        read_sft(_write(tmp_path, [""]))


def test_preferences(tmp_path):
    p = _write(tmp_path, [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hello",
                                                                     "reasoning": "greet"}, "rejected": "go away"},
    ])
    pairs = read_preferences(p)
    assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert pairs[0].chosen == {"role": "assistant", "content": "4"}
    assert pairs[1].chosen["reasoning"] == "greet"


@pytest.mark.parametrize("bad,needle", [
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt'"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "exactly one of"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "a"}, "'chosen' must be a string or an assistant message"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "must be an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "must end with a user message"),
])
def test_preference_errors(tmp_path, bad, needle):
    p = _write(tmp_path, [bad])
    with pytest.raises(DataError) as e:
        read_preferences(p)
    assert str(e.value).startswith(f"{p}:1: ") and needle in str(e.value)


def test_rl_prompts_file_and_errors(tmp_path):
    p = _write(tmp_path, [{"prompt": "1+1?", "answer": 2, "task": "math", "id": "x"},
                          {"prompt": "add", "answer": "3", "task": "code", "tests": ["assert f() == 3"]},
                          {"prompt": "What is 3 + 4?", "answer": "7", "task": "arithmetic"}])
    items = read_rl_prompts(p)
    assert items[0].answer == "2" and items[0].id == "x"
    assert items[1].record()["tests"] == ["assert f() == 3"]          # extra keys kept for the verifier
    assert items[1].id == f"{p}:2"
    from nanoseek.tasks.rewards import score
    assert score("<think>3 + 4</think>\n7", items[2].record()).correct   # a built-in task's exact checker
    assert score("<think>1 + 1</think>\n2", items[0].record()).correct   # math-verify
    for bad, needle in [({"prompt": "q", "answer": "1"}, "missing field 'task'"),
                        ({"prompt": "q", "answer": "1", "task": "algebra"}, "unknown task 'algebra'"),
                        ({"prompt": "q", "answer": "1", "task": "code"}, "needs a non-empty 'tests' list"),
                        ({"prompt": "q", "answer": "1", "task": "code", "tests": ["print(f())"]},
                         "code test #0: assertion test has no assert statement"),
                        ({"prompt": "q", "answer": "1", "task": "code", "tests": ["assert f() == 3", "assert ("]},
                         "code test #1: assertion test does not parse"),
                        ({"prompt": "q", "answer": "1", "task": "code", "tests": ["if 0:\n    assert f()"]},
                         "code test #0: assertion test has no assert that must run"),
                        ({"prompt": "q", "answer": "1", "task": "code", "tests": [{"stdin": "1"}]},
                         "code test #0 must be an assertion string"),
                        ({"prompt": "", "answer": "1", "task": "math"}, "'prompt' must be a non-empty string"),
                        ({"prompt": "q", "answer": [1], "task": "math"}, "'answer' must be a string or a number")]:
        with pytest.raises(DataError) as e:
            read_rl_prompts(_write(tmp_path, [{"prompt": "q", "answer": 1, "task": "math"}, bad]))
        assert ":2: " in str(e.value) and needle in str(e.value)


def test_rl_prompts_from_builtin_tasks():
    items = load_rl_prompts("arithmetic,digit7", 10, seed=3)
    assert len(items) == 10
    assert sorted({i.task for i in items}) == ["arithmetic", "digit7"]
    assert all(i.problem is not None and i.record() is i.problem for i in items)
    assert [i.id for i in items] == [i.id for i in load_rl_prompts("arithmetic,digit7", 10, seed=3)]
    with pytest.raises(DataError, match="unknown task"):
        load_rl_prompts("nope", 2)


def test_rl_prompts_from_file_via_load(tmp_path):
    p = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"q{i}", "answer": i, "task": "math"} for i in range(5)])
    assert [x.prompt for x in load_rl_prompts(str(p), 3)] == ["q0", "q1", "q2"]
    assert len(load_rl_prompts(str(p), 0)) == 5


def test_reasoning_gym_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(DataError, match=r"a dependency of nanoseek \(pip install reasoning-gym\)"):
        load_rl_prompts("rg:leg_counting", 3)


def test_rl_prompt_weights_set_each_sources_share():
    """``weights`` ("NAME=W"): a source's share of the pool relative to the others' 1; equal weights
    give the old equal split; bad items and names are one DataError line; a file takes none."""
    from collections import Counter

    from nanoseek.post.datasets import DataError, check_prompt_weights, load_rl_prompts, weighted_shares

    assert weighted_shares(4096, list("abcde"), {}) == [820, 819, 819, 819, 819]      # n // k, the first n % k one more
    assert weighted_shares(4096, list("abcde"), {"e": 0.25}) == [964, 964, 964, 963, 241]
    assert weighted_shares(10, ["a", "b"], {"a": 3}) == [8, 2] and weighted_shares(0, ["a"], {}) == [0]
    for n in (1, 7, 101):
        assert sum(weighted_shares(n, list("abc"), {"b": 0.3, "c": 2.5})) == n
    equal = load_rl_prompts("compare:1,arithmetic:1", 40, seed=1)
    assert load_rl_prompts("compare:1,arithmetic:1", 40, seed=1, weights="compare=1") == equal
    got = Counter(p.task for p in load_rl_prompts("compare:1,arithmetic:1,big_arithmetic:1", 90, seed=1,
                                                  weights="big_arithmetic=0.25"))
    assert got == {"compare": 40, "arithmetic": 40, "big_arithmetic": 10}
    for bad, match in (("abacus=1", "'abacus' is not one of the prompt sources"), ("compare=0", "weight > 0"),
                       ("compare", "weight > 0"), ("compare=x", "weight > 0"), ("compare=inf", "weight > 0")):
        with pytest.raises(DataError, match=match):
            load_rl_prompts("compare:1,arithmetic:1", 10, weights=bad)
    with pytest.raises(DataError, match="weighs task specs, not the prompt file"):
        check_prompt_weights(__file__.replace(".py", ".jsonl"), "compare=2")


def test_grpo_section_checks_its_prompt_weights_before_any_model():
    from nanoseek.post.datasets import DataError
    from nanoseek.post.grpo import GRPOSection

    GRPOSection(prompts="arithmetic,big_arithmetic", prompt_weights="big_arithmetic=0.25").check_sources()
    with pytest.raises(DataError, match=r"^prompt_weights: 'modular' is not one of the prompt sources"):
        GRPOSection(prompts="arithmetic,big_arithmetic", prompt_weights="modular=2").check_sources()
