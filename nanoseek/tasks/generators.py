"""Built-in verifiable reasoning tasks: seeded generators, worked solutions, exact verifiers.

R1-Zero learns to reason from rule-based rewards alone: the answer of every training question can be
checked by a program. At nanoseek's scale (a ~1-10M parameter MoE trained for minutes on a CPU) no
public benchmark is learnable, so these tasks are generated: each has difficulty ``levels`` whose
first level is genuinely easy (single-digit sums, two-number Countdown, one-step word problems), so
held-out accuracy can move measurably from the base model to SFT to GRPO.

Every :class:`Problem` carries the question (``prompt``), the gold ``answer`` and a worked
``reasoning`` (the steps that become the ``<think>`` trace of cold-start SFT data). Three consumers:

* pre-training: :func:`corpus_document` renders question, steps and ``Answer: X``;
* SFT cold start: :func:`nanoseek.tasks.reply.format_response` renders ``<think>steps</think>``
  and the answer (the reply format, prompts included, lives in :mod:`nanoseek.tasks.reply`);
* GRPO and evaluation: ``Task.generate("train"|"test", n, seed)`` and ``Task.verify``.

Wordings (:mod:`nanoseek.tasks.phrasing`): ``generate(..., phrasing="varied")``, the default, asks each
problem in the original wording or one of many others (frames, operators in words, lead-ins,
endings) and draws the numbers a person would use at the level (arithmetic L1-L2: differences below
zero, mixed digit counts); ``phrasing="fixed"`` keeps the one original template and ranges, the draws
of before. A task spec item picks it with ``@fixed`` / ``@varied`` (:func:`parse_task_items`).
Evaluation asks in the original wording (:class:`nanoseek.tasks.sources.BuiltinSource`);
:meth:`Task.reword` asks a held-out problem in another wording group (the robustness table).

Train and test are disjoint by construction: a problem belongs to ``"test"`` iff a hash of its
canonical content (the underlying numbers, not the surface wording, so the same sum asked with
other names cannot leak) falls in a fixed 20 % bucket range; ``generate`` draws until it has ``n``
problems of the requested split; the wording is drawn from a generator of its own after the
problem, so it never decides the split and a paraphrase of a held-out problem is held out too.
Generation is deterministic per ``(task, split, seed, level, phrasing)``.
With ``level=None`` the levels are mixed in equal shares, except that a level whose space of
distinct problems runs out leaves the rotation and the other levels fill in (arithmetic L1 holds
only ~41 test problems). By default the problems of one call are distinct; a single requested
level, or all levels, running out raises instead of silently repeating (pass ``unique=False``
for large training sets drawn from small levels; repeats then share an ``id``).

Tool use: ``Task.tool_call(problem)`` is the ideal tool call for a problem (None: no tool helps);
``arithmetic`` and ``big_arithmetic`` (sums and products of large numbers, beyond what a model of this
size learns in its head) call the ``calculator`` on the question's expression. The tool-using SFT trace
is :func:`nanoseek.tasks.reply.tool_sft_messages`, made with the real tool.

Verifiers take the *extracted* answer string (see :func:`nanoseek.tasks.reply.extract_answer`) and never raise: hedges
("7 or 8"), empty ``\\boxed{}``, absurdly long numbers and, in Countdown, anything but decimal
integers, ``+ - * /`` and parentheses are simply wrong. Countdown expressions are checked with
``ast`` on a whitelist, never ``eval``.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any, Callable, Sequence

from nanoseek.tasks.phrasing import DEFAULT_PHRASING, check_phrasing, reword, training_wording

TEST_PER_MILLE = 200  # share of every task's problem space held out for "test" (20 %)
SPLITS = ("train", "test")
MAX_ANSWER_CHARS = 200  # longer "answers" are rejected unparsed (no huge-number or parser blowups)

@dataclass(frozen=True)
class Problem:
    task: str       # task name, a key of TASKS
    id: str         # f"{task}-{split}-L{level}-{hash of canonical content}", stable across runs
    prompt: str     # the question as a user would ask it
    answer: str     # gold final answer
    reasoning: str  # worked solution steps, one per line (the <think> trace)
    level: int
    canonical: str = ""  # the underlying problem (decides the split; the same under every wording), "" unknown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Problem":
        missing = [k for k in ("task", "id", "prompt", "answer", "reasoning", "level") if k not in d]
        if missing:
            raise ValueError(f"problem record lacks field(s) {missing}: {str(d)[:120]}")
        return cls(task=str(d["task"]), id=str(d["id"]), prompt=str(d["prompt"]),
                   answer=str(d["answer"]), reasoning=str(d["reasoning"]), level=int(d["level"]),
                   canonical=str(d.get("canonical", "")))


@dataclass(frozen=True)
class _Draft:
    canonical: str  # the underlying math; decides the split and uniqueness
    prompt: str
    answer: str
    reasoning: str


def split_of(task: str, canonical: str) -> str:
    """The split a problem belongs to, a pure function of its task and canonical content."""
    h = hashlib.sha256(f"{task}\x00{canonical}".encode()).digest()
    return "test" if int.from_bytes(h[:4], "big") % 1000 < TEST_PER_MILLE else "train"


# ----------------------------------------------------------------------------- answer parsing

NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"  # 7, -3.5, 1,000, 14/2 (reply.extract_answer too)
_NUM_RE = re.compile(rf"^({NUMBER})$")
_NUM_UNITS_RE = re.compile(rf"^({NUMBER})(?:\s+[A-Za-z][A-Za-z ]{{0,30}})?$")
# words that make the trailing text after a number another answer, not its unit
_HEDGE_WORDS = frozenset(
    "or and maybe perhaps possibly plus minus to either nor than also probably not".split()
    + "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
      "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
      "thousand million billion half third quarter".split())


def _strip_wrappers(text: str) -> str:
    s = text.strip()
    for _ in range(3):  # peel nested wrappers like $\boxed{5}$
        before = s
        m = re.fullmatch(r"\\boxed\{(.*)\}", s, re.S)
        if m:
            s = m.group(1).strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        m = re.fullmatch(r"\\\((.*)\\\)", s, re.S)
        if m:
            s = m.group(1).strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    return s


def parse_number(text: str, allow_units: bool = False) -> Fraction | None:
    """The number ``text`` states, or None: exactly one number, optionally in ``$``/``\\boxed{}``,
    with a trailing period, thousands commas, a decimal point or ``a/b``; with ``allow_units`` a
    trailing word like "apples" or "km" (not one that makes it a hedge or a second number: "5 or
    seven", "5 and also eleven"). Anything else ("7 or 8", "", "12abc") is None."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = _strip_wrappers(text).replace("\u2212", "-")   # a typographic minus: "−12"
    if s.startswith("$"):  # currency: "$12"
        s = s[1:].strip()
    m = (_NUM_UNITS_RE if allow_units else _NUM_RE).match(s)
    if not m or len(m.group(1)) > 40:
        return None
    if allow_units and _HEDGE_WORDS & set(s[m.end(1):].lower().split()):
        return None                        # "5 or seven", "5 apples or maybe nine": a hedge, not a unit
    try:
        return Fraction(m.group(1).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


# ----------------------------------------------------------------------------- the task base


class Task:
    """One family of verifiable problems. Subclasses define ``name``, ``levels`` and ``sample``."""

    name: str = ""
    description: str = ""
    levels: tuple[int, ...] = (1, 2, 3)
    max_misses: int = 3000  # consecutive draws without a new problem before a level is "exhausted"

    def sample(self, rng: random.Random, level: int) -> _Draft:
        raise NotImplementedError

    def sample_broad(self, rng: random.Random, level: int) -> _Draft:
        """A problem of the ``varied`` phrasing: the numbers a person would use at ``level`` (default:
        :meth:`sample`'s; arithmetic adds negative differences and mixed digit counts)."""
        return self.sample(rng, level)

    def tool_call(self, problem: Problem) -> tuple[str, dict[str, Any]] | None:
        """The ideal tool call for ``problem``: (tool name, arguments), or None when no tool helps.
        The tool-using SFT trace (:func:`nanoseek.tasks.reply.tool_sft_messages`) makes this call
        with the real tool and answers with its output."""
        return None

    def check(self, response_answer: str, problem: Problem) -> bool:
        """Exact check of a response answer; may raise on garbage (``verify`` guards it)."""
        value = parse_number(response_answer, allow_units=False)
        return value is not None and value == Fraction(problem.answer)

    def verify(self, response_answer: str, problem: Problem) -> bool:
        """True iff ``response_answer`` (an extracted answer string) is right. Never raises."""
        if not isinstance(response_answer, str) or len(response_answer) > MAX_ANSWER_CHARS:
            return False
        try:
            return bool(self.check(response_answer, problem))
        except Exception:  # a verifier must not crash a training step on adversarial text
            return False

    def generate(self, split: str, n: int, seed: int = 0, level: int | Sequence[int] | None = None,
                 unique: bool = True, allow_fewer: bool = False, phrasing: str = DEFAULT_PHRASING) -> list[Problem]:
        """``n`` problems of ``split``, deterministic per (split, seed, level, phrasing); see module doc.
        ``level``: one level, several (mixed in equal shares like ``None``, which means all).
        ``allow_fewer``: when the space runs out, return the distinct problems found instead of
        raising (held-out sets of small levels: modular L1 has ~80 test problems). ``phrasing``:
        ``"varied"`` words each problem in the original or a seen wording and draws the broad number
        ranges (:mod:`nanoseek.tasks.phrasing`); ``"fixed"``: the original wording and ranges, as before."""
        check_phrasing(phrasing, f"task {self.name!r}")
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        chosen = [level] if isinstance(level, int) else list(level) if level is not None else list(self.levels)
        if not chosen or any(lv not in self.levels for lv in chosen):
            raise ValueError(f"task {self.name!r}: level must be one of {self.levels}, got {level!r}")
        if n < 0:
            raise ValueError(f"task {self.name!r}: n must be >= 0, got {n}")
        # the seed names one level, None for all levels (the same draws as asking for none), or the list
        key = chosen[0] if len(chosen) == 1 else None if chosen == list(self.levels) else chosen
        rng = random.Random(f"{self.name}/{split}/{seed}/{key}")
        varied = phrasing == "varied"
        sample = self.sample_broad if varied else self.sample
        wording = random.Random(f"{self.name}/{split}/{seed}/{key}/wording")   # apart: wording never moves the numbers
        levels = chosen
        seen: set[str] = set()
        out: list[Problem] = []
        active, i = list(levels), 0
        while len(out) < n:
            lv = active[i % len(active)]
            for _ in range(self.max_misses):
                d = sample(rng, lv)
                if split_of(self.name, d.canonical) == split and not (unique and d.canonical in seen):
                    break
            else:
                if len(active) > 1:  # mixed levels: the others fill in
                    active.remove(lv)
                    continue
                if allow_fewer:      # the caller takes every distinct problem there is
                    break
                raise ValueError(
                    f"task {self.name!r} level {lv}: no new {split!r} problem in {self.max_misses} "
                    f"draws after {sum(p.level == lv for p in out)} distinct ones; the level's space "
                    "is exhausted: ask for fewer, or pass unique=False to allow repeats")
            i += 1
            seen.add(d.canonical)
            h = hashlib.sha256(f"{self.name}\x00{d.canonical}".encode()).hexdigest()[:10]
            prompt = training_wording(self.name, d.canonical, d.prompt, wording) if varied else d.prompt
            out.append(Problem(task=self.name, id=f"{self.name}-{split}-L{lv}-{h}", prompt=prompt,
                               answer=d.answer, reasoning=d.reasoning, level=lv, canonical=d.canonical))
        if len(levels) > 1:
            rng.shuffle(out)
        return out

    def reword(self, problem: Problem, group: str, seed: int = 0) -> Problem:
        """``problem`` (drawn in the ``fixed`` phrasing: its prompt is the original wording) asked in a
        wording of ``group`` ("original", "seen", "unseen"; :mod:`nanoseek.tasks.phrasing`), chosen per
        (seed, problem id, group): the same id, answer, steps and split, another prompt."""
        if not problem.canonical:
            raise ValueError(f"{problem.id}: a problem without its canonical content cannot be reworded")
        rng = random.Random(f"{problem.id}/{group}/{seed}")
        prompt = reword(self.name, problem.canonical, problem.prompt, group, rng)
        return replace(problem, prompt=prompt)

    def __repr__(self) -> str:
        return f"<Task {self.name} levels={self.levels}>"


# ----------------------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b}


class Arithmetic(Task):
    """Multi-step integer arithmetic, solved one operation per line (``*`` before ``+``/``-``).

    L1: single-digit addition facts and their inverse subtractions ("7 + 5", "12 - 5");
    L2: two 2-digit numbers; L3: three 2-digit numbers; L4: four numbers, one product.
    Intermediate results are never negative.
    """

    name = "arithmetic"
    description = "multi-step integer arithmetic with worked steps"
    levels = (1, 2, 3, 4)

    def _terms(self, rng: random.Random, level: int) -> list:
        if level == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            return [a, "+", b] if rng.random() < 0.5 else [a + b, "-", b]
        if level in (2, 3):
            terms: list = [rng.randint(10, 99)]
            for _ in range(level - 1):
                terms += [rng.choice("+-"), rng.randint(10, 99)]
            return terms
        k = rng.randrange(3)  # position of the single product among three operators
        terms = [rng.randint(10, 99)]
        for j in range(3):
            terms += ["*", rng.randint(2, 9)] if j == k else [rng.choice("+-"), rng.randint(1, 99)]
        return terms

    def _broad_terms(self, rng: random.Random, level: int) -> list:
        """Two-term problems over every 1-2 digit pair, differences below zero included."""
        if level == 1:
            return [rng.randint(0, 9), rng.choice("+-"), rng.randint(0, 9)]
        a, b = ([rng.randint(10, 99) if rng.random() < 0.75 else rng.randint(0, 9) for _ in range(2)])
        if a < 10 and b < 10:
            a = rng.randint(10, 99)
        return [a, rng.choice("+-"), b]

    def sample(self, rng: random.Random, level: int) -> _Draft:
        return self._draft(rng, level, self._terms, allow_negative=False)

    def sample_broad(self, rng: random.Random, level: int) -> _Draft:
        if level > 2:
            return self.sample(rng, level)
        # half the draws from the original ranges, half over every pair (a third of those below zero)
        return (self._draft(rng, level, self._broad_terms, allow_negative=True) if rng.random() < 0.5
                else self.sample(rng, level))

    def _draft(self, rng: random.Random, level: int, terms_of, allow_negative: bool) -> _Draft:
        while True:
            terms = terms_of(rng, level)
            steps, value = _solve_left_to_right(terms, allow_negative)
            if value is not None:
                break
        expr = " ".join(map(str, terms))
        return _Draft(canonical=expr, prompt=f"What is {expr}?", answer=str(value),
                      reasoning="\n".join(steps))

    def tool_call(self, problem: Problem) -> tuple[str, dict[str, Any]] | None:
        return _calculator_call(problem)


_WHAT_IS_RE = re.compile(r"^What is (.+)\?$")


def _calculator_call(problem: Problem) -> tuple[str, dict[str, Any]] | None:
    """``calculator`` on the problem's expression: its canonical content (any wording), else the
    expression of a "What is EXPR?" question (a record without it)."""
    if problem.canonical:
        return ("calculator", {"expression": problem.canonical})
    m = _WHAT_IS_RE.match(problem.prompt)
    return ("calculator", {"expression": m.group(1)}) if m else None


class BigArithmetic(Task):
    """Arithmetic on numbers too large for head math at nanoseek's scale: the tool task.

    L1: the sum of two 4-5 digit numbers; L2: a 3-digit times a 2-digit number; L3: a 3-digit
    times a 3-digit number plus a 4-digit one. A ~1M-parameter model does not learn these in its
    head in minutes (the speedrun's curriculum stops at two 2-digit numbers); with the
    ``calculator`` tool (:meth:`tool_call`) the policy to learn is copying the expression into a
    call and the output into the answer. The worked ``reasoning`` (for head-math traces and the
    corpus) is the one-line result, as there is no short derivation to imitate.
    """

    name = "big_arithmetic"
    description = "sums and products of large numbers (beyond head math: the calculator tool's task)"
    levels = (1, 2, 3)

    def sample(self, rng: random.Random, level: int) -> _Draft:
        if level == 1:
            expr = f"{rng.randint(1000, 99999)} + {rng.randint(1000, 99999)}"
        elif level == 2:
            expr = f"{rng.randint(100, 999)} * {rng.randint(11, 99)}"
        else:
            expr = f"{rng.randint(100, 999)} * {rng.randint(100, 999)} + {rng.randint(1000, 9999)}"
        value = _eval_int(expr)
        return _Draft(canonical=expr, prompt=f"What is {expr}?", answer=str(value),
                      reasoning=f"{expr} = {value}")

    def tool_call(self, problem: Problem) -> tuple[str, dict[str, Any]] | None:
        return _calculator_call(problem)


def _eval_int(expr: str) -> int:
    """The value of an expression of integers, ``+ - *`` (products first), exactly."""
    terms: list = [int(t) if t.isdigit() else t for t in expr.split()]
    steps, value = _solve_left_to_right(terms)
    if value is None:
        raise ValueError(f"negative intermediate result in {expr!r}")
    return value


def _solve_left_to_right(terms: list, allow_negative: bool = False) -> tuple[list[str], int | None]:
    """Steps evaluating ``terms`` (products first, then left to right); value None if any
    intermediate result is negative (unless ``allow_negative``)."""
    terms, steps = list(terms), []
    while "*" in terms:
        i = terms.index("*")
        a, b = terms[i - 1], terms[i + 1]
        steps.append(f"{a} * {b} = {a * b}")
        terms[i - 1:i + 2] = [a * b]
    value = terms[0]
    for op, b in zip(terms[1::2], terms[2::2]):
        new = value + b if op == "+" else value - b
        steps.append(f"{value} {op} {b} = {new}")
        if new < 0 and not allow_negative:
            return steps, None
        value = new
    return steps, value


# ----------------------------------------------------------------------------- countdown

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_COUNTDOWN_PROMPT_RE = re.compile(r"Using the numbers ([\d, ]+), make (\d+)\.")
_COUNTDOWN_CHARS_RE = re.compile(r"^[\d\s+\-*/()]+$")


@dataclass(frozen=True)
class _Node:
    value: Fraction
    text: str
    prec: int  # 3 for a bare number


def _combine(a: _Node, op: str, b: _Node) -> _Node:
    p = _PREC[op]
    left = f"({a.text})" if a.prec < p else a.text
    right = f"({b.text})" if b.prec < p or (b.prec == p and op in "-/") else b.text
    return _Node(_OPS[op](a.value, b.value), f"{left} {op} {right}", p)


class Countdown(Task):
    """Countdown: reach a target with ``+ - * /`` using each given number at most once.

    L1: two numbers up to 30, target by ``+`` or ``-``; L2: three numbers up to 20, all used in the
    gold solution; L3: four numbers up to 50, three or four used. Gold solutions keep every
    intermediate result a positive integer; the verifier accepts any expression whose exact value
    is the target (fractions in between are allowed) and that uses only the given numbers.
    """

    name = "countdown"
    description = "reach a target number with + - * / using each given number at most once"
    levels = (1, 2, 3)

    def sample(self, rng: random.Random, level: int) -> _Draft:
        count, top, lo_hi = {1: (2, 30, (1, 60)), 2: (3, 20, (1, 100)), 3: (4, 50, (1, 200))}[level]
        ops = "+-" if level == 1 else "+-*/"
        while True:
            numbers = [rng.randint(1, top) for _ in range(count)]
            used = numbers if level < 3 else rng.sample(numbers, rng.choice((3, 4)))
            nodes = [_Node(Fraction(x), str(x), 3) for x in used]
            steps: list[str] = []
            while len(nodes) > 1:
                i, j = rng.sample(range(len(nodes)), 2)
                a, b = nodes[i], nodes[j]
                op = rng.choice(ops)
                if op == "-" and a.value <= b.value:
                    a, b = b, a
                if (op == "-" and a.value == b.value) or (op == "/" and a.value % b.value != 0):
                    break
                node = _combine(a, op, b)
                steps.append(f"{a.value} {op} {b.value} = {node.value}")
                nodes = [x for k, x in enumerate(nodes) if k not in (i, j)] + [node]
            if len(nodes) != 1:
                continue
            target = nodes[0].value
            if lo_hi[0] <= target <= lo_hi[1] and target not in numbers:
                break
        shown = ", ".join(map(str, numbers))
        expr = nodes[0].text
        prompt = (f"Using the numbers {shown}, make {target}. "
                  "Use + - * / and each number at most once.")
        reasoning = "\n".join([f"Numbers: {shown}. Target: {target}."] + steps
                              + [f"So {expr} = {target}."])
        canonical = f"{sorted(numbers)}->{target}"
        return _Draft(canonical=canonical, prompt=prompt, answer=expr, reasoning=reasoning)

    def check(self, response_answer: str, problem: Problem) -> bool:
        m = _COUNTDOWN_PROMPT_RE.search(problem.prompt)
        if not m:
            return False
        numbers = [int(x) for x in m.group(1).split(",")]
        target = Fraction(int(m.group(2)))
        s = _strip_wrappers(response_answer).replace("×", "*").replace("÷", "/").replace("−", "-")
        sides = [x.strip() for x in s.split("=")]
        if len(sides) > 2:
            return False
        if len(sides) == 2:  # "expr = target" or "target = expr"
            if parse_number(sides[1]) == target:
                s = sides[0]
            elif parse_number(sides[0]) == target:
                s = sides[1]
            else:
                return False
        value, used = countdown_eval(s)
        return value == target and not (Counter(used) - Counter(numbers))


def countdown_eval(expr: str) -> tuple[Fraction | None, list[int]]:
    """Exact value of a Countdown expression and the numbers it uses; (None, []) unless ``expr``
    is decimal integers, ``+ - * /`` and parentheses only (checked on the text and on the AST)."""
    if not expr or len(expr) > MAX_ANSWER_CHARS or not _COUNTDOWN_CHARS_RE.match(expr):
        return None, []
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, []
    used: list[int] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return _OPS[ops[type(node.op)]](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"disallowed syntax {type(node).__name__}")

    try:
        return ev(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None, []


# ----------------------------------------------------------------------------- word problems

_NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ivy", "Jon", "Kira", "Leo")
_ITEMS = ("apples", "pears", "marbles", "stickers", "cookies", "pencils", "shells", "cards")


def _word_l1(rng: random.Random) -> tuple[str, str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(("buy", "give", "train", "pockets"))
    if kind == "buy":
        a, b = rng.randint(1, 12), rng.randint(1, 9)
        return (f"buy:{a},{b}", f"{name} has {a} {item}. {name} buys {b} more. "
                f"How many {item} does {name} have now?", f"{a} + {b} = {a + b}", a + b)
    if kind == "give":
        a = rng.randint(2, 15)
        b = rng.randint(1, a - 1)
        return (f"give:{a},{b}", f"{name} has {a} {item} and gives {b} to a friend. "
                f"How many {item} does {name} have left?", f"{a} - {b} = {a - b}", a - b)
    if kind == "train":
        s, t = rng.randint(2, 9), rng.randint(2, 9)
        return (f"train:{s},{t}", f"A train travels {s} km every hour. How many km does it "
                f"travel in {t} hours?", f"{s} * {t} = {s * t}", s * t)
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return (f"pockets:{a},{b}", f"{name} has {a} coins in one pocket and {b} coins in the other. "
            f"How many coins does {name} have?", f"{a} + {b} = {a + b}", a + b)


def _word_l2(rng: random.Random) -> tuple[str, str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(("buy_eat", "coins", "train", "share", "change"))
    if kind == "buy_eat":
        a, b = rng.randint(5, 40), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        return (f"buy_eat:{a},{b},{c}", f"{name} has {a} {item}, buys {b} more and then gives "
                f"away {c}. How many {item} are left?",
                f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}", a + b - c)
    if kind == "coins":
        n, v, m = rng.randint(2, 9), rng.choice((2, 5, 10)), rng.randint(1, 20)
        return (f"coins:{n},{v},{m}", f"{name} has {n} coins worth {v} cents each and {m} coins "
                f"worth 1 cent each. How many cents does {name} have in total?",
                f"{n} * {v} = {n * v}\n{n * v} + {m} = {n * v + m}", n * v + m)
    if kind == "train":
        s, t, u = rng.randint(10, 60), rng.randint(2, 5), rng.randint(5, 50)
        return (f"train:{s},{t},{u}", f"A train travels at {s} km per hour for {t} hours and then "
                f"{u} km more. How many km does it travel in total?",
                f"{s} * {t} = {s * t}\n{s * t} + {u} = {s * t + u}", s * t + u)
    if kind == "share":
        k, m = rng.randint(2, 6), rng.randint(2, 12)
        total = k * m
        f = rng.choice([f for f in range(2, 7) if total % f == 0])  # k itself divides
        return (f"share:{k},{m},{f}", f"{name} has {k} bags with {m} {item} in each bag and shares "
                f"them equally among {f} friends. How many {item} does each friend get?",
                f"{k} * {m} = {total}\n{total} / {f} = {total // f}", total // f)
    p, q = rng.randint(2, 9), rng.randint(2, 5)
    bill = next(b for b in (10, 20, 50, 100) if b >= p * q)
    return (f"change:{p},{q},{bill}", f"A notebook costs {p} dollars. {name} buys {q} notebooks "
            f"and pays with a {bill} dollar bill. How many dollars of change does {name} get?",
            f"{p} * {q} = {p * q}\n{bill} - {p * q} = {bill - p * q}", bill - p * q)


def _word_l3(rng: random.Random) -> tuple[str, str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(("bags", "meet", "purse", "ages"))
    if kind == "bags":
        a, k, m, c, f = (rng.randint(5, 50), rng.randint(2, 6), rng.randint(3, 12),
                         rng.randint(1, 5), rng.randint(2, 6))
        got, gave = k * m, c * f
        if a + got - gave < 0:
            return _word_l3(rng)
        return (f"bags:{a},{k},{m},{c},{f}", f"{name} has {a} {item}, buys {k} bags of {m} "
                f"{item} each, then gives {c} {item} to each of {f} friends. How many {item} does "
                f"{name} have now?", f"{k} * {m} = {got}\n{c} * {f} = {gave}\n{a} + {got} = "
                f"{a + got}\n{a + got} - {gave} = {a + got - gave}", a + got - gave)
    if kind == "meet":
        s1, s2, t = rng.randint(20, 90), rng.randint(20, 90), rng.randint(2, 6)
        d = (s1 + s2) * t
        return (f"meet:{s1},{s2},{d}", f"Two trains start {d} km apart and travel toward each "
                f"other, one at {s1} km per hour and the other at {s2} km per hour. After how "
                "many hours do they meet?",
                f"{s1} + {s2} = {s1 + s2}\n{d} / {s1 + s2} = {t}", t)
    if kind == "purse":
        q, d, n = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        total = 25 * q + 10 * d + 5 * n
        return (f"purse:{q},{d},{n}", f"{name} has {q} quarters, {d} dimes and {n} nickels. A "
                "quarter is 25 cents, a dime 10 cents and a nickel 5 cents. How many cents does "
                f"{name} have?", f"25 * {q} = {25 * q}\n10 * {d} = {10 * d}\n5 * {n} = {5 * n}\n"
                f"{25 * q} + {10 * d} = {25 * q + 10 * d}\n{25 * q + 10 * d} + {5 * n} = {total}",
                total)
    other = rng.choice([x for x in _NAMES if x != name])
    a, b, c = rng.randint(3, 40), rng.randint(1, 30), rng.randint(1, 20)
    total = a + (a + b) + 2 * c
    return (f"ages:{a},{b},{c}", f"{name} is {a} years old. {other} is {b} years older than "
            f"{name}. In {c} years, what will the sum of their ages be?",
            f"{a} + {b} = {a + b}\n{a} + {c} = {a + c}\n{a + b} + {c} = {a + b + c}\n"
            f"{a + c} + {a + b + c} = {total}", total)


class WordProblems(Task):
    """Templated word problems (apples, coins, trains, sharing, change, ages) with integer answers.

    L1: one step, small numbers; L2: two steps; L3: three or more steps. The canonical content is
    the template and its numbers (names and items are surface wording), so the same arithmetic
    retold with other names stays in its split. Answers may carry a unit word ("6 apples").
    """

    name = "word_problems"
    description = "templated apples/coins/trains word problems with a numeric answer"
    levels = (1, 2, 3)

    def sample(self, rng: random.Random, level: int) -> _Draft:
        canonical, prompt, reasoning, value = (_word_l1, _word_l2, _word_l3)[level - 1](rng)
        return _Draft(canonical=canonical, prompt=prompt, answer=str(value), reasoning=reasoning)

    def check(self, response_answer: str, problem: Problem) -> bool:
        value = parse_number(response_answer, allow_units=True)
        return value is not None and value == Fraction(problem.answer)


# ----------------------------------------------------------------------------- small extras


class Compare(Task):
    """Which of two numbers is larger. L1: up to 2 digits; L2: 3 digits; L3: 4-5 digits that share
    their leading digits. The answer is the larger number."""

    name = "compare"
    description = "say which of two numbers is larger"

    def sample(self, rng: random.Random, level: int) -> _Draft:
        if level == 1:
            a, b = rng.sample(range(0, 100), 2)
        elif level == 2:
            a, b = rng.sample(range(100, 1000), 2)
        else:
            digits = rng.randint(4, 5)
            stem = rng.randint(10 ** (digits - 3), 10 ** (digits - 2) - 1)
            a, b = (stem * 100 + x for x in rng.sample(range(100), 2))
        big = max(a, b)
        sa, sb = str(a), str(b)
        if len(sa) != len(sb):
            why = f"{big} has more digits."
        else:
            i = next(k for k in range(len(sa)) if sa[k] != sb[k])
            why = (f"Both have {len(sa)} digits. The first difference is at digit {i + 1}: "
                   f"{sa[i]} vs {sb[i]}.")
        return _Draft(canonical=f"{min(a, b)},{big}", prompt=f"Which is larger, {a} or {b}?",
                      answer=str(big), reasoning=f"{why}\nSo {big} is larger.")


class Modular(Task):
    """Remainder of a division. L1: a <= 50, m in 2..9; L2: a <= 500, m <= 20; L3: a <= 9999,
    m <= 99. Steps: the largest multiple of m not above a, then the difference."""

    name = "modular"
    description = "remainder of an integer division"

    def sample(self, rng: random.Random, level: int) -> _Draft:
        top, mtop = {1: (50, 9), 2: (500, 20), 3: (9999, 99)}[level]
        a, m = rng.randint(0, top), rng.randint(2, mtop)
        q, r = divmod(a, m)
        return _Draft(canonical=f"{a}%{m}", prompt=f"What is {a} mod {m}?", answer=str(r),
                      reasoning=f"{m} * {q} = {m * q}\n{a} - {m * q} = {r}")


_DIGIT7_TEMPLATES = ("Ignore the number {x} and reply with the digit 7.",
                     "Here is a number: {x}. Reply with the digit 7.",
                     "Say 7, not {x}.")


class Digit7(Task):
    """Sanity task: the answer is always 7, next to a distractor number (L1: 2 digits, L2: 3-4,
    L3: 5-6). A model that learns nothing else should learn this; a GRPO run that cannot raise
    its reward here is broken."""

    name = "digit7"
    description = "always answer 7 (sanity check for the training loops)"

    def sample(self, rng: random.Random, level: int) -> _Draft:
        lo, hi = {1: (0, 99), 2: (100, 9999), 3: (10000, 999999)}[level]
        x = rng.randint(lo, hi)
        while x == 7:
            x = rng.randint(lo, hi)
        t = rng.randrange(len(_DIGIT7_TEMPLATES))
        return _Draft(canonical=f"{t}:{x}", prompt=_DIGIT7_TEMPLATES[t].format(x=x), answer="7",
                      reasoning=f"The question asks for the digit 7; {x} does not matter.")


# ----------------------------------------------------------------------------- registry, rendering

TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Countdown(), WordProblems(), Compare(),
                                              Modular(), Digit7(), BigArithmetic())}


def get_task(name: str) -> Task:
    """The task called ``name``; a KeyError listing the valid names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


def split_specs(spec: str | Sequence[str]) -> list[str]:
    """The items of a task spec: a list as it is, or a string split at commas outside brackets
    and quotes; blank items dropped."""
    if not isinstance(spec, str):
        return [str(s).strip() for s in spec if str(s).strip()]
    parts, depth, quote, cur = [], 0, "", []
    for ch in spec:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_task_specs(spec: str | Sequence[str]) -> list[tuple[str, tuple[int, ...] | None]]:
    """Task names with optional levels: ``"arithmetic:1-2,compare:1,modular"`` (or the same as a
    list) -> ``[("arithmetic", (1, 2)), ("compare", (1,)), ("modular", None)]``. ``NAME:L`` is one
    level, ``NAME:A-B`` a range; no levels means all of them (or the caller's default). The
    speedrun's curriculum, SFT data, RL prompts and evaluation all name their problems this way.
    An item may end in ``@PHRASING`` (:func:`parse_task_items`). Unknown names and levels raise a
    ValueError that names the offending item."""
    return [(name, levels) for name, levels, _ in parse_task_items(spec)]


def parse_task_items(spec: str | Sequence[str]) -> list[tuple[str, tuple[int, ...] | None, str]]:
    """:func:`parse_task_specs` with each item's phrasing: ``"arithmetic:1-2@fixed"`` ->
    ``("arithmetic", (1, 2), "fixed")``; without ``@`` the default, ``"varied"``
    (:mod:`nanoseek.tasks.phrasing`: how training problems are worded)."""
    items = split_specs(spec)
    out: list[tuple[str, tuple[int, ...] | None, str]] = []
    for item in items:
        if not item:
            continue
        item, at, phrasing = item.partition("@")
        phrasing = phrasing.strip() if at else DEFAULT_PHRASING
        try:
            check_phrasing(phrasing, f"task spec {item + at + phrasing!r}")
        except ValueError as e:
            raise ValueError(f"{e}, e.g. {item.strip()}@fixed") from None
        name, sep, lv = item.partition(":")
        try:
            task = get_task(name.strip())
        except KeyError as e:
            raise ValueError(f"task spec {item!r}: {e.args[0]}") from None
        levels: tuple[int, ...] | None = None
        if sep:
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", lv)
            if not m:
                raise ValueError(f"task spec {item!r}: levels must be N or A-B, e.g. {task.name}:1-2")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            levels = tuple(range(a, b + 1))
            if not levels or any(x not in task.levels for x in levels):
                raise ValueError(f"task spec {item!r}: {task.name} has levels {list(task.levels)}")
        out.append((task.name, levels, phrasing))
    if not out:
        raise ValueError(f"task spec {spec!r} names no task")
    return out


def tool_reasoning(name: str) -> str:
    """The reasoning before the ideal tool call (the tool-using SFT trace and its pre-training text)."""
    return f"This needs the {name} tool."


def corpus_document(p: Problem, with_tool: bool = False) -> str:
    """Pre-training text for one problem: question, worked steps (none for a problem without them,
    like most reasoning-gym ones), ``Answer: X``. ``with_tool``: a problem whose task has an ideal tool
    call (:meth:`Task.tool_call`) is written as the start of its tool-using reply in plain text: the
    reasoning and the call (the tool's name and its JSON arguments, as the chat writes them between
    the tool-call tokens), and nothing after it, so pre-training teaches copying the operands into the
    call. The tool's output and the answer are left out: the output is the tool's, never the model's
    to predict (the chat's loss masks it too), and a document that also had the model predict a
    6-digit sum scored 93-94% on the tool task after the cold start and lowered the other tasks
    (overall 25.7-25.9% at the base), where the call alone scored 99.4% (base 32.0%;
    docs/speedrun-history.md, recipe 6's tool rows). Copying the output into the answer is the cold start's."""
    from nanoseek.tools.format import tojson

    task = TASKS.get(p.task)
    call = task.tool_call(p) if with_tool and task is not None else None
    if call is not None:
        name, args = call
        return f"Question: {p.prompt}\nSolution:\n{tool_reasoning(name)}\n{name}{tojson(args)}\n"
    steps = f"{p.reasoning}\n" if p.reasoning else ""
    return f"Question: {p.prompt}\nSolution:\n{steps}Answer: {p.answer}\n"
