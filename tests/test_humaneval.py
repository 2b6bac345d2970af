"""HumanEval (nanoseek.tasks.humaneval): problems and their specs, prompts per mode, the code
extraction rule, sandboxed scoring (canonical solutions pass, wrong ones and every attack fail),
pass@k through the harness, the eval CLI end to end and determinism.

Runs in the sandbox use short timeouts; the full 164-problem check is marked slow.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_tiny_model
from nanoseek.tasks import humaneval as he
from nanoseek.eval.harness import EvalConfig, evaluate
from nanoseek.eval.results import EvalResult
from nanoseek.infer.engine import Completion

PROBLEMS = he.load_problems()
BY_ID = {p.id: p for p in PROBLEMS}
FAST = he.HumanEvalSettings(timeout_s=5.0, workers=4)
# ~15 problems spread over the set, including the ones with helper functions and random tests
SUBSET = ["HumanEval/0", "HumanEval/2", "HumanEval/10", "HumanEval/12", "HumanEval/32", "HumanEval/38",
          "HumanEval/50", "HumanEval/53", "HumanEval/64", "HumanEval/81", "HumanEval/100", "HumanEval/129",
          "HumanEval/151", "HumanEval/160", "HumanEval/163"]


def whole_function(p) -> str:
    return p.prompt + p.canonical_solution


# ---------------------------------------------------------------------- the data and the specs

def test_problems_ship_with_the_package_and_parse():
    assert len(PROBLEMS) == 164 and PROBLEMS[0].id == "HumanEval/0" and PROBLEMS[-1].id == "HumanEval/163"
    assert [p.index for p in PROBLEMS] == list(range(164))
    for p in PROBLEMS:
        assert "def check(candidate)" in p.test and p.entry_point in p.prompt and p.level == 0
        assert he.test_program(p).endswith(f"check({p.entry_point})\n")


def test_specs_select_ranges_counts_and_refuse_bad_items():
    assert he.claims("humaneval") and he.claims(" HumanEval:3-4") and not he.claims("arithmetic")
    assert [p.id for p in he.select("humaneval:3-5", 200)[0]] == ["HumanEval/3", "HumanEval/4", "HumanEval/5"]
    assert [p.id for p in he.select("humaneval:7", 1)[0]] == ["HumanEval/7"]
    first, notes = he.select("humaneval", 20)
    assert [p.index for p in first] == list(range(20)) and "first 20" in notes[0]
    assert len(he.select("humaneval", 200)[0]) == 164 and he.select("humaneval", 200)[1] == []
    for bad, why in (("humaneval:164", "0-163"), ("humaneval:5-3", "A <= B"), ("humaneval:a", "N or A-B"),
                     ("humaneval:1,2", "N or A-B"), ("humaneval:-1", "N or A-B")):
        with pytest.raises(ValueError, match=why):
            he.parse_spec(bad)
    # the harness config names the bad item; built-in tasks and HumanEval mix in one list
    with pytest.raises(ValueError, match=r"humaneval:999.*0-163"):
        EvalConfig(tasks=["arithmetic", "humaneval:999"]).validate()
    with pytest.raises(ValueError, match="valid tasks"):
        EvalConfig(tasks=["humaneval", "nosuch"]).validate()
    EvalConfig(tasks=["arithmetic:1", "humaneval:0-3"]).validate()


def test_registered_as_a_task_source_for_evaluation_only():
    from nanoseek.post.datasets import DataError, load_rl_prompts
    from nanoseek.tasks.source import TaskSource
    from nanoseek.tasks.sources import SOURCES, parse_sources, resolve

    assert "humaneval" in SOURCES
    src = resolve(" HumanEval:3-5")
    assert isinstance(src, he.HumanEvalSource) and isinstance(src, TaskSource) and src.name == "humaneval"
    problems, notes = src.draw(200, 0, [1])
    assert [p.id for p in problems] == ["HumanEval/3", "HumanEval/4", "HumanEval/5"]
    assert notes == ["humaneval: --levels does not apply (HumanEval has no levels)"]
    assert [s.name for s in parse_sources("arithmetic:1,rg:leg_counting,humaneval:0")] == \
        ["arithmetic", "rg:leg_counting", "humaneval"]
    with pytest.raises(ValueError, match="0-163"):
        resolve("humaneval:200")
    assert src.examples(0, 3, 0) == []                    # no few-shot examples
    # the RL verifier's view: an answer is code that completes the function
    p = BY_ID["HumanEval/4"]
    assert src.accuracy(p.canonical_solution, p) == 1.0 and src.accuracy(whole_function(p), p) == 1.0
    assert src.accuracy("    return 0.0\n", p) == 0.0 and src.accuracy(None, p) == 0.0
    # no training split: RL prompts from it are one clear line
    with pytest.raises(DataError, match="evaluation only"):
        load_rl_prompts("humaneval", 4)
    assert not src.trainable and resolve("arithmetic:1").trainable and resolve("rg:leg_counting").trainable


# ---------------------------------------------------------------------- extraction and programs

def test_extraction_rule_for_chat_replies():
    p = BY_ID["HumanEval/2"]          # def truncate_number(number: float) -> float
    fn = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert he.extract_code(f"Sure:\n```python\n{fn}```\nDone.", "chat") == fn
    # the last python block wins; untagged blocks only when there is no tagged one
    assert he.extract_code(f"```python\nx = 1\n```\n```\ny = 2\n```\n```py\n{fn}```", "chat") == fn
    assert he.extract_code("```\nreturn 1\n```", "chat") == "return 1\n"
    # code in the think block does not count; after </think> it does
    assert he.extract_code(f"<think>```python\n{fn}```</think>no code", "chat") is None
    assert he.extract_code(f"<think>hmm</think>\n```python\n{fn}```", "chat-think") == fn
    assert he.extract_code(f"still thinking ```python\n{fn}```", "chat-think") is None
    # r1-zero: inside the last <answer> block
    assert he.extract_code(f"<think>x</think><answer>\n```python\n{fn}```\n</answer>", "r1-zero") == fn
    # bare code is taken when it parses; prose is not
    assert he.extract_code(fn, "chat") == fn
    assert he.extract_code("The answer is to take the fractional part.", "chat") is None
    # a whole function replaces the stub; a body is indented into it
    prog, code = he.build_program(p, f"```python\n{fn}```", "chat")
    assert code == fn and prog.startswith(p.prompt) and prog.endswith(fn)
    prog, code = he.build_program(p, "```python\nreturn number % 1.0\n```", "chat")
    assert prog == p.prompt + "    return number % 1.0\n"
    assert he.build_program(p, "no code here at all.", "chat") == (None, None)
    assert he.build_program(p, "    return 1\n", "fewshot") == (p.prompt + "    return 1\n", "    return 1\n")


def test_an_unclosed_fence_runs_to_the_end_of_the_reply():
    fn = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert he.extract_code(f"Here it is:\n```python\n{fn}", "chat") == fn
    assert he.extract_code(f"```python \n{fn}\n\n", "chat") == fn + "\n\n"
    assert he.extract_code(f"<think>\n```python\nx = 1\n</think>\n```py\n{fn}", "chat-think") == fn
    assert he.extract_code(f"```\n{fn}", "chat") == fn                       # untagged
    # it is the last block: after closed ones it wins; a tagged closed block beats an untagged open one
    assert he.extract_code(f"```python\nx = 1\n```\nthen:\n```python\n{fn}", "chat") == fn
    assert he.extract_code(f"```python\n{fn}```\nand ```\ny = 2\n", "chat") == fn
    # r1-zero: an unclosed fence inside the answer
    assert he.extract_code(f"<think>x</think><answer>\n```python\n{fn}</answer>", "r1-zero") == fn
    assert he.extract_code("```python\n", "chat") is None                    # nothing after the fence
    p = BY_ID["HumanEval/2"]
    v = he.score_sample(p, f"Sure.\n```python\n{fn}", "chat", FAST)
    assert v.passed and v.format_ok and v.code == fn, v
    v = he.score_sample(p, "```python\ndef truncate_number(number: float) -> float:\n    return (", "chat", FAST)  # cut off
    assert not v.passed and not v.format_ok and v.reason == "the program does not parse"


# (code, whether it binds `f` in module scope: a whole definition rather than a function body)
BINDINGS = {
    "def": ("def f(x):\n    return x\n", True),
    "lambda": ("f = lambda x: x\n", True),
    "def_in_if": ("if True:\n    def f(x):\n        return x\n", True),
    "def_in_try": ("try:\n    import numpy\nexcept ImportError:\n    pass\ndef g():\n    pass\nelse_ = 1\n"
                   "try:\n    pass\nfinally:\n    def f(x):\n        return x\n", True),
    "decorated": ("import functools\n@functools.lru_cache(None)\ndef f(x):\n    return x\n", True),
    "async_def": ("async def f(x):\n    return x\n", True),
    "class": ("class f:\n    pass\n", True),
    "tuple_target": ("g, (h, *f) = 1, (2, 3)\n", True),
    "annotated": ("f: object = len\n", True),
    "walrus": ("(f := len)\n", True),
    "import_as": ("from math import sqrt as f\n", True),
    "for_target": ("for f in [len]:\n    pass\n", True),
    "with_target": ("import contextlib\nwith contextlib.nullcontext(len) as f:\n    pass\n", True),
    "annotation_only": ("f: int\n", False),
    "inside_a_function": ("def g():\n    f = 1\n    return f\n", False),
    "method": ("class G:\n    def f(self):\n        pass\n", False),
    "global_in_a_function": ("def g():\n    global f\n    f = 1\n", False),
    "comprehension_target": ("[f for f in range(3)]\n", False),
    "in_a_lambda": ("g = lambda: (f := 1)\n", False),
    "attribute": ("g.f = 1\n", False),
    "deleted": ("del f\n", False),
    "a_body": ("return 1\n", False),
    "an_indented_body": ("    f = 1\n    return f\n", False),
    "does_not_parse": ("def f(:\n", False),
}


@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_what_binds_the_entry_point_at_top_level(name):
    code, binds = BINDINGS[name]
    assert he.binds_at_top_level(code, "f") is binds


def test_a_reply_binding_the_entry_point_is_a_whole_definition():
    """Any top-level binding of the entry point replaces the stub (and passes when right); a body is indented."""
    p = BY_ID["HumanEval/0"]
    right = "any(abs(a - b) < threshold for i, a in enumerate(numbers) for j, b in enumerate(numbers) if i != j)"
    replies = {
        "lambda": f"has_close_elements = lambda numbers, threshold: {right}\n",
        "def_in_if": f"import sys\nif sys.version_info >= (3,):\n    def has_close_elements(numbers, threshold):\n"
                     f"        return {right}\nelse:\n    has_close_elements = None\n",
        "decorated": f"import functools\n@functools.wraps(len)\ndef has_close_elements(numbers, threshold):\n"
                     f"    return {right}\n",
        "assigned_from_helper": f"def _impl(numbers, threshold):\n    return {right}\nhas_close_elements = _impl\n",
        "annotated": f"from typing import Callable\nhas_close_elements: Callable = lambda numbers, threshold: {right}\n",
        "body": f"return {right}\n",
    }
    verdicts = he.score_many([(p, f"```python\n{code}```") for code in replies.values()], "chat", FAST)
    for name, v in zip(replies, verdicts):
        assert v.passed and v.format_ok, (name, v)
    program, _ = he.build_program(p, f"```python\n{replies['lambda']}```", "chat")
    assert program == p.prompt + "\n\n" + replies["lambda"]
    program, _ = he.build_program(p, f"```python\n{replies['body']}```", "chat")
    assert program == p.prompt + "    " + replies["body"]
    # a wrong binding fails like a wrong function; an async def returns a coroutine, not the answer
    wrong = ["has_close_elements = lambda numbers, threshold: True\n",
             f"async def has_close_elements(numbers, threshold):\n    return {right}\n"]
    for v in he.score_many([(p, f"```python\n{code}```") for code in wrong], "chat", FAST):
        assert v.format_ok and not v.passed, v


def test_prompts_per_mode_and_stop_rule(tmp_path):
    tok = _tokenizer()
    p = BY_ID["HumanEval/2"]
    base = he.prompt_ids(tok, p, "fewshot")
    assert base[0] == tok.bos_id and tok.decode(base[1:]) == p.prompt
    chat = tok.decode(he.prompt_ids(tok, p, "chat"))
    assert p.prompt in chat and "Complete the Python function `truncate_number`" in chat
    assert he.prompt_ids(tok, p, "chat-think") != he.prompt_ids(tok, p, "chat")
    assert p.prompt in tok.decode(he.prompt_ids(tok, p, "r1-zero"))
    assert he.stop_rule(tok, "fewshot") == (list(he.STOP_SEQUENCES), [tok.bos_id])
    assert he.stop_rule(tok, "r1-zero")[0] == ["</answer>"] and he.stop_rule(tok, "chat") == ([], [])


# ---------------------------------------------------------------------- scoring in the sandbox

def test_canonical_solutions_pass_as_completions_and_as_chat_replies():
    items = [(BY_ID[i], BY_ID[i].canonical_solution) for i in SUBSET]
    verdicts = he.score_many(items, "fewshot", FAST)
    assert [v.reason for v in verdicts] == ["ok"] * len(SUBSET)
    assert all(v.passed and v.format_ok for v in verdicts)
    replies = [(BY_ID[i], f"<think>\nok\n</think>\n```python\n{whole_function(BY_ID[i])}```") for i in SUBSET[:5]]
    assert all(v.passed for v in he.score_many(replies, "chat", FAST))


@pytest.mark.slow
def test_all_164_canonical_solutions_pass():
    verdicts = he.score_many([(p, p.canonical_solution) for p in PROBLEMS], "fewshot",
                             he.HumanEvalSettings(workers=4))
    failed = [(p.id, v.reason) for p, v in zip(PROBLEMS, verdicts) if not v.passed]
    assert failed == []


def test_wrong_empty_and_broken_completions_fail():
    p, other = BY_ID["HumanEval/0"], BY_ID["HumanEval/2"]
    cases = {
        "": ("ok", False),                                        # the stub returns None: check fails
        "    return None\n": ("ok", False),
        "    return True\n": ("ok", False),                       # right on some asserts only
        "    return (\n": ("parse", False),
        "    x = = 1\n": ("parse", False),
        other.canonical_solution: ("ok", False),                  # another problem's solution
        "    raise ValueError('no')\n": ("ok", False),
    }
    verdicts = he.score_many([(p, t) for t in cases], "fewshot", FAST)
    for (text, (kind, _)), v in zip(cases.items(), verdicts):
        assert not v.passed, text
        assert v.format_ok == (kind != "parse"), (text, v)
    assert not he.score_sample(p, "I cannot solve this.", "chat", FAST).format_ok


# Each attack is a whole chat reply: top-level code runs before the test, the function is wrong.
WRONG = "def has_close_elements(numbers, threshold):\n    return True\n"
ATTACKS = {
    "exit": "exit(0)\n" + WRONG,
    "sys_exit": "import sys\nsys.exit(0)\n" + WRONG,
    "os_exit": "import os\nos._exit(0)\n" + WRONG,
    "raise_systemexit": "raise SystemExit(0)\n" + WRONG,
    "exit_in_function": "def has_close_elements(numbers, threshold):\n    import os\n    os._exit(0)\n",
    "systemexit_in_del": ("class Bomb:\n    def __del__(self):\n        raise SystemExit(0)\n"
                          "def has_close_elements(numbers, threshold):\n    b = Bomb()\n    del b\n    return True\n"),
    "redefine_check": ("import builtins\ndef check(candidate):\n    pass\nbuiltins.check = check\n" + WRONG),
    "patched_builtins": ("import builtins\nbuiltins.AssertionError = type('AE', (Exception,), {})\n"
                         "builtins.isinstance = lambda *a: True\nbuiltins.abs = lambda x: 0\n"
                         "builtins.len = lambda x: 0\n" + WRONG),
    "always_equal": ("class Eq(int):\n    def __eq__(self, other):\n        return True\n"
                     "    __hash__ = int.__hash__\n"
                     "class Obj:\n    def __eq__(self, other):\n        return True\n"
                     "def has_close_elements(numbers, threshold):\n"
                     "    return Obj() if len(numbers) % 2 else Eq(0)\n"),
    "fake_markers": ("import sys\nprint('ok'); print('PASSED'); print('{\"done\": true}')\n"
                     "sys.stdout.write('all tests passed\\n'); sys.stderr.write('ok\\n')\n"
                     "import os\nos.write(1, b'passed\\n')\n" + WRONG),
    # finds the report channel and its nonce by walking frames, forges reports and a done record
    "forged_reports": ("import sys, os, json\nf = sys._getframe()\nwhile f is not None and '_NONCE' not in f.f_globals:\n"
                       "    f = f.f_back\ng = f.f_globals\n"
                       "for i in range(64):\n"
                       "    os.write(g['_OUT'], (g['_NONCE'] + ' ' + json.dumps({'a': i, 'v': [['ok', True]]}) + '\\n').encode())\n"
                       "os.write(g['_OUT'], (g['_NONCE'] + ' ' + json.dumps({'done': True}) + '\\n').encode())\n"
                       "os._exit(0)\n" + WRONG),
    "fork": ("import os\nif os.fork() != 0:\n    os._exit(0)\n" + WRONG),
    "fork_in_call": ("import os\ndef has_close_elements(numbers, threshold):\n    if os.fork() == 0:\n"
                     "        os._exit(0)\n    return True\n"),
    "sleep": "import time\ntime.sleep(60)\n" + WRONG,
    "busy_loop": "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n",
    # reads the program file for a secret (a nonce) and answers on every descriptor with it
    "read_test_file": ("import os, re, json\nsrc = ''\nfor name in ('main.py', '/proc/self/cmdline', 'stdin.txt'):\n"
                       "    try:\n        src += open(name).read()\n    except OSError:\n        pass\n"
                       "for secret in re.findall(r\"_NONCE = '([0-9a-f]+)'\", src):\n"
                       "    print(secret)\n"
                       "    for fd in range(1, 20):\n"
                       "        try:\n            os.write(fd, (secret + ' ' + json.dumps({'done': True}) + '\\n').encode())\n"
                       "        except OSError:\n            pass\n"
                       "os._exit(0)\n" + WRONG),
    "write_files": ("import os\nfor name in ('main.py', 'result.json', '/tmp/passed', 'test.py'):\n"
                    "    try:\n        open(name, 'w').write('passed')\n    except OSError:\n        pass\n" + WRONG),
    "settrace": ("import sys\ndef tracer(frame, event, arg):\n"
                 "    if frame.f_code.co_name == 'check':\n        raise SystemExit(0)\n    return tracer\n"
                 "sys.settrace(tracer)\n" + WRONG),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_do_not_pass(name):
    p = BY_ID["HumanEval/0"]
    v = he.score_sample(p, f"```python\n{ATTACKS[name]}```", "chat", he.HumanEvalSettings(timeout_s=2.0))
    assert v.format_ok and not v.passed, v


def test_redefined_prompt_helper_does_not_change_the_test():
    # HumanEval/32's check calls the prompt's poly(); a reply that redefines poly as 0 and returns
    # anything would pass the official harness. Here the test uses the prompt's own poly.
    p = BY_ID["HumanEval/32"]
    cheat = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n"
    assert not he.score_sample(p, f"```python\n{cheat}```", "chat", FAST).passed
    # and HumanEval/38: an identity encoder and decoder
    p = BY_ID["HumanEval/38"]
    cheat = "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n"
    assert not he.score_sample(p, f"```python\n{cheat}```", "chat", FAST).passed


def test_expected_values_never_reach_the_sandbox():
    from nanoseek.tasks.assert_compile import compile_assert_test

    p = BY_ID["HumanEval/1"]          # separate_paren_groups: distinctive expected strings
    compiled = compile_assert_test(he.test_program(p), [p.entry_point])
    assert "'(()())', '((()))'" in p.test and "((()))'" not in compiled.source
    assert set(he.EXPOSED) == {q.id for q in PROBLEMS
                               if compile_assert_test(he.test_program(q), [q.entry_point]).exposed}


# ---------------------------------------------------------------------- through the harness

def _tokenizer():
    from nanoseek.data.tokenizer import Tokenizer

    return _TOK.setdefault("tok", Tokenizer.train([p.prompt + p.canonical_solution for p in PROBLEMS[:40]] * 2,
                                                  vocab_size=600, min_frequency=1))


_TOK: dict = {}


class CodeEngine:
    """An engine (``generate`` only) whose j-th sample of a problem is ``script(problem, j)``."""

    def __init__(self, tokenizer, script, max_seq_len=4096):
        self.tok, self.script, self.max_seq_len, self.max_batch_size = tokenizer, script, max_seq_len, 4
        self.served: dict[str, int] = {}
        self.params = []

    def generate(self, prompts, params):
        self.params.append(params)
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            p = next(q for q in reversed(PROBLEMS) if q.prompt in text)
            comps = []
            for _ in range(params.n):
                j = self.served.get(p.id, 0)
                self.served[p.id] = j + 1
                body = self.script(p, j)
                toks = self.tok.encode(body)
                comps.append(Completion(token_ids=toks, text=body, reasoning=None, answer=body, finish_reason="stop",
                                        prompt_tokens=len(ids), completion_tokens=len(toks), stop_reason="eos"))
            out.append(comps)
        return out


def test_pass_at_k_from_fabricated_sample_sets():
    # problem i gets c_i = i right of k = 4 samples (right ones first): pass@k is Chen et al.'s estimator
    tok = _tokenizer()
    ids = [0, 2, 4, 7, 12]

    def script(p, j):
        right = ids.index(p.index) if p.index in ids else 0
        return p.canonical_solution if j < right else "    return None\n"

    engine = CodeEngine(tok, script)
    res = evaluate(None, tok, "humaneval:0-12", engine=engine, mode="fewshot", k=4, keep_samples=1)
    by_id = {r.id: r for r in res.problems}
    want = {}
    for c, i in enumerate(ids):
        r = by_id[f"HumanEval/{i}"]
        assert sum(r.correct) == c and all(r.format_ok)
        for k in (1, 2, 4):
            expect = 1.0 if 4 - c < k else 1 - math.comb(4 - c, k) / math.comb(4, k)
            assert r.pass_at[k] == pytest.approx(expect)
            want.setdefault(k, []).append(expect)
    s = res.summary("humaneval")
    assert s["n"] == 13 and s["samples"] == 4
    # the other 8 problems never pass: the means over all 13
    assert s["pass@k"]["2"] == pytest.approx(sum(want[2]) / 13)
    assert s["pass@1"]["mean"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 4 / 13)
    assert s["pass@1"]["low"] < s["pass@1"]["mean"] < s["pass@1"]["high"]
    # HumanEval's stop sequences reached the engine; samples kept for the report
    assert all(sp.stop == list(he.STOP_SEQUENCES) for sp in engine.params)
    assert res.samples[0]["task"] == "humaneval" and res.samples[0]["gold"] == "has_close_elements"


def test_mixed_with_builtin_tasks_and_chat_mode():
    tok = _tokenizer()

    def script(p, j):
        if getattr(p, "task", "") == "humaneval":
            return f"<think>\nok\n</think>\n```python\n{whole_function(p)}```"
        return "<think>\nx\n</think>\nAnswer: 0"

    class Mixed(CodeEngine):
        def generate(self, prompts, params):
            out = []
            for ids in prompts:
                text = self.tok.decode(ids)
                if "```python" in text:
                    out += super().generate([ids], params)
                else:
                    body = "<think>\nx\n</think>\nAnswer: 0"
                    out.append([Completion(token_ids=[], text=body, reasoning=None, answer=body, finish_reason="stop",
                                           prompt_tokens=len(ids), completion_tokens=1, stop_reason="eos")] * params.n)
            return out

    res = evaluate(None, tok, ["arithmetic", "humaneval:3-5"], engine=Mixed(tok, script), mode="chat", k=2,
                   n_problems=3)
    assert res.task_names == ["arithmetic", "humaneval"]
    assert res.pass1("humaneval").mean == 1.0 and res.summary("humaneval")["n"] == 3
    assert res.summary()["n"] == 6
    # overlapping items evaluate each problem once
    res = evaluate(None, tok, "humaneval:3-4,humaneval:4-5", engine=Mixed(tok, script), mode="chat", k=1)
    assert [p.id for p in res.problems] == ["HumanEval/3", "HumanEval/4", "HumanEval/5"]
    assert any("evaluated once" in n for n in res.notes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/{pretrain,sft}/final: two tiny models with a long enough context, and a tokenizer."""
    from nanoseek.model.checkpoint import save_pretrained

    tok = _tokenizer()
    root = tmp_path_factory.mktemp("heval-run")
    for i, stage in enumerate(("pretrain", "sft")):
        save_pretrained(make_tiny_model(seed=i, vocab_size=tok.vocab_size, max_position_embeddings=2048).eval(),
                        root / stage / "final")
    tok.save(root)
    return root


ARGS = ["--tasks", "humaneval:2-3", "--k", "2", "--max-new-tokens", "8", "--batch-size", "4",
        "--max-seq-len", "1024"]


def test_eval_cli_end_to_end_on_a_tiny_model(run, capsys, tmp_path):
    from nanoseek.cli import main
    from nanoseek.eval.report import build_sections

    assert main(["eval", "--model", str(run), *ARGS]) == 0
    out = capsys.readouterr().out
    pre, sft = EvalResult.load(run / "pretrain" / "eval.json"), EvalResult.load(run / "sft" / "eval.json")
    assert pre.config["mode"] == "fewshot" and sft.config["mode"] == "chat"
    for res in (pre, sft):
        assert [p.id for p in res.problems] == ["HumanEval/2", "HumanEval/3"]
        assert res.pass1("humaneval").mean == 0.0 and res.pass1("humaneval").high > 0   # an interval, not a point
        assert res.summary("humaneval")["pass@k"] == {"1": 0.0, "2": 0.0}
        assert all(p.k == 2 and p.gold == BY_ID[p.id].entry_point for p in res.problems)
    assert "humaneval" in out and "A = pretrain" in out
    # the run report shows HumanEval rows like any task
    json.dumps(pre.to_dict())
    _, _, sections, _ = build_sections(run)
    text = json.dumps([s.__dict__ for s in sections], default=str)
    assert "humaneval" in text
    # bad specs are one-line user errors
    assert main(["eval", "--model", str(run / "sft" / "final"), "--tasks", "humaneval:500", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "humaneval:500" in err and "Traceback" not in err


def test_evaluation_is_deterministic(run):
    from nanoseek.infer.loading import load_for_inference

    model, tok = load_for_inference(run / "sft" / "final", tokenizer_path=run, device="cpu", require_tokenizer=True)
    kw = dict(mode="fewshot", k=2, max_new_tokens=8, batch_size=4, temperature=1.0, seed=3)
    a = evaluate(model, tok, "humaneval:2-3", max_seq_len=1024, **kw)
    b = evaluate(model, tok, "humaneval:2-3", max_seq_len=1024, **kw)
    assert [r.to_dict() for r in a.problems] == [r.to_dict() for r in b.problems]
    assert [s["response"] for s in a.samples] == [s["response"] for s in b.samples]
