"""Rule-based rewards for GRPO (R1-Zero / R1): format, accuracy, and how they combine.

DeepSeek-R1-Zero is trained with two rule-based rewards and no neural reward model (which could be
hacked): an *accuracy* reward (the final answer checks out: exact match, math equivalence, or
passing test cases for code) and a *format* reward (reasoning inside ``<think>...</think>``).

Format: :func:`nanoseek.tasks.reply.check_format` (R1's ``<think>`` format in the answer form
``config.template``: "r1" free text or "r1-zero" ``<answer>`` tags; ``think_prefilled`` when the
prompt ended in ``<think>``); :meth:`RewardConfig.for_template` picks both from a prompt template.

Combination (:func:`score`; :func:`score_external` for prompts with their own verifier)::

    reward = format_ok * (accuracy_weight * accuracy + format_weight)

with ``accuracy`` in [0, 1] (1/0 for answers, the fraction of tests passed for code), defaults
``accuracy_weight=1.0, format_weight=0.1``. A malformed response earns exactly 0 even when its
answer is right, and a well-formed wrong one earns only ``format_weight``, so neither reward can
be farmed alone. ``RewardResult.correct`` still reports whether the answer is right regardless of
format, which evaluation of base models (that never write ``<think>``) needs.

Accuracy by record kind:

* a built-in :class:`~nanoseek.tasks.generators.Problem` (or its dict form): ``extract_answer`` then the
  task's exact verifier, ``get_task(problem.task).verify``;
* ``{"answer": gold}`` (``kind="math"``): math-verify, gold first:
  ``verify(parse(gold), parse(answer))``. math-verify's timeouts use ``signal.alarm``, which only
  works in the main thread (and would cancel anyone else's alarm), so in any other thread, or
  while another timer runs, they are switched off (``parsing_timeout=None``,
  ``timeout_seconds=None``) and work is bounded instead by refusing answers longer than
  :data:`MAX_MATH_CHARS` or with huge or nested exponents/factorials. Hedged answers ("3 or 4")
  are wrong. Parse failures give 0, never an exception;
* ``{"tests": [...]}`` (``kind="code"``): the last fenced ```` ```python ```` block after
  ``</think>`` runs in :mod:`nanoseek.tasks.sandbox` against each test, one sandbox run per test.
  ``accuracy`` is the fraction passed, or all-or-nothing with ``code_all_or_nothing``.

  - ``{"stdin": ..., "stdout": ...}``: the program's output (trailing whitespace stripped per
    line, not truncated) must equal the expected one and it must exit 0. The expected output
    stays in this process.
  - an assertion snippet (a string, or ``{"assert": ...}``), with the record's optional
    ``entry_point`` (the function's name, or a list): this process evaluates every assert
    itself (:mod:`nanoseek.tasks.code_reward`). Each is split into a plan evaluated here and
    *slots*, the sub-expressions that need a name this process does not evaluate itself (the
    model's ``add(2, 3)``, a helper the test defines), which alone run in the sandbox and come
    back as tagged plain data on a nonce-framed private channel. Every other sub-expression
    (``2 * 3``, ``'ABC'.lower()``, ``list(range(3))``, ``Fraction(1, 2)``, ``type(...) == int``,
    ``all(x > 0 for x in ...)``) is computed here with bounded sizes and steps; ``for`` loops
    and comprehensions over such data are unrolled here, and ``CASES = [...]`` bound once stays
    here. The code cannot take over a builtin the test uses (``def abs``, ``isinstance = ...``)
    unless the record names it as ``entry_point``. The test passes when the run exited 0 in
    time, every assert was reported as often as its place demands and every plan holds here.

  Why this cannot be farmed: no assert runs in the model's process, so exiting early, patching
  builtins, hooks or ``AssertionError``, swallowing exceptions or forging reports (the nonce is
  framing, not a secret) leaves reports missing or carries values that must be right; and an
  expected value that does not depend on the model's code never enters the sandbox, so
  introspection (frames, gc, the program on disk) finds only the inputs. What still runs in the
  sandbox, and so can be read there: values computed by helpers, variables or modules the test
  itself defines or imports (other than ``math``, ``fractions``, ``decimal``, ``collections``),
  e.g. ``assert f(x) == brute(x)`` with ``brute`` defined by the test, and the data of a loop
  that cannot be unrolled. An assert with no model-dependent part (``assert sorted([3, 1]) ==
  [1, 3]`` without ``entry_point: "sorted"``) and a snippet with no model-dependent assert that
  must run are refused when the record loads (ValueError, one line).

:func:`score_batch` scores many responses from a thread pool (sandbox runs are processes; math
verification is thread-safe as above). :func:`build_reward_fn` is the reward function a
post-training stage (GRPO, distillation, DPO's sampled pairs) gets from its ``RewardConfig``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nanoseek.tasks.assert_compile import check_assert_test, compile_assert_test
from nanoseek.tasks.code_reward import run_assert_test
from nanoseek.tasks.generators import TASKS, Problem, get_task
from nanoseek.tasks.reply import ANSWER_FORMS, check_format, extract_answer, reward_format

MAX_MATH_CHARS = 300


@dataclass(frozen=True)
class RewardConfig:
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    template: str = "r1"           # "r1": free-text or <answer> tags after </think>; "r1-zero": tags
    think_prefilled: bool = False  # the prompt ended with "<think>"; the response continues it
    min_think_chars: int = 0       # minimum non-space characters inside <think>...</think>
    code_all_or_nothing: bool = False
    code_timeout_s: float = 5.0
    code_memory_mb: int = 256
    math_timeout_s: int = 5        # math-verify timeouts, main thread with no other timer only

    def __post_init__(self) -> None:
        if self.template not in ANSWER_FORMS:
            raise ValueError(f"RewardConfig.template must be 'r1' or 'r1-zero', got {self.template!r}")

    @classmethod
    def for_template(cls, template: str, **kwargs: Any) -> "RewardConfig":
        """The rewards of replies to prompts in ``template`` (a prompt template of
        :mod:`nanoseek.tasks.reply`): its answer form and whether ``<think>`` was pre-filled."""
        form, prefilled = reward_format(template)
        return cls(template=form, think_prefilled=prefilled, **kwargs)


@dataclass
class RewardResult:
    reward: float
    format_ok: bool
    correct: bool               # the answer is right, whatever the format (reward gates it)
    answer: str | None          # the extracted answer (or code) that was checked
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- math


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once when its timeouts are off; we bound the work ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())

# exponents of 4+ digits, exponents inside exponents, factorials of 4+ digit numbers
HUGE_POWER_RE = re.compile(r"(\^|\*\*)\s*[{(]?\s*\d{4,}|(\^|\*\*)\s*[{(][^})]*(\^|\*\*)|"
                            r"(\^|\*\*)\s*\d+\s*(\^|\*\*)|\d{4,}\s*!")
_HEDGE_RE = re.compile(r"\bor\b", re.I)


def alarm_is_free() -> bool:
    """math-verify's timeouts use SIGALRM: only in the main thread, and only when no one else has a
    timer running (its ``alarm(0)`` would cancel it, e.g. pytest-timeout's or a trainer's)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


class ScoreTimeout(Exception):
    """A grade ran past :func:`time_limit`."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise :class:`ScoreTimeout` after ``seconds`` (SIGALRM, as math-verify's timeouts) where
    :func:`alarm_is_free`; elsewhere no limit (a caller's size guards still hold)."""
    if not alarm_is_free():
        yield
        return

    def expire(signum, frame):
        raise ScoreTimeout()

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def math_correct(answer: str | None, gold: str, timeout_s: int | None = 5) -> bool:
    """Is ``answer`` mathematically equal to ``gold`` (math-verify, gold first)? Never raises.
    ``timeout_s`` applies only when :func:`alarm_is_free`; size guards apply always."""
    if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_MATH_CHARS:
        return False
    if _HEDGE_RE.search(answer) or HUGE_POWER_RE.search(answer):
        return False
    t = timeout_s if alarm_is_free() else None
    try:
        from math_verify import parse, verify

        def parse_any(x: str) -> list:
            return parse(f"${x}$", parsing_timeout=t) or parse(x, parsing_timeout=t)

        g, a = parse_any(str(gold)), parse_any(answer)
        return bool(g and a and verify(g, a, timeout_seconds=t))
    except Exception:  # math-verify raises on a few inputs even with raise_on_error=False
        return False


# ----------------------------------------------------------------------------- code

_FENCE_RE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str | None:
    """The last ```` ```python ```` block after ``</think>`` (else the last untagged block)."""
    if not isinstance(response, str):
        return None
    region = response.rsplit("</think>", 1)[1] if "</think>" in response else response
    blocks = _FENCE_RE.findall(region)
    for lang in (("python", "py", "python3"), ("",)):
        picked = [code for tag, code in blocks if tag.lower() in lang]
        if picked and picked[-1].strip():
            return picked[-1]
    return None


def _normalise_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


_EXPOSED_WARNED: set[str] = set()


def _classify_test(i: int, t: Any) -> tuple[str, Any]:
    """("assert", snippet) or ("io", record) for code test #``i``; ValueError for any other shape."""
    if isinstance(t, str) or (isinstance(t, dict) and "assert" in t):
        snippet = t if isinstance(t, str) else t["assert"]
        if not isinstance(snippet, str):
            raise ValueError(f"code test #{i}: the assertion must be a string")
        return "assert", snippet
    if isinstance(t, dict) and ("stdout" in t or "output" in t):
        return "io", t
    raise ValueError(f"code test #{i} must be an assertion string, {{'assert': ...}} or "
                     f"{{'stdin': ..., 'stdout': ...}}; got {str(t)[:80]!r}")


def check_code_tests(tests: Any, entry_point: Any = None) -> None:
    """ValueError naming the first test a code record cannot be scored with (wrong shape, an
    assertion that does not parse, has no assert that must run or an assert that does not
    depend on the code: :func:`~nanoseek.tasks.assert_compile.compile_assert_test`): datasets call
    this when they load, so a bad test is an error at load time, not in the middle of a GRPO
    run. ``entry_point``: the record's function name(s), model-owned even when a builtin's.
    Logs a warning, once per test, when an assert compares two values the sandbox computes
    (its expected values are visible to the model's code)."""
    if not isinstance(tests, list) or not tests:
        raise ValueError("a 'code' record needs a non-empty 'tests' list")
    for i, t in enumerate(tests):
        kind, snippet = _classify_test(i, t)
        if kind == "assert":
            try:
                compiled = check_assert_test(snippet, entry_point)
            except ValueError as e:
                raise ValueError(f"code test #{i}: {e}") from None
            if compiled.exposed and snippet not in _EXPOSED_WARNED:
                _EXPOSED_WARNED.add(snippet)
                logging.getLogger(__name__).warning(
                    "code test #%d (%r...): this test's expected values are visible to the model's "
                    "code (an assert compares two values computed in the sandbox, e.g. inside a "
                    "test-defined function); write it at the top level with literal expected "
                    "values", i, snippet[:60])


def run_tests(code: str, tests: Sequence[Any], cfg: RewardConfig,
              entry_point: Any = None) -> tuple[float, list[dict]]:
    """Run ``code`` against each test in the sandbox; (fraction passed, per-test details)."""
    from nanoseek.tasks.sandbox import run_code

    if not tests:
        raise ValueError("code record has an empty 'tests' list")
    details = []
    for i, t in enumerate(tests):
        kind, snippet = _classify_test(i, t)
        if kind == "assert":
            try:
                passed, detail = run_assert_test(code, snippet, cfg.code_timeout_s,
                                                 cfg.code_memory_mb, entry_point)
            except ValueError as e:
                raise ValueError(f"code test #{i}: {e}") from None
        else:
            stdin = t.get("stdin", t.get("input", ""))
            want = t.get("stdout", t.get("output"))
            r = run_code(code, str(stdin), cfg.code_timeout_s, cfg.code_memory_mb)
            passed = r.returncode == 0 and not r.timed_out and not r.stdout_truncated and \
                _normalise_output(r.stdout) == _normalise_output(str(want))
            detail = {"passed": passed, "reason": "ok" if passed else "output differs or exit "
                      "status not 0", "returncode": r.returncode, "killed_reason": r.killed_reason,
                      "stderr_tail": r.stderr[-300:]}
        details.append(detail)
        if not passed and cfg.code_all_or_nothing:
            break
    n_passed = sum(d["passed"] for d in details)
    if cfg.code_all_or_nothing:
        return float(n_passed == len(tests)), details
    return n_passed / len(tests), details


# ----------------------------------------------------------------------------- dispatch


def record_kind(record: Any) -> str:
    """"task", "math" or "code" for a Problem or a record dict; ValueError otherwise."""
    if isinstance(record, Problem):
        return "task"
    if isinstance(record, dict):
        if record.get("task") in TASKS:  # a Problem as a dict (from_dict names missing fields)
            return "task"
        if "tests" in record:
            return "code"
        if "answer" in record:
            return "math"
        raise ValueError(f"cannot score against record with keys {sorted(record)}: need a task "
                         "Problem, 'tests' (code) or 'answer' (math)")
    raise ValueError(f"cannot score against {type(record).__name__}: need a Problem or a dict")


def score(response: str, problem_or_record: Problem | dict, config: RewardConfig | None = None,
          *, kind: str | None = None) -> RewardResult:
    """Reward one response; see the module docstring for the rules and the combination."""
    cfg = config or RewardConfig()
    kind = kind or record_kind(problem_or_record)
    fmt_ok, fmt_reason = check_format(response, cfg.template, cfg.think_prefilled,
                                      cfg.min_think_chars)
    info: dict[str, Any] = {"kind": kind, "format_reason": fmt_reason}
    text = response if isinstance(response, str) else ""
    if kind == "task":
        problem = problem_or_record if isinstance(problem_or_record, Problem) else \
            Problem.from_dict(problem_or_record)
        answer = extract_answer(text)
        accuracy = float(answer is not None and get_task(problem.task).verify(answer, problem))
    elif kind == "math":
        rec = problem_or_record if isinstance(problem_or_record, dict) else {
            "answer": problem_or_record.answer}
        answer = extract_answer(text)
        accuracy = float(math_correct(answer, str(rec["answer"]), cfg.math_timeout_s))
    elif kind == "code":
        rec = problem_or_record
        answer = extract_code(text)
        tests = rec.get("tests") if isinstance(rec, dict) else None
        if not isinstance(tests, (list, tuple)) or not tests:
            raise ValueError("code record needs a non-empty 'tests' list")
        entry = rec.get("entry_point") if isinstance(rec, dict) else None
        accuracy, details = run_tests(answer, tests, cfg, entry) if answer is not None else (0.0, [])
        info["tests_total"] = len(tests)
        info["tests_passed"] = sum(d["passed"] for d in details)
        info["tests"] = details
    else:
        raise ValueError(f"kind must be 'task', 'math' or 'code', got {kind!r}")
    info["accuracy"] = accuracy
    reward = float(fmt_ok) * (cfg.accuracy_weight * accuracy + cfg.format_weight)
    return RewardResult(reward=reward, format_ok=fmt_ok, correct=accuracy == 1.0, answer=answer,
                        info=info)


def score_batch(responses: Sequence[str], problems: Sequence[Problem | dict] | Problem | dict,
                config: RewardConfig | None = None, max_workers: int = 4) -> list[RewardResult]:
    """Score ``responses`` in a thread pool, in order. ``problems`` is one record per response,
    or a single record shared by all (a GRPO group)."""
    if isinstance(problems, (Problem, dict)):
        problems = [problems] * len(responses)
    if len(problems) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
    if max_workers <= 1 or len(responses) <= 1:
        return [score(r, p, config) for r, p in zip(responses, problems)]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda rp: score(rp[0], rp[1], config), zip(responses, problems)))


# texts, prompts -> one RewardResult per text
RewardFn = Callable[[list[str], list[Any]], list[RewardResult]]


def score_external(response: str, score_answer: Callable[[str | None], float],
                   config: RewardConfig | None = None,
                   extract: Callable[[str], str | None] | None = None) -> RewardResult:
    """Reward one response whose accuracy an outside verifier gives (reasoning-gym's
    ``score_answer(extracted answer) -> [0, 1]``), with the same format rule and combination;
    ``extract``: the task's own answer extraction (default :func:`extract_answer`).

    The accuracy reward is earned only by a solve (a grade of 1.0), as for the built-in tasks: a
    grade below it is kept in ``info["score"]`` and pays nothing. reasoning-gym's default grader gives
    ``len(gold) / len(answer)`` to any answer that *contains* the gold as a substring, so a policy
    paid partial credit learns to write long strings of digits: from a cold start GRPO moved to
    calling the calculator with invented numbers on every reasoning-gym prompt and its held-out score
    fell from 27% to 3% (docs/speedrun-history.md, recipe 6)."""
    cfg = config or RewardConfig()
    ok, reason = check_format(response, cfg.template, cfg.think_prefilled, cfg.min_think_chars)
    answer = (extract or extract_answer)(response)
    grade = float(score_answer(answer))
    solved = grade >= 1.0
    return RewardResult(reward=float(ok) * (cfg.accuracy_weight * float(solved) + cfg.format_weight), format_ok=ok,
                        correct=solved, answer=answer, info={"format_reason": reason, "score": grade})


def build_reward_fn(config: RewardConfig, workers: int = 4) -> RewardFn:
    """The rule-based reward function of a post-training stage: ``fn(texts, prompts)`` scores each
    text against its prompt (an RLPrompt: ``record()`` for :func:`score`, or its own
    ``score_answer`` for reasoning-gym prompts, :func:`score_external`), the built-in ones in a
    pool of ``workers`` threads (:func:`score_batch`)."""

    def fn(texts: list[str], items: list[Any]) -> list[RewardResult]:
        out: list[Any] = [None] * len(texts)
        plain = [i for i, it in enumerate(items) if it.score_answer is None]
        if plain:
            scored = score_batch([texts[i] for i in plain], [items[i].record() for i in plain], config,
                                 max_workers=workers)
            for i, r in zip(plain, scored):
                out[i] = r
        for i, it in enumerate(items):
            if it.score_answer is not None:
                out[i] = score_external(texts[i], it.score_answer, config, getattr(it, "extract", None))
        return out

    return fn


__all__ = ["RewardConfig", "RewardResult", "RewardFn", "math_correct", "extract_code", "compile_assert_test",
           "run_assert_test", "run_tests", "record_kind", "score", "score_batch", "score_external", "build_reward_fn"]
