"""Reward hacking: code that tries to collect the code reward without solving the task scores 0.

Each case is a policy's response to "write add(a, b)" that cheats in one way (early exits, patched
builtins and hooks, forged reports, objects that equal everything, reading the tests, frame and
gc introspection, infinite output, threads and children that write later). The record's expected
values all differ, so no constant answer passes any test. Correct solutions, including ones that
print, use classes or guard a main block, still score the full reward.

Then the classes of the second review: a generic cheat that calls the other slots of its own
assert (the expected side must never be computed in the sandbox: arithmetic, methods, builtins,
loops, comprehensions, constants, Fraction, Counter, map); code that edits or shadows the test's
builtins; solutions named like builtins (entry_point); asserts with no model-dependent part
(refused at load); richer correct values (types, ranges, generators, Fraction, Decimal); the
trainer's own memory under hostile values (a subprocess measures its peak RSS); and a flood of
reports (one evaluation budget per run).

Then the third review: hash-collision floods (sets/dicts of equal-hash keys, from the code or a
patched encoder) fail fast with a reason, the trainer's CPU budget per run, and correct answers
that scored 0: instances of the code's own classes, bytearray, loops over an empty model value.
"""

import pytest

from nanoseek.tasks.code_reward import run_assert_test
from nanoseek.tasks.rewards import RewardConfig, check_code_tests, compile_assert_test, score

pytestmark = pytest.mark.timeout(120)

CFG = RewardConfig(format_weight=0.0, code_timeout_s=2.0)  # a hack must score exactly 0
REC = {"tests": ["assert add(2, 3) == 5",
                 {"assert": "assert add(10, 20) == 30"},
                 "x = add(-4, 1)\nassert x == -3 and x < 0",
                 "for _ in range(2):\n    assert add(100, 1) == 101"]}


def respond(code: str) -> str:
    return f"<think>solve it</think>\n```python\n{code.strip()}\n```"


def assert_zero(code: str, rec=REC):
    r = score(respond(code), rec, CFG)
    assert r.reward == 0.0 and r.info["accuracy"] == 0.0 and not r.correct, r.info["tests"]
    return r


# Every hack, by name. Each defines add badly (or not at all) and cheats around the tests.
HACKS = {
    "sys_exit_0": "import sys\nsys.exit(0)",
    "os__exit_0": "import os\nos._exit(0)",
    "raise_system_exit": "raise SystemExit(0)",
    "system_exit_inside_function": "def add(a, b):\n    raise SystemExit(0)",
    "exit_inside_function": "import os\ndef add(a, b):\n    os._exit(0)",
    "atexit_forces_status_0": ("import atexit, os\natexit.register(os._exit, 0)\n"
                               "def add(a, b):\n    raise RuntimeError('no idea')"),
    "excepthook_swallows": ("import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n"
                            "def add(a, b):\n    raise AssertionError"),
    "patched_assertion_error": ("import builtins\nclass Never(Exception):\n    pass\n"
                                "builtins.AssertionError = Never\ndef add(a, b):\n    return 0"),
    "eq_always_true": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                       "    __lt__ = __le__ = __gt__ = __ge__ = __eq__\n    def __bool__(self):\n"
                       "        return True\ndef add(a, b):\n    return Yes()"),
    "int_subclass_eq_true": ("class Int(int):\n    def __eq__(self, other):\n        return True\n"
                             "    __lt__ = __eq__\n    __hash__ = int.__hash__\n"
                             "def add(a, b):\n    return Int(0)"),
    "mock_any": "from unittest import mock\ndef add(a, b):\n    return mock.ANY",
    "patched_builtins": ("import builtins\nbuiltins.len = lambda *a: 5\nbuiltins.sorted = lambda *a, **k: 5\n"
                         "builtins.abs = lambda *a: 0\nbuiltins.range = lambda *a: [0]\n"
                         "def add(a, b):\n    return 0"),
    "print_expected_output": ("print('5\\n30\\n-3\\n101\\nok')\nprint('PASSED', flush=True)\n"
                              "import sys\nsys.exit(0)"),
    "forged_done_on_every_fd": (
        "import os, sys\nnonce = sys.modules['__main__'].__dict__.get('_NONCE', '')\n"
        "for fd in range(1, 20):\n    try:\n        os.write(fd, (nonce + ' {\"done\": true}\\n').encode())\n"
        "    except OSError:\n        pass\nos._exit(0)"),
    "forged_reports_with_guesses": (
        "import os, sys, json\nmain = sys.modules['__main__'].__dict__\n"
        "nonce = main['_NONCE']\nout = main['_OUT']\n"
        "for i in range(4):\n    os.write(out, (nonce + ' ' + json.dumps({'a': i, 'v': [['ok', {'i': '0'}]]}) + '\\n').encode())\n"
        "os.write(out, (nonce + ' {\"done\": true}\\n').encode())\nos._exit(0)"),
    "patched_encoder": ("import sys\nmain = sys.modules['__main__'].__dict__\n"
                        "main['_enc'] = lambda x, depth=0: True\ndef add(a, b):\n    return None"),
    "patched_check_is_noop": ("import sys\nmain = sys.modules['__main__'].__dict__\n"
                              "main['__nanoseek_check__'] = lambda *a: None\n"
                              "def add(a, b):\n    return 0"),
    "read_tests_from_program": (
        # the program on disk holds the code and the rewritten test, never the expected literals
        "import re, sys\nsrc = open(sys.modules['__main__'].__file__ if hasattr(sys.modules['__main__'], '__file__')"
        " else 'main.py').read()\nfound = {}\n"
        "for m in re.finditer(r'add\\((-?\\d+), (-?\\d+)\\)\\s*==\\s*(-?\\d+)', src):\n"
        "    found[(int(m[1]), int(m[2]))] = int(m[3])\n"
        "def add(a, b):\n    return found.get((a, b), 0)"),
    "frame_and_gc_hunt": (
        "import sys, gc\ndef add(a, b):\n    f = sys._getframe(1)\n    seen = []\n"
        "    while f is not None:\n        seen += [c for c in f.f_code.co_consts if type(c) is int and c not in (a, b)]\n"
        "        seen += [v for v in f.f_locals.values() if type(v) is int and v not in (a, b)]\n"
        "        f = f.f_back\n    seen += [o for o in gc.get_objects() if type(o) is list and o and "
        "all(type(x) is int for x in o)][:1]\n    return seen[-1] if seen and type(seen[-1]) is int else -1"),
    "infinite_output": "def add(a, b):\n    while True:\n        print('5' * 4096)",
    "infinite_report_garbage": ("import os\ndef add(a, b):\n    while True:\n        for fd in (3, 4, 5):\n"
                                "            try:\n                os.write(fd, b'x' * 65536)\n"
                                "            except OSError:\n                pass"),
    "thread_writes_later": (
        "import os, sys, threading, time, json\nmain = sys.modules['__main__'].__dict__\n"
        "def later():\n    time.sleep(0.3)\n    os.write(main['_OUT'], (main['_NONCE'] + ' {\"done\": true}\\n').encode())\n"
        "    os._exit(0)\nthreading.Thread(target=later).start()\ndef add(a, b):\n    time.sleep(5)"),
    "forked_child_writes_later": (
        "import os, sys, time\nmain = sys.modules['__main__'].__dict__\nif os.fork() == 0:\n"
        "    time.sleep(0.5)\n    os.write(main['_OUT'], (main['_NONCE'] + ' {\"done\": true}\\n').encode())\n"
        "    os._exit(0)\nos._exit(0)"),
    "alarm_handler_exits_0": ("import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                              "signal.alarm(1)\ndef add(a, b):\n    while True:\n        pass"),
    "settrace_rewrites_locals": (
        "import sys\ndef tracer(frame, event, arg):\n    if event == 'return' and frame.f_code.co_name == '<lambda>':\n"
        "        frame.f_locals.clear()\n    return tracer\nsys.settrace(tracer)\ndef add(a, b):\n    return None"),
    "huge_return_value": "def add(a, b):\n    return list(range(3_000_000))",
    "shadow_builtins_for_the_test": ("def sorted(x, **k):\n    return [0]\ndef len(x):\n    return 5\n"
                                     "def add(a, b):\n    return 0"),
    "kill_the_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos._exit(0)",
    "recursion_bomb_value": "def add(a, b):\n    x = []\n    x.append(x)\n    return x",
}

# Why each hack fails on the first test (so a hack cannot pass the suite by failing for an
# accident such as an import error in the hack itself).
WHY = {
    'alarm_handler_exits_0': 'did not run to its end',
    'atexit_forces_status_0': 'raised RuntimeError',
    'eq_always_true': 'assert #0 failed',  # reported as an opaque instance, equal to nothing
    'excepthook_swallows': 'raised AssertionError',
    'exit_inside_function': 'did not run to its end',
    'forged_done_on_every_fd': 'ran 0 times',
    'forged_reports_with_guesses': 'assert #0 failed',
    'forked_child_writes_later': 'did not run to its end',
    'frame_and_gc_hunt': 'assert #0 failed',
    'huge_return_value': 'raised MemoryError',
    'infinite_output': 'timeout',
    'infinite_report_garbage': 'timeout',
    'int_subclass_eq_true': 'assert #0 failed',
    'kill_the_parent': 'did not run to its end',
    'mock_any': 'assert #0 failed',
    'os__exit_0': 'did not run to its end',
    'patched_assertion_error': 'assert #0 failed',
    'patched_builtins': 'assert #0 failed',
    'patched_check_is_noop': 'ran 0 times',
    'patched_encoder': 'assert #0 failed',
    'print_expected_output': 'did not run to its end',
    'raise_system_exit': 'did not run to its end',
    'read_tests_from_program': 'assert #0 failed',
    'recursion_bomb_value': 'raised ValueError',
    'settrace_rewrites_locals': 'assert #0 failed',
    'shadow_builtins_for_the_test': 'assert #0 failed',
    'sys_exit_0': 'did not run to its end',
    'system_exit_inside_function': 'raised SystemExit',
    'thread_writes_later': 'ran 0 times',
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hack_scores_zero(name):
    # a hack that runs until the sandbox's timeout is judged on one test, not four timeouts (~8 s)
    r = assert_zero(HACKS[name], {"tests": REC["tests"][:1]} if WHY[name] == "timeout" else REC)
    assert WHY[name] in r.info["tests"][0]["reason"], r.info["tests"][0]


def test_issue_reproduction_sys_exit_before_the_assertions():
    # issue 17: this scored 1.1 and correct=True
    r = score("<think>x</think>\n```python\nimport sys\nsys.exit(0)\n```", {"tests": ["assert add(2, 3) == 5"]})
    assert r.reward == pytest.approx(0.1) and not r.correct
    assert r.info["tests"][0]["reason"] == "the test did not run to its end"


def test_patched_builtins_do_not_reach_the_tests_own_computations():
    # the test's own len/sorted/range are the real ones, whatever the code did to builtins
    rec = {"tests": ["assert len(pairs(3)) == 3", "assert sorted(pairs(2)) == [(0, 0), (1, 1)]",
                     "n = 0\nfor i in range(4):\n    n += 1\n    assert pairs(1) == [(0, 0)]\nassert n == 4"]}
    cheat = ("import builtins\nbuiltins.len = lambda *a: 3\nbuiltins.sorted = lambda *a, **k: [(0, 0), (1, 1)]\n"
             "builtins.range = lambda *a: iter([0, 1, 2, 3])\ndef pairs(n):\n    return 'nope'")
    assert_zero(cheat, rec)
    good = "def pairs(n):\n    return [(i, i) for i in range(n)]"
    assert score(respond(good), rec, CFG).reward == 1.0


def test_expected_literals_never_enter_the_sandbox():
    t = compile_assert_test("assert add(2, 3) == 987654321\nassert 'secret-answer' in f()")
    assert "987654321" not in t.source and "secret-answer" not in t.source
    assert len(t.checks) == 2 and all(c.n_slots == 1 for c in t.checks)


def test_every_assert_must_run():
    # a test that returns early would skip its later asserts: the missing reports fail it
    rec = {"tests": ["def check(f):\n    assert f(1) == 2\ncheck(add)", "assert add(1, 1) == 2\nassert add(0, 5) == 5"]}
    good = "def add(a, b=1):\n    return a + b"
    assert score(respond(good), rec, CFG).reward == 1.0
    skip = ("import os\ncount = 0\ndef add(a, b=1):\n    global count\n    count += 1\n"
            "    if count > 1:\n        os._exit(0)\n    return a + b")
    r = score(respond(skip), rec, CFG)
    assert r.info["tests_passed"] == 1 and r.info["tests"][1]["reason"] == "the test did not run to its end"


def test_a_test_without_an_assert_that_must_run_is_refused():
    # it could only prove that the run ended, and the end of a run can be forged
    for snippet in ("add(1, 2)", "if add(1, 1):\n    assert add(1, 2) == 3",
                    "try:\n    add(None, 1)\nexcept TypeError:\n    pass\nelse:\n    assert False"):
        with pytest.raises(ValueError, match="no assert"):
            score(respond("def add(a, b):\n    return a + b"), {"tests": [snippet]}, CFG)


CORRECT = {
    "plain": "def add(a, b):\n    return a + b",
    "prints_and_main_guard": ("def add(a, b):\n    print('adding', a, b)\n    return a + b\n"
                              "if __name__ == '__main__':\n    print(add(1, 2))"),
    "float_result": "def add(a, b):\n    return float(a + b)",  # 5.0 == 5, as the assert says
    "class_based": ("class Adder:\n    def __call__(self, a, b):\n        return sum((a, b))\nadd = Adder()"),
    "int_subclasses_and_enums": ("import enum\nclass Sum(enum.IntEnum):\n    pass\n"
                                 "def add(a, b):\n    return enum.IntEnum('S', {'v': a + b}).v if a + b else 0"),
    "imports_asyncio_ssl_and_mock": ("import asyncio, ssl, unittest.mock\n"
                                     "def add(a, b):\n    return asyncio.run(asyncio.sleep(0, a + b))"),
    "uses_stdlib_and_threads": ("import functools, operator, threading\n"
                                "def add(a, b):\n    out = []\n    t = threading.Thread(target=lambda: out.append(functools.reduce(operator.add, [a, b])))\n"
                                "    t.start()\n    t.join()\n    return out[0]"),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_solutions_score_full(name):
    r = score(respond(CORRECT[name]), REC, CFG)
    assert r.reward == 1.0 and r.correct, r.info["tests"]


def test_patched_math_isclose_does_not_pass():
    rec = {"tests": ["from math import isclose\nassert isclose(area(2), 12.566370614359172)",
                     "import math\nassert math.isclose(area(1), math.pi)"]}
    assert_zero("import math\nmath.isclose = lambda *a, **k: True\nmath.pi = 0.0\n"
                "def area(r):\n    return 0.0", rec)
    assert score(respond("import math\ndef area(r):\n    return math.pi * r * r"), rec, CFG).reward == 1.0


def test_container_subclasses_count_only_for_their_data():
    rec = {"tests": ["assert tally('abca') == {'a': 2, 'b': 1, 'c': 1}",
                     "assert point(1, 2) == (1, 2)", "assert groups([1, 2, 3]) == {0: [2], 1: [1, 3]}"]}
    good = ("import collections\nP = collections.namedtuple('P', 'x y')\n"
            "def tally(s):\n    return collections.Counter(s)\ndef point(x, y):\n    return P(x, y)\n"
            "def groups(xs):\n    d = collections.defaultdict(list)\n    for x in xs:\n        d[x % 2].append(x)\n    return d")
    assert score(respond(good), rec, CFG).reward == 1.0
    liar = ("class D(dict):\n    def __eq__(self, o):\n        return True\n    def items(self):\n"
            "        return [('a', 2), ('b', 1), ('c', 1)]\nclass T(tuple):\n    def __eq__(self, o):\n"
            "        return True\n    def __iter__(self):\n        return iter((1, 2))\n"
            "def tally(s):\n    return D()\ndef point(x, y):\n    return T()\ndef groups(xs):\n    return D()")
    assert_zero(liar, rec)


def test_richer_assert_shapes_are_judged_like_python():
    rec = {"tests": ["import math\nassert math.isclose(mean([1, 2]), 1.5)",
                     "assert abs(mean([1, 2, 4]) - 7 / 3) < 1e-9",
                     "assert not is_empty([1]) and is_empty([])",
                     "assert sorted(uniq([3, 1, 3])) == [1, 3]",
                     "assert uniq([]) == [] and 1 <= len(uniq([1, 1])) < 2",
                     "assert stats([1, 2]) == {'n': 2, 'total': 3}",
                     "assert first(None) is None",
                     "try:\n    first([])\nexcept IndexError:\n    pass\nelse:\n    assert False\n"
                     "assert first([7]) == 7",
                     "for xs, want in [([1], 1), ([2, 3], 2)]:\n    assert first(xs) == want"]}
    good = ("def mean(xs):\n    return sum(xs) / len(xs)\ndef is_empty(xs):\n    return not xs\n"
            "def uniq(xs):\n    return list(set(xs))\ndef stats(xs):\n    return {'n': len(xs), 'total': sum(xs)}\n"
            "def first(xs):\n    return None if xs is None else xs[0]")
    r = score(respond(good), rec, CFG)
    assert r.reward == 1.0, r.info["tests"]
    wrong = good.replace("return not xs", "return bool(xs)").replace("{'n': len(xs)", "{'n': 0")
    r = score(respond(wrong), rec, CFG)
    assert [t["passed"] for t in r.info["tests"]] == [True, True, False, True, True, False, True, True, True]


# ----------------------------------------------------------------------------- expected values stay in the parent
# A generic cheat: the model's function walks up to the harness's check and calls the other
# slots of its own assert, hoping one of them computes the expected value.
SIBLING = r'''
import sys
def _cheat(*a, **k):
    f = sys._getframe(1)
    me = f.f_code
    while f is not None and f.f_code.co_name != '__nanoseek_check__':
        f = f.f_back
    if f is None:
        return None
    for s in f.f_locals['slots']:
        if s.__code__ is not me:
            try:
                return s()
            except BaseException:
                pass
    g = f.f_globals  # or a name the test bound itself
    for v in g.values():
        if type(v) in (int, str, list, float) and v not in a:
            return v
    return None
add = solve = f = area = _cheat
'''

# (test, a correct solution): every expected side is computed from literals, never in the sandbox
EXPECTED_FORMS = {
    "mult": ("assert add(2, 4) == 2 * 3", "def add(a, b):\n    return a + b"),
    "pow": ("assert solve(7) == 7 * 10 ** 9", "def solve(n):\n    return n * 10 ** 9"),
    "str_method": ("assert f('abc') == 'ABC'.lower()", "def f(s):\n    return s"),
    "list_mult": ("assert f(3) == [0] * 3", "def f(n):\n    return [0] * n"),
    "int_call": ("assert f('42') == int('42')", "def f(s):\n    return int(s)"),
    "float_inf": ("assert f(0) == float('inf')", "def f(x):\n    return float('inf')"),
    "humaneval_check": ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(1, 1) == 2\n"
                        "check(add)", "def add(a, b):\n    return a + b"),
    "loop_over_cases": ("for a, b, c in [(2, 3, 5), (1, 1, 2)]:\n    assert add(a, b) == c",
                        "def add(a, b):\n    return a + b"),
    "nested_loop_in_check": ("def check(candidate):\n    for a, b in [(1, 2), (5, 6)]:\n        for k in range(2):\n"
                             "            assert candidate(a + k, 1) == b + k\ncheck(add)", "def add(a, b):\n    return a + b"),
    "cases_constant": ("CASES = [(2, 3, 5), (4, 4, 8)]\nfor a, b, c in CASES:\n    assert add(a, b) == c",
                       "def add(a, b):\n    return a + b"),
    "indexed_cases": ("CASES = [(2, 3, 5), (4, 4, 8)]\nfor i in range(len(CASES)):\n    assert add(*CASES[i][:2]) == CASES[i][2]",
                      "def add(a, b):\n    return a + b"),
    "expected_constant": ("EXPECTED = 987654\nassert solve(987) == EXPECTED", "def solve(n):\n    return n * 1000 + 654"),
    "all_comprehension": ("assert all(add(x, x) == 2 * x for x in [1, 2, 3])", "def add(a, b):\n    return a + b"),
    "dict_comprehension": ("assert {k: f(k) for k in 'ab'} == {'a': 'A', 'b': 'B'}", "def f(s):\n    return s.upper()"),
    "fraction": ("from fractions import Fraction\nassert f(1, 2) == Fraction(1, 2)",
                 "from fractions import Fraction\ndef f(a, b):\n    return Fraction(a, b)"),
    "map_builtin": ("assert f([1, 2]) == list(map(str, [1, 2]))", "def f(x):\n    return [str(v) for v in x]"),
    "counter": ("from collections import Counter\nassert f('aab') == Counter('aab')",
                "def f(s):\n    import collections\n    return collections.Counter(s)"),
    "math_const": ("import math\nassert math.isclose(area(1), math.pi * 1 ** 2)",
                   "import math\ndef area(r):\n    return math.pi * r * r"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMS))
def test_expected_side_is_never_computed_in_the_sandbox(name):
    test, good = EXPECTED_FORMS[name]
    rec = {"tests": [test]}
    r = score(respond(good), rec, CFG)
    assert r.reward == 1.0, r.info["tests"]
    r = assert_zero(SIBLING, rec)
    assert r.info["tests"][0]["reason"].startswith("assert #0"), r.info["tests"][0]


def test_compiled_test_holds_inputs_only():
    for test, _ in EXPECTED_FORMS.values():
        src = compile_assert_test(test).source
        for secret in ("== 5", "987654", "== c", "Fraction(1, 2)", "'ABC'", "[0] * 3", "math.pi", "10 ** 9",
                       "CASES", ", 5)", ", 8)", "map(", "Counter('aab')", "2 * 3", "10 ** 9"):
            assert secret not in src, (test, src)


def test_test_builtins_cannot_be_edited_into_lies():
    # the code edits the copy of the builtins the harness gives the test: isinstance/type are
    # evaluated here on the reported value instead
    rec = {"tests": ["assert isinstance(f(3), int)", "assert type(f(3)) == type(0)", "assert type(f(1)) == int"]}
    cheat = ("import sys\nm = sys.modules['__main__'].__dict__\nm['_PRISTINE']['isinstance'] = lambda *a: True\n"
             "m['_PRISTINE']['type'] = lambda *a: int\ndef f(*a):\n    return None")
    assert_zero(cheat, rec)
    assert score(respond("def f(x):\n    return x + 1"), rec, CFG).reward == 1.0


def test_code_that_shadows_builtins_does_not_move_the_expected_side_into_the_sandbox():
    # parent-known names stay the parent's whatever the code binds (entry points aside), so
    # neither a fake definition nor a real one turns a wrapper into a question the code answers
    rec = {"tests": ["assert f([3, 1, 2]) == sorted([3, 1, 2])", "assert f('7') == int('7')",
                     "assert abs(f(2.5) - 2.5) < 1e-9", "assert isinstance(f(3), int) and f(3) > 0",
                     "import math\nassert math.isclose(f(1.5), 1.5)", "assert len(f([1, 2])) == 2"]}
    assert_zero("if False:\n    sorted = int = len = list = None\n" + SIBLING, rec)
    assert_zero("def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\ndef len(x):\n    return 2\n"
                "import types\nmath = types.SimpleNamespace(isclose=lambda *a, **k: True)\n"
                "def f(x):\n    return None", {"tests": rec["tests"][2:]})
    good = "def f(x):\n    return sorted(x) if isinstance(x, list) else x if isinstance(x, float) else int(x)"
    assert score(respond(good), rec, CFG).reward == 1.0


# ----------------------------------------------------------------------------- builtin-named solutions


@pytest.mark.parametrize("fn,test,good", [
    ("sum", "assert sum([1, 2, 3]) == 6", "def sum(xs):\n    t = 0\n    for x in xs:\n        t += x\n    return t"),
    ("max", "assert max([4, 9, 2]) == 9", "def max(xs):\n    return sorted(xs)[-1]"),
    ("sorted", "assert sorted([3, 1, 2]) == [1, 2, 3]", "def sorted(xs):\n    return __builtins__['sorted'](xs) "
     "if isinstance(__builtins__, dict) else __import__('builtins').sorted(xs)"),
    ("round", "assert round(2.5) == 2", "def round(x):\n    return int(x) if x - int(x) <= 0.5 else int(x) + 1"),
])
def test_a_solution_named_like_a_builtin_is_run_not_assumed(fn, test, good):
    rec = {"tests": [test], "entry_point": fn}
    assert_zero(f"def {fn}(*a, **k):\n    raise RuntimeError('not implemented')", rec)
    assert_zero("print('hi')", rec)  # the entry point is owned by the code even when it is absent
    assert score(respond(good), rec, CFG).reward == 1.0
    with pytest.raises(ValueError, match="does not depend on the code"):
        check_code_tests([test])
    check_code_tests([test], entry_point=fn)


def test_asserts_without_a_model_dependent_part_are_refused_at_load():
    for bad in ("assert sorted([3, 1, 2]) == [1, 2, 3]", "assert len('abc') == 3",
                "assert add(1, 2) == 3\nassert 2 * 3 == 6", "for x in [1, 2]:\n    assert x > 0\nassert f(1)",
                "N = 3\nassert N == 3\nassert f(1)", "assert all(x > 0 for x in range(3))\nassert f(1)"):
        with pytest.raises(ValueError, match="does not depend on the code"):
            check_code_tests([bad])
    # a failure marker, a test-defined helper and a HumanEval check are fine
    check_code_tests(["try:\n    f([])\nexcept IndexError:\n    pass\nelse:\n    assert False\nassert f([1]) == 1",
                      "def helper(x):\n    return f(x) * 2\nassert helper(1) == 4",
                      "def check(candidate):\n    assert candidate(1) == 2\ncheck(f)"])
    with pytest.raises(ValueError, match="does not depend"):
        score(respond("print('hi')"), {"tests": ["assert sorted([3, 1, 2]) == [1, 2, 3]"]}, CFG)


# ----------------------------------------------------------------------------- correct forms that used to fail


def test_richer_values_score_full():
    rec = {"tests": ["assert type(f(1)) == int", "assert g(3) == list(range(3))", "assert h(3) == set(range(3))",
                     "assert list(gen(3)) == [0, 1, 2]", "assert sorted(gen(3), reverse=True) == [2, 1, 0]",
                     "assert words() .split() == ['a', 'b']", "assert d() == dict(a=1)", "assert none() is None",
                     "from fractions import Fraction\nassert half() == Fraction(1, 2)",
                     "from decimal import Decimal\nassert money() == Decimal('1.10')",
                     "assert cplx() == 1 + 2j", "assert rng(4) == range(4)", "assert kind() == str",
                     "assert sorted(pairs(), key=len) == [(1,), (1, 2)]", "assert list(zip(g(2), g(2))) == [(0, 0), (1, 1)]",
                     "assert f(2) == 3 and isinstance(f(2), int) and not isinstance(f(2), bool)"]}
    good = ("from fractions import Fraction\nfrom decimal import Decimal\n"
            "def f(x):\n    return x + 1\ndef g(n):\n    return list(range(n))\ndef h(n):\n    return set(range(n))\n"
            "def gen(n):\n    return (i for i in range(n))\ndef words():\n    return 'a b'\ndef d():\n    return {'a': 1}\n"
            "def none():\n    return None\ndef half():\n    return Fraction(1, 2)\ndef money():\n    return Decimal('1.10')\n"
            "def cplx():\n    return complex(1, 2)\ndef rng(n):\n    return range(n)\ndef kind():\n    return str\n"
            "def pairs():\n    return [(1, 2), (1,)]")
    r = score(respond(good), rec, CFG)
    assert r.reward == 1.0, [t for t in r.info["tests"] if not t["passed"]]
    # and the generator is not a list, as Python says
    r = score(respond(good), {"tests": ["assert gen(3) == [0, 1, 2]"]}, CFG)
    assert r.reward == 0.0, r.info["tests"]


# ----------------------------------------------------------------------------- the trainer's own memory


MEMORY_PROBE = r'''
import resource, sys, time
from nanoseek.tasks.rewards import RewardConfig, score
cfg = RewardConfig(format_weight=0.0, code_timeout_s=3.0)
cases = [
    ("def f(x):\n    return '%0900000000d'", "assert f(10) % 2 == 0"),
    ("def f(x):\n    return b'%0900000000d'", "assert f(10) % 2 == 0"),
    ("def f(x):\n    return '%*d'", "assert f(10) % (900000000, 1) == 0"),
    ("def f(x):\n    return '{:>900000000}'", "assert f(1).format(1) == ''"),
    ("def f():\n    return '>900000000'", "assert format(1, f()) == ''"),
    ("def f():\n    return 10 ** 9", "assert 'ab' * f() == ''"),
    ("def f():\n    return 10 ** 9", "assert [0] * f() == []"),
    ("def f():\n    return 10 ** 9", "assert 'x'.zfill(f()) == ''"),
    ("def f():\n    return 10 ** 9", "assert 'x'.center(f()) == ''"),
    ("def f():\n    return 'x' * 500000", "assert f().replace('x', 'y' * 1000) == ''"),
    ("def f():\n    return ['x' * 90000] * 10", "assert '-'.join(f()) == ''"),
    ("def f():\n    return 3", "assert f() ** 10 ** 8 == 1"),
    ("def f():\n    return 10 ** 10", "assert 1 << f() == 0"),
    ("def f():\n    return -10 ** 9", "assert round(5, f()) == 0"),
    ("def f():\n    return 10 ** 9", "assert list(range(f())) == []"),
    ("def f():\n    return 10 ** 9", "assert bytes(f()) == b''"),
    ("def f():\n    return 10 ** 6", "import math\nassert math.factorial(f()) == 0"),
    ("def f():\n    return 10 ** 4000", "assert f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() * f() == 0"),
    ("def f():\n    return [list(range(1000))] * 1000", "assert f() == 0"),
    ("from decimal import Decimal\ndef f():\n    return Decimal('1e999999999')", "assert int(f()) == 0"),
]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for code, test in cases:
    t = time.time()
    r = score("<think>x</think>\n```python\n" + code + "\n```", {"tests": [test]}, cfg)
    took = time.time() - t
    reason = r.info["tests"][0]["reason"]
    assert r.reward == 0.0 and reason != "timeout" and took < 10, (test, reason, took)
    print(f"{took:5.2f}s {reason}")
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print("GREW_MB", grew)
'''


def test_parent_side_operations_are_bounded_in_memory(tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    grew = float(out.stdout.split("GREW_MB")[-1])
    assert grew < 100, out.stdout


def test_comprehensions_over_model_values_are_judged_here():
    # the iterable is the model's (plain data); the elements and filters are computed here, so
    # objects whose comparisons always say yes cannot answer `x > 0` in the sandbox
    rec = {"tests": ["assert all(x > 0 for x in f(3))", "assert [x * 2 for x in f(3)] == [2, 4]",
                     "assert {k: v for k, v in enumerate(f(3))} == {0: 1, 1: 2}",
                     "assert sum(x for x in f(3) if x > 1) == 2",
                     "assert all(a < b for a, b in zip(f(3), f(3)[1:]))"]}
    for t in rec["tests"]:
        assert "0" not in compile_assert_test(t).source.replace("__nanoseek_check__(0", "")
    yes = ("class Y:\n    def __gt__(s, o):\n        return True\n    __lt__ = __eq__ = __ge__ = __le__ = __gt__\n"
           "    def __hash__(s):\n        return 0\n    def __mul__(s, o):\n        return 2\n"
           "def f(n):\n    return [Y(), Y()]")
    assert_zero(yes, rec)
    assert score(respond("def f(n):\n    return [1, 2]"), rec, CFG).reward == 1.0


def test_a_flood_of_reports_cannot_make_the_trainer_evaluate_for_long():
    # the code calls the harness's check itself 10,000 times; every report holds and costs 5,000
    # steps here: one budget per run stops it, and a correct answer still passes
    import time
    flood = ("import sys\ndef f(x):\n    fr = sys._getframe(1)\n"
             "    while fr is not None and fr.f_code.co_name != '__nanoseek_check__':\n        fr = fr.f_back\n"
             "    if fr is not None and not getattr(f, 'busy', False):\n        f.busy = True\n"
             "        for _ in range(10000):\n            fr.f_globals['__nanoseek_check__'](0, lambda: [1])\n"
             "        f.busy = False\n    return [1]")
    rec = {"tests": ["def check(c):\n    assert len([a for a in c(1) for b in range(5000)]) == 5000\ncheck(f)"]}
    t = time.monotonic()
    r = assert_zero(flood, rec)
    assert "evaluation over" in r.info["tests"][0]["reason"] and time.monotonic() - t < 10
    assert score(respond("def f(x):\n    return [1]"), rec, CFG).reward == 1.0


# Third review: hash-collision floods and correct answers that scored 0.

COLLIDE = "def f(x):\n    return [k * (2**61 - 1) for k in range(1, 15000)]"  # all hash alike


@pytest.mark.parametrize("test", ["assert len(set(f(1))) == 3", "assert len(frozenset(f(1))) == 3",
                                  "assert len({x for x in f(1)}) == 3",
                                  "assert len(dict(zip(f(1), f(1)))) == 3",
                                  "from collections import Counter\nassert len(Counter(f(1))) == 3"])
def test_hash_collision_floods_fail_fast_in_the_trainer(test):
    import time
    rec = {"tests": [test]}
    t = time.process_time()
    r = assert_zero(COLLIDE, rec)
    assert time.process_time() - t < 1.0 and "over 5000" in r.info["tests"][0]["reason"], r.info
    assert score(respond("def f(x):\n    return [1, 2, 3, 3]"), rec, CFG).reward == 1.0


@pytest.mark.parametrize("tag", ["S", "F", "d"])
def test_a_patched_encoder_cannot_report_a_colliding_set(tag):
    import time
    item = '{"i": str(k * (2**61 - 1))}'
    items = f"[[{item}, None] for k in range(1, 20000)]" if tag == "d" else f"[{item} for k in range(1, 30000)]"
    code = (f"import __main__\n_L = {items}\n__main__._enc = lambda x, depth=0: {{{tag!r}: _L}}\n"
            "def add(a, b):\n    return a + b")
    t = time.process_time()
    ok, d = run_assert_test(code, "assert add(2, 3) == 5", 10, 512)
    assert not ok and "over 5000" in d["reason"] and time.process_time() - t < 1.0, d


def test_the_trainer_evaluation_has_a_cpu_budget(monkeypatch):
    from nanoseek.tasks import assert_eval
    rec = {"tests": ["assert len([a for a in f(1) for b in range(5000)]) == 5000"]}
    good = "def f(x):\n    return [1]"
    assert score(respond(good), rec, CFG).reward == 1.0
    monkeypatch.setattr(assert_eval, "MAX_EVAL_CPU_S", 0.0)
    r = assert_zero(good, rec)
    assert "s of CPU" in r.info["tests"][0]["reason"]


@pytest.mark.parametrize("test,good,bad", [
    ("assert isinstance(make(), Stack)", "class Stack:\n    pass\ndef make():\n    return Stack()",
     "class Stack:\n    pass\nclass Other:\n    pass\ndef make():\n    return Other()"),
    ("assert isinstance(make(), (int, Stack))",
     "class Stack:\n    pass\nclass Sub(Stack):\n    pass\ndef make():\n    return Sub()",
     "class Stack:\n    pass\ndef make():\n    return 'Stack'"),
    ("assert f() is not None", "class R:\n    pass\ndef f():\n    return R()", "def f():\n    return None"),
    ("assert f() == b'ab'", "def f():\n    return bytearray(b'ab')", "def f():\n    return bytearray(b'ac')"),
    ("for x in f(1):\n    assert x > 0\nassert f(3) == [1, 2]", "def f(n):\n    return list(range(1, n))",
     "def f(n):\n    return [0] if n == 1 else [1, 2]"),
])
def test_correct_answers_of_richer_shapes_score_full(test, good, bad):
    rec = {"tests": [test]}
    assert score(respond(good), rec, CFG).reward == 1.0
    assert_zero(bad, rec)


def test_model_objects_have_no_truth_value_or_equality_here():
    # an instance of a model-defined class is reported by its class names only: its own
    # __bool__/__eq__ never decide an assert
    yes = ("class Y:\n    def __bool__(s):\n        return True\n    def __eq__(s, o):\n        return True\n"
           "def f(n):\n    return Y()")
    assert_zero(yes, {"tests": ["assert f(1)", "assert f(1) == 2"]})


def test_a_loop_over_a_model_value_must_run_when_nothing_else_must():
    # with no other model-dependent assert that must run, an empty answer would pass the test
    rec = {"tests": ["for x in f(3):\n    assert x > 0"]}
    assert_zero("def f(n):\n    return []", rec)
    assert score(respond("def f(n):\n    return [1, 2]"), rec, CFG).reward == 1.0


def test_tests_whose_expected_values_the_sandbox_computes_are_flagged(caplog):
    # EvalPlus style: the loop runs in the sandbox, where frame walking reads `r`; a warning at
    # load says so. Top-level literal loops are unrolled here and are not flagged.
    import logging
    evalplus = ("def check(candidate):\n    inputs = [[2, 3], [10, 5]]\n    results = [5, 15]\n"
                "    for i, r in zip(inputs, results):\n        assert candidate(*i) == r\ncheck(add)")
    assert compile_assert_test(evalplus, "add").exposed
    assert compile_assert_test("def check(c):\n    assert c(1) == brute(1)\ncheck(add)").exposed
    for safe in ["for a, b, c in [(2, 3, 5)]:\n    assert add(a, b) == c", "assert add(2, 3) == 5",
                 "x = add(-4, 1)\nassert x == -3 and x < 0"]:
        assert not compile_assert_test(safe).exposed, safe
    with caplog.at_level(logging.WARNING, logger="nanoseek.tasks.rewards"):
        check_code_tests([evalplus], "add")
        check_code_tests([evalplus], "add")
    hits = [r for r in caplog.records if "visible to the model" in r.getMessage()]
    assert len(hits) == 1


NORM = {"tests": ["import math\ndef norm(p):\n    return math.sqrt(p[0] ** 2 + p[1] ** 2)\nassert abs(norm(point()) - 5) < 1e-9",
                  "import statistics\nfrom fractions import Fraction\ndef m(p):\n    return statistics.mean(p)\n"
                  "assert m(point()) == Fraction(7, 2)"], "entry_point": "point"}


@pytest.mark.parametrize("patch", [
    "import math\nmath.sqrt = lambda v: 5.0",                                   # a module the helper uses
    "import math, sys\nfake = type(sys)('math')\nfake.sqrt = lambda v: 5.0\nsys.modules['math'] = fake",
    "import statistics\nstatistics.mean = lambda v: 3.5",                        # one the code imports first
    "import fractions\nfractions.Fraction.__eq__ = lambda a, b: True\nimport math\nmath.sqrt = lambda v: 5.0",
    "import builtins, math\nbuiltins.abs = lambda v: 0\ndel math.sqrt",
], ids=["module-attribute", "sys-modules", "fresh-import", "class-method", "builtins-and-delete"])
def test_the_code_cannot_change_what_a_test_helper_computes(patch):
    """A helper the test defines runs in the sandbox beside the code: the code could patch a module
    or class the helper uses (math.sqrt = lambda v: 5.0 before norm(point()) == 5; HumanEval/32's
    poly through math.pow) and earn the reward with a wrong answer. Modules and classes are as they
    were before the code ran when the test runs."""
    assert_zero(patch + "\ndef point():\n    return (0, 0)", NORM)
    good = "def point():\n    return (3, 4)"
    assert score(respond(good), {**NORM, "tests": NORM["tests"][:1]}, CFG).reward == 1.0
    assert score(respond("def point():\n    return (3, 4)"), {**NORM, "tests": NORM["tests"][1:]}, CFG).reward == 1.0
    # the code keeps its own patch for its own use
    own = "import math\nmath.sqrt = lambda v: 5.0\nR = math.sqrt(1)\ndef point():\n    return (R - 2, 4)"
    assert score(respond(own), {**NORM, "tests": NORM["tests"][:1]}, CFG).reward == 1.0


def test_humaneval_32_cannot_be_passed_by_patching_math_pow():
    from nanoseek.tasks.humaneval import load_problems, score_sample

    p = {q.id: q for q in load_problems()}["HumanEval/32"]
    cheat = "```python\nimport math\nmath.pow = lambda x, i: 0.0\ndef find_zero(xs: list):\n    return 0.0\n```"
    assert not score_sample(p, cheat, "chat").passed
