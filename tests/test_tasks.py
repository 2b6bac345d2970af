"""Built-in reasoning tasks: generation, split disjointness, determinism, verifiers, extraction."""

import os
import re
import tempfile
from collections import Counter

import pytest

from nanoseek.tasks.generators import (
    TASKS, Problem, corpus_document, countdown_eval, get_task, parse_number, split_of)
from nanoseek.tasks.reply import R1_ZERO_TEMPLATE, extract_answer, format_response, r1_zero_prompt

REQUIRED = {"arithmetic", "countdown", "word_problems"}


def test_registry_and_get_task_error():
    assert REQUIRED <= set(TASKS)
    assert {"compare", "modular", "digit7"} <= set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert task.levels[0] == 1
    with pytest.raises(KeyError) as e:
        get_task("arithmetics")
    for name in TASKS:
        assert name in str(e.value)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_answers_verify_through_every_rendering(name):
    task = TASKS[name]
    for level in task.levels:
        for split in ("train", "test"):
            problems = task.generate(split, 30, seed=3, level=level)
            assert len(problems) == 30
            for p in problems:
                assert p.task == name and p.level == level and p.id.startswith(f"{name}-{split}-L{level}-")
                assert p.prompt and p.answer and p.reasoning
                assert task.verify(p.answer, p), p
                for text in (format_response(p), format_response(p, "r1-zero"), corpus_document(p)):
                    assert task.verify(extract_answer(text), p), (p, text)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_disjoint_by_construction(name):
    task = TASKS[name]
    train = task.generate("train", 2000, seed=0, unique=False)
    test = task.generate("test", 600, seed=0, unique=False)
    hashes = {s: {p.id.rsplit("-", 1)[1] for p in ps} for s, ps in (("train", train), ("test", test))}
    assert not hashes["train"] & hashes["test"]
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    # Another seed draws other problems but the split membership of each stays the same.
    train2 = task.generate("train", 2000, seed=1, unique=False)
    assert not {p.id.rsplit("-", 1)[1] for p in train2} & hashes["test"]


def test_split_is_a_pure_function_with_the_documented_share():
    keys = [f"k{i}" for i in range(20000)]
    share = sum(split_of("arithmetic", k) == "test" for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert [split_of("arithmetic", k) for k in keys[:100]] == [split_of("arithmetic", k) for k in keys[:100]]


def test_word_problem_split_ignores_names():
    # The canonical content is template + numbers: the same sum retold with other names has the
    # same id hash, hence the same split, so a renamed test problem can never be in train.
    task = TASKS["word_problems"]
    by_hash: dict[str, set[str]] = {}
    for p in task.generate("train", 3000, seed=0, level=1, unique=False):
        by_hash.setdefault(p.id.rsplit("-", 1)[1], set()).add(p.prompt)
    renamed = [prompts for prompts in by_hash.values() if len(prompts) > 1]
    assert renamed  # the same problem appeared under different names...
    assert all(len({tuple(re.findall(r"\d+", q)) for q in prompts}) == 1
               for prompts in renamed)  # ...always with the same numbers


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_per_seed(name):
    task = TASKS[name]
    a = task.generate("train", 50, seed=7)
    assert a == task.generate("train", 50, seed=7)
    assert a != task.generate("train", 50, seed=8)
    assert task.generate("test", 20, seed=7, level=1) == task.generate("test", 20, seed=7, level=1)


def test_unique_and_exhaustion():
    task = TASKS["arithmetic"]
    ps = task.generate("train", 150, seed=0, level=1)
    assert len({p.id for p in ps}) == 150
    with pytest.raises(ValueError, match="unique=False"):
        task.generate("test", 100, seed=0, level=1)  # only ~40 single-digit test problems exist
    many = task.generate("test", 100, seed=0, level=1, unique=False)
    assert len(many) == 100 and len({p.id for p in many}) < 100


def test_mixed_levels_equal_shares_and_bad_args():
    task = TASKS["countdown"]
    ps = task.generate("train", 90, seed=0)
    assert Counter(p.level for p in ps) == {1: 30, 2: 30, 3: 30}
    with pytest.raises(ValueError, match="split"):
        task.generate("val", 3)
    with pytest.raises(ValueError, match="level"):
        task.generate("train", 3, level=9)


def test_easy_level_is_easy():
    for p in TASKS["arithmetic"].generate("train", 50, level=1, phrasing="fixed"):
        a, op, b = p.prompt.removeprefix("What is ").rstrip("?").split()
        assert int(b) <= 9 and 0 <= int(p.answer) <= 18
    for p in TASKS["arithmetic"].generate("train", 50, level=1):      # varied: differences below zero too
        a, op, b = p.canonical.split()
        assert int(a) <= 18 and int(b) <= 9 and -9 <= int(p.answer) <= 18
    for p in TASKS["countdown"].generate("train", 50, level=1):
        assert "Using the numbers" in p.prompt and p.answer.count(" ") == 2  # "a op b"


def test_arithmetic_steps():
    p = Problem("arithmetic", "x", "What is 23 + 58 - 17?", "64", "", 3)
    task = get_task("arithmetic")
    for right in ("64", " 64 ", "64.", "\\boxed{64}", "$64$", "64.0", "128/2"):
        assert task.verify(right, p), right
    for wrong in ("65", "-64", "sixty-four", "", "7 or 64", "64 or 7", "\\boxed{}", "9" * 5000,
                  "64abc", "6 4", "64 apples", None, 64, "1e999"):
        assert not task.verify(wrong, p), wrong
    gen = task.generate("train", 40, seed=0, level=4)
    p4 = next(p for p in gen if "*" in p.prompt)
    assert "*" in p4.reasoning.splitlines()[0]  # the product is worked first


def test_countdown_verifier():
    task = get_task("countdown")
    p = Problem("countdown", "x", "Using the numbers 3, 5, 8, make 29. Use + - * / and each number "
                "at most once.", "8 * 3 + 5", "", 2)
    for right in ("8 * 3 + 5", "3*8+5", "5 + (8 * 3)", "8*3+5 = 29", "29 = 5 + 3 * 8",
                  "\\boxed{8 \\times 3 + 5}".replace("\\times", "*"), "8 × 3 + 5", "(8*3+5)"):
        assert task.verify(right, p), right
    wrong = ["8 * 3", "8 * 3 + 5 + 5", "8*3+5 = 30", "29", "(5+8)*3-10", "8/(3-3)+29", "2**5-3",
             "-3 + 32", "0x1D", "8*3+5; import os", "__import__('os').system('true')", "(((",
             "(" * 300 + "8*3+5" + ")" * 300, "", "8 * 3 + 5.0", "1_000", "29 = 29", "a=1"]
    for w in wrong:
        assert not task.verify(w, p), w
    assert countdown_eval("(8 + 5) / 3") == (pytest.approx(13 / 3), [8, 5, 3])
    assert countdown_eval("abs(-29)") == (None, [])


def test_countdown_verifier_never_evaluates_code():
    marker = os.path.join(tempfile.mkdtemp(), "pwned")
    p = TASKS["countdown"].generate("train", 1, seed=0)[0]
    payload = f"__import__('os').system('touch {marker}')"
    assert not TASKS["countdown"].verify(payload, p)
    assert not TASKS["countdown"].verify(f"{payload} = {p.answer}", p)
    assert not os.path.exists(marker)


def test_word_problem_and_extras_verifiers():
    wp = get_task("word_problems")
    p = Problem("word_problems", "x", "Ana has 5 apples. Ana buys 1 more. How many apples does Ana "
                "have now?", "6", "5 + 1 = 6", 1)
    assert wp.verify("6", p) and wp.verify("6 apples", p) and wp.verify("$6", p)
    assert not wp.verify("6 or 7", p) and not wp.verify("7 apples", p) and not wp.verify("apples", p)
    # a hedge whose other guess is in words was read as a unit ("6 or seven" paid)
    for hedge in ("6 or seven", "6 apples or maybe nine", "6 and also eleven", "6 to 7 apples", "6 and a half",
                  "6 OR SEVEN", "6 apples, or perhaps 7"):
        assert not wp.verify(hedge, p), hedge
    assert wp.verify("6 green apples", p) and wp.verify("6 apples in total", p)
    cmp = Problem("compare", "x", "Which is larger, 47 or 52?", "52", "", 1)
    assert get_task("compare").verify("52", cmp)
    assert not get_task("compare").verify("47 or 52", cmp) and not get_task("compare").verify("47", cmp)
    d7 = TASKS["digit7"].generate("test", 5, seed=0)
    assert all(p.answer == "7" and TASKS["digit7"].verify("7", p) for p in d7)
    assert not TASKS["digit7"].verify("77", d7[0])
    mod = Problem("modular", "x", "What is 47 mod 5?", "2", "", 1)
    assert get_task("modular").verify("2", mod) and not get_task("modular").verify("7", mod)


def test_parse_number():
    assert parse_number("1,234") == 1234 and parse_number("-3/4") == parse_number("-0.75")
    assert parse_number("$\\boxed{12}$.") == 12
    assert parse_number("12 km") is None and parse_number("12 km", allow_units=True) == 12
    assert parse_number("1/0") is None and parse_number("1" * 100) is None


@pytest.mark.parametrize("text,expected", [
    ("<think>23 + 58 = 81\n81 - 17 = 64</think>\nAnswer: 64", "64"),
    ("<think>lots of 12 and 13</think> <answer> 64 </answer>", "64"),
    ("<think>x</think><answer>\\boxed{5}</answer>", "\\boxed{5}"),
    ("so the result is \\boxed{\\frac{1}{2}} indeed", "\\frac{1}{2}"),
    ("The answer is 42.", "42"),
    ("final answer: 8 * 3 + 5", "8 * 3 + 5"),
    ("<think>81</think>\n8 * 3 + 5", "8 * 3 + 5"),
    ("<think>81</think>\n7 or 8", "7 or 8"),
    ("we get 3 then\nwe get 12\nand finally 40 ok", "40"),
    ("<think>the answer is 64</think>", None),
    ("<think>64</think>\n\\boxed{}", None),
    ("no numbers here at all, just a long line of words that goes on and on and on forever\n more", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_renderings():
    p = TASKS["arithmetic"].generate("train", 1, seed=0, level=3)[0]
    doc = corpus_document(p)
    assert doc.startswith(f"Question: {p.prompt}\n") and doc.endswith(f"Answer: {p.answer}\n")
    assert p.reasoning in doc
    assert format_response(p) == f"<think>\n{p.reasoning}\n</think>\nAnswer: {p.answer}"
    assert format_response(p, "r1-zero").endswith(f"<answer>{p.answer}</answer>")
    with pytest.raises(ValueError):
        format_response(p, "chatml")
    prompt = r1_zero_prompt(p)
    assert prompt.startswith(R1_ZERO_TEMPLATE.split("{prompt}")[0]) and prompt.endswith(f"User: {p.prompt} Assistant:")
    assert r1_zero_prompt("Say hi").endswith("User: Say hi. Assistant:")


def test_problem_dict_roundtrip():
    p = TASKS["modular"].generate("train", 1)[0]
    assert Problem.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="reasoning"):
        Problem.from_dict({k: v for k, v in p.to_dict().items() if k != "reasoning"})


def test_mixed_levels_fill_in_for_an_exhausted_level():
    # arithmetic L1 has only ~41 distinct test problems; a mixed-level draw of 400 must not fail,
    # must stay distinct, and must take the rest from the other levels.
    probs = get_task("arithmetic").generate("test", 400, seed=3)
    assert len(probs) == 400 and len({p.id for p in probs}) == 400
    by_level = {lv: sum(p.level == lv for p in probs) for lv in (1, 2, 3, 4)}
    assert by_level[1] < 60 and all(by_level[lv] >= 100 for lv in (2, 3, 4))
    with pytest.raises(ValueError, match="exhausted"):
        get_task("arithmetic").generate("test", 400, seed=3, level=1)
