"""Rewards: the R1 format, the format x accuracy combination, math-verify (also off the main
thread), task dispatch, code rewards through the sandbox, and batch scoring."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.tasks.generators import TASKS, Problem
from nanoseek.tasks.reply import check_format, format_response
from nanoseek.tasks.rewards import (
    RewardConfig, build_reward_fn, extract_code, math_correct, record_kind, score, score_batch, score_external)

ARITH = Problem("arithmetic", "arithmetic-test-L3-x", "What is 23 + 58 - 17?", "64",
                "23 + 58 = 81\n81 - 17 = 64", 3)


@pytest.mark.parametrize("response,ok", [
    ("<think>23 + 58 = 81</think>\n64", True),
    ("  \n<think>steps</think>Answer: 64", True),
    ("<think>steps</think> <answer>64</answer>", True),
    ("<think></think>64", True),                       # empty thinking is allowed by default
    ("<think>steps</think>\n<answer>64</answer>\n", True),
    ("64", False),                                     # no think block
    ("Sure! <think>steps</think>64", False),           # text before <think>
    ("<think>a</think><think>b</think>64", False),     # two think blocks
    ("<think>steps</think>", False),                   # no answer
    ("<think>steps</think>  \n ", False),
    ("<think>steps 64", False),                        # unclosed
    ("</think><think>64", False),
    ("<think>steps</think><answer></answer>", False),  # empty answer tags
    ("<think>steps</think><answer>64", False),         # unclosed answer
    ("<think>steps</think><answer>64</answer> and more", False),
    ("<think>steps</think><answer>6</answer><answer>4</answer>", False),
    (None, False),
])
def test_check_format_r1(response, ok):
    assert check_format(response)[0] is ok, check_format(response)


def test_check_format_options():
    assert not check_format("<think>x</think>64", template="r1-zero")[0]
    assert check_format("<think>x</think><answer>64</answer>", template="r1-zero")[0]
    assert check_format("steps</think>64", think_prefilled=True)[0]
    assert not check_format("<think>steps</think>64", think_prefilled=True)[0]  # two <think>
    assert not check_format("<think>ab</think>64", min_think_chars=5)[0]
    assert check_format("<think>a b c d e</think>64", min_think_chars=5)[0]
    with pytest.raises(ValueError):
        RewardConfig(template="chatml")


def test_reward_combination_gates_accuracy_on_format():
    good = score("<think>23 + 58 = 81\n81 - 17 = 64</think>\nAnswer: 64", ARITH)
    assert good.format_ok and good.correct and good.reward == pytest.approx(1.1) and good.answer == "64"
    wrong = score("<think>guess</think>\n65", ARITH)
    assert wrong.format_ok and not wrong.correct and wrong.reward == pytest.approx(0.1)
    unformatted = score("Answer: 64", ARITH)
    assert not unformatted.format_ok and unformatted.correct and unformatted.reward == 0.0
    hedge = score("<think>x</think>\n7 or 64", ARITH)
    assert hedge.format_ok and not hedge.correct and hedge.reward == pytest.approx(0.1)
    empty_box = score("<think>x</think>\\boxed{}", ARITH)
    assert not empty_box.correct and empty_box.answer is None
    cfg = RewardConfig(accuracy_weight=2.0, format_weight=0.0)
    assert score("<think>x</think><answer>64</answer>", ARITH, cfg).reward == 2.0
    assert score("<think>x</think>65", ARITH, cfg).reward == 0.0
    assert score(None, ARITH).reward == 0.0 and not score(12345, ARITH).correct


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_dispatch_rewards_gold_responses(name):
    for p in TASKS[name].generate("test", 5, seed=1):
        for template in ("r1", "r1-zero"):
            r = score(format_response(p, template), p)
            assert r.format_ok and r.correct and r.info["kind"] == "task", (p, r)
        assert score(format_response(p), p.to_dict()).correct  # the dict form of a Problem too


def test_countdown_reward_accepts_other_solutions_and_rejects_code():
    p = Problem("countdown", "c", "Using the numbers 3, 5, 8, make 29. Use + - * / and each "
                "number at most once.", "8 * 3 + 5", "", 2)
    assert score("<think>3*8=24, 24+5=29</think>\n5 + 3 * 8", p).reward == pytest.approx(1.1)
    assert score("<think>x</think>\n__import__('os').system('true')", p).reward == pytest.approx(0.1)


def test_math_verify_records():
    rec = {"answer": "\\frac{1}{2}"}
    assert record_kind(rec) == "math"
    for right in ("<think>x</think>\\boxed{\\frac12}", "<think>x</think>0.5",
                  "<think>x</think><answer>1/2</answer>", "<think>x</think>The answer is $\\frac{2}{4}$."):
        r = score(right, rec)
        assert r.correct and r.reward == pytest.approx(1.1), (right, r)
    for wrong in ("<think>x</think>\\boxed{}", "<think>x</think>0.25", "<think>x</think>1/2 or 1/3",
                  "<think>x</think>\\boxed{\\frac{", "<think>the answer is 1/2</think>", "<think>x</think>" + "9" * 400):
        r = score(wrong, rec)
        assert not r.correct and r.reward <= 0.1 + 1e-9, (wrong, r)
    assert math_correct("x = 5", "5") and math_correct("\\sqrt{25}", "5")
    assert not math_correct(None, "5") and not math_correct("", "5")


def test_math_verify_huge_answers_are_refused_quickly():
    t = time.monotonic()
    for evil in ("2^{10^{10}}", "10**10**10", "99999!", "2^{2^{2^{2^{5}}}}"):
        assert not math_correct(evil, "5")
    assert time.monotonic() - t < 2


def test_math_verify_works_in_worker_threads():
    results, errors = [], []

    def work():
        try:
            assert threading.current_thread() is not threading.main_thread()
            results.append(math_correct("\\frac{2}{4}", "0.5"))
            results.append(math_correct("0.4", "0.5"))
            results.append(score("<think>x</think>\\boxed{3}", {"answer": "3"}).correct)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert not errors and results == [True, False, True]
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda k: math_correct(f"{k}/2", str(k / 2)), range(1, 9)))
    assert out == [True] * 8


CODE_REC = {"prompt": "Read two integers and print their sum.",
            "tests": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 -4\n", "stdout": "6"}]}
GOOD_CODE = "<think>read, add</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def test_extract_code():
    assert extract_code(GOOD_CODE).startswith("a, b = map")
    two = "```\nprint(0)\n```\n```python\nprint(1)\n```\n```py\nprint(2)\n```"
    assert extract_code(two) == "print(2)\n"
    assert extract_code("```\nprint(0)\n```") == "print(0)\n"
    assert extract_code("<think>```python\nprint(1)\n```</think>no code") is None
    assert extract_code("print(1)") is None and extract_code(None) is None


def test_code_reward_io_tests():
    r = score(GOOD_CODE, CODE_REC)
    assert r.correct and r.reward == pytest.approx(1.1) and r.info["tests_passed"] == 2
    half = "<think>x</think>\n```python\nprint(3)\n```"
    r = score(half, CODE_REC)
    assert r.info["accuracy"] == 0.5 and r.reward == pytest.approx(0.6) and not r.correct
    r = score(half, CODE_REC, RewardConfig(code_all_or_nothing=True))
    assert r.info["accuracy"] == 0.0 and r.reward == pytest.approx(0.1)
    r = score("<think>x</think>\nno code here", CODE_REC)
    assert r.answer is None and r.reward == pytest.approx(0.1) and r.info["tests_total"] == 2


def test_code_reward_asserts_and_hostile_code():
    rec = {"tests": ["assert add(2, 3) == 5", {"assert": "assert add(-1, 1) == 0"}]}
    ok = "<think>x</think>```python\ndef add(a, b):\n    return a + b\n```"
    assert score(ok, rec).reward == pytest.approx(1.1)
    t = time.monotonic()
    loop = "<think>x</think>```python\nwhile True:\n    pass\n```"
    r = score(loop, rec, RewardConfig(code_timeout_s=0.5, code_all_or_nothing=True))
    assert r.reward == pytest.approx(0.1) and r.info["tests"][0]["killed_reason"] == "timeout"
    assert time.monotonic() - t < 5
    with pytest.raises(ValueError, match="test #0"):
        score(ok, {"tests": [42]})


def test_score_batch_order_broadcast_and_errors():
    responses = ["<think>x</think>64", "<think>x</think>65", "64", "<think>x</think><answer>64</answer>"]
    got = score_batch(responses, ARITH, max_workers=3)
    assert [r.reward for r in got] == pytest.approx([1.1, 0.1, 0.0, 1.1])
    mixed = score_batch([GOOD_CODE, "<think>x</think>\\boxed{0.5}"], [CODE_REC, {"answer": "1/2"}])
    assert [r.correct for r in mixed] == [True, True]
    with pytest.raises(ValueError, match="2 responses but 3"):
        score_batch(["a", "b"], [ARITH] * 3)
    with pytest.raises(ValueError, match="keys"):
        score("x", {"question": "?"})


def test_math_verify_leaves_other_alarms_alone():
    import signal
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        assert math_correct("\\frac{1}{2}", "0.5")
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # our timer was not cancelled
        time.sleep(0.6)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_record_kinds():
    assert record_kind(ARITH) == "task" and record_kind(ARITH.to_dict()) == "task"
    assert record_kind({"answer": "3"}) == "math" and record_kind({"tests": ["assert True"]}) == "code"
    with pytest.raises(ValueError, match="reasoning"):  # a task record missing fields is not "math"
        score("<think>x</think>64", {"task": "arithmetic", "answer": "64", "prompt": "?"})
    with pytest.raises(ValueError, match="non-empty 'tests'"):
        score("<think>x</think>no code", {"tests": []})
    assert score("<think>x</think>64", ARITH, kind="math").correct  # explicit kind override


def test_code_reward_humaneval_and_mbpp_forms():
    # HumanEval: a check(candidate) with METADATA and `assert True, msg`; MBPP: bare asserts
    he = ("METADATA = {'author': 'jt', 'dataset': 'test'}\n\ndef check(candidate):\n"
          "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
          "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
          "    assert True, 'This prints if this assert fails 1 (good for debugging!)'\n\ncheck(has_close_elements)\n")
    mbpp = ["import math\nassert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)",
            "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65]",
            "assert remove_Occ(\"hello\",\"l\") == \"heo\""]
    good = ("import math, heapq\nfrom typing import List\n"
            "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
            "    return any(i != j and abs(a - b) < threshold for i, a in enumerate(numbers) for j, b in enumerate(numbers))\n"
            "def volume_sphere(r):\n    return 4 / 3 * math.pi * r ** 3\n"
            "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
            "def heap_queue_largest(nums, n):\n    return heapq.nlargest(n, nums)\n"
            "def remove_Occ(s, ch):\n    return s.replace(ch, '')\n")
    r = score(f"<think>x</think>\n```python\n{good}```", {"tests": [he] + mbpp})
    assert r.reward == pytest.approx(1.1), r.info["tests"]
    with pytest.raises(ValueError, match="no assert that depends on the code"):
        score("<think>x</think>\n```python\nx = 1\n```", {"tests": ["assert True\nf(1)"]})


def test_reward_config_for_each_template():
    assert RewardConfig.for_template("r1-zero") == RewardConfig(template="r1-zero")
    assert RewardConfig.for_template("chat") == RewardConfig()
    assert RewardConfig.for_template("chat-think", format_weight=0.5) == RewardConfig(think_prefilled=True,
                                                                                      format_weight=0.5)


def test_build_reward_fn_scores_built_in_math_and_external_prompts_in_order():
    from nanoseek.post.datasets import RLPrompt

    cfg = RewardConfig.for_template("r1-zero", accuracy_weight=2.0, format_weight=0.5)
    task = RLPrompt(prompt=ARITH.prompt, answer="64", task="arithmetic", problem=ARITH)
    math = RLPrompt(prompt="1/2 + 1/2?", answer="1", task="math")
    ext = RLPrompt(prompt="q", answer="4", task="rg:x", score_answer=lambda a: 0.5 if a == "4" else 0.0)
    texts = ["<think>x</think><answer>64</answer>", "<think>x</think>\n<answer>1</answer>",
             "<think>x</think><answer>4</answer>", "<think>x</think>64"]
    items = [task, math, ext, task]
    for workers in (1, 4):
        got = build_reward_fn(cfg, workers)(texts, items)
        assert [r.reward for r in got] == pytest.approx([2.5, 2.5, 0.5, 0.0])   # 0.5 from score_answer pays nothing
        assert [r.correct for r in got] == [True, True, False, True]      # ...and is not correct
        assert [r.format_ok for r in got] == [True, True, True, False]    # r1-zero needs <answer> tags
        assert got[2].answer == "4" and got[2].info == {"format_reason": "ok (r1-zero)", "score": 0.5}
    assert score_external("4", lambda a: 1.0).reward == 0.0           # the format gates outside verifiers too
