"""reasoning-gym's procedural datasets as nanoseek tasks: held-out evaluation, RL prompts, SFT traces.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (a dependency) generates ~100
kinds of verifiable problems nobody here wrote: ``create_dataset(name, seed, size, **config)``
gives entries ``{question, answer, metadata}`` and ``dataset.score_answer(answer, entry)`` grades
an answer in [0, 1] (partial credit for some). :class:`RGTask` wraps one dataset and its config;
the task-source registry (:mod:`nanoseek.tasks.sources`) resolves ``rg:SPEC`` to it, so
``nanoseek eval --tasks rg:chain_sum,arithmetic``, GRPO's ``prompts = "rg:leg_counting"`` and
SFT's ``data = "rg:gsm_symbolic"`` all reach the same problems.

**Spec**: ``NAME`` or ``NAME(key=value, ...)`` with keys of the dataset's config dataclass and
Python literal values (``rg:basic_arithmetic(min_terms=2, max_terms=2, operators=["+", "-"])``;
a bare word is a string: ``format_style=natural``, but ``true``/``false``/``null``/``none`` are
refused with the Python spelling to use, as are non-finite numbers and a key given twice; a tuple
and a list name the same task). An unknown name is one line with the close
matches; an unknown key lists the valid ones; a value the dataset's ``validate`` refuses says why.
The task's name (the ``task`` of its problems and results) is the canonical spec: ``rg:NAME``, or
``rg:NAME(k=v,...)`` with the keys sorted, so two configs of one dataset are two tasks.

**Splits, disjoint by construction** (as the built-in tasks'): a question belongs to ``"test"``
iff a hash of its text alone falls in a 20 % bucket range (:data:`TEST_PER_MILLE`), so no test
question of any reasoning-gym dataset is ever a training prompt of any reasoning-gym dataset,
whatever datasets, seeds or configs either side uses (many datasets repeat a question at different
seeds, and some share wordings: ``chain_sum`` and ``decimal_chain_sum``). The text, not the math:
the same sum worded differently is another question. On top of that the three uses walk
disjoint index ranges of reasoning-gym's per-entry seed (entry ``i`` of a dataset seeded ``s``
draws from ``Random(s + i)``): stream ``train`` (RL prompts, SFT traces), ``test`` (evaluation)
and ``fewshot`` (a base model's worked examples: train-split questions that are not the RL
prompts of the same seed) start at ``stream * 2**30 + (seed % 1024) * 2**20``; so the seed
reaches reasoning-gym below 2**32 (numpy seeding in some datasets), and seeds equal modulo 1024
draw the same problems. A draw takes at most 2**20 entries. Test problems are distinct questions
(fewer when the space runs out: the result's N says how many); training draws may repeat.

**Answers** are extracted from a reply as for every task (:func:`nanoseek.tasks.reply.extract_answer`,
:meth:`RGTask.extractor`) with two differences: the text is kept as written (a trailing period is
part of a sentence answer: emoji_mystery, sentence_reordering; ``42.`` is also graded as ``42``),
and for a dataset whose gold answers span several lines (grids, boards, move lists: sudoku,
rotate_matrix, tower_of_hanoi, ...; decided per dataset from its first gold answers) the answer
after ``Answer:`` is the whole block to the end of the reply. They are graded by the dataset's own
``score_answer``; an answer is *correct* when it scores 1.0 (partial credit is not a solved
problem). Datasets whose entries carry no gold answer (boxnet, graph_color, propositional_logic,
rubiks_cube, rush_hour: many answers are right) are RL prompts and evaluation only: SFT refuses
them and few-shot evaluation shows them no examples.

**Hash seed**: some generators iterate over sets, so their problems would follow the process's
``PYTHONHASHSEED``; a process with hash randomization draws through one child process started
with ``PYTHONHASHSEED=0`` (~1.5 s once per process, then a pipe round trip per draw), so two
evaluations or a resumed run see the same problems. Some generators also draw from Python's global
``random`` (list_functions), so each entry is made with the global generator seeded from (seed,
index) and the caller's global state restored after the walk: an entry never depends on what the
process drew before.

**Cost**: most generators make thousands of problems a second; a few are slow (sokoban ~3 s a
problem, knight_swap ~2 s, futoshiki and intermediate_integration ~1 s): 200 held-out problems
of those take minutes.

**SFT traces** (:data:`TRACES`): reasoning-gym entries carry an answer, rarely the steps. Of the
datasets of 0.1.25, ``gsm_symbolic`` has a worked solution (``metadata.answer_cot``) and the
string-rewriting ones (``string_manipulation``, ``string_splitting``, ``string_synthesis``) the
sequence of intermediate states; these become the ``<think>`` steps. Every other dataset's SFT
target is the answer alone, with an empty ``<think></think>``: supervision without reasoning.

Deliberately left out: reasoning-gym's curricula (difficulty schedules) and its composite dataset
weighting; name a config per task instead.
"""

from __future__ import annotations

import ast
import atexit
import difflib
import hashlib
import math
import os
import pickle
import random
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable

from nanoseek.tasks.generators import Problem, split_specs
from nanoseek.tasks.rewards import HUGE_POWER_RE, time_limit

SCORE_TIMEOUT_S = 5      # one grade of one answer, where a timer can be set (the main thread, no other timer)

PREFIX = "rg:"
TEST_PER_MILLE = 200            # the held-out share of every dataset's questions (the built-in tasks' 20 %)
STREAMS = {"train": 0, "test": 1, "fewshot": 2}
STREAM_SPAN = 2 ** 30           # index range of one stream
DRAW_SPAN = 2 ** 20             # index range of one (stream, seed) draw
SEEDS = STREAM_SPAN // DRAW_SPAN    # 1024 distinct seeds per stream
# problem id -> its reasoning-gym entry (score_answer needs the entry; ids name the task and the question)
_ENTRIES: dict[str, dict] = {}
MAX_ANSWER_CHARS = 1000        # longer answers (than this, or 4x the gold one) score 0 unread
# datasets a spec cannot express -> why (one line)
UNSUPPORTED = {"composite": "reasoning-gym's weighted mix of datasets takes nested dataset specs, which a task "
                            "spec does not carry; name each dataset as its own task (rg:chain_sum,rg:products)"}
PROBE_ENTRIES = 4               # entries whose gold answers decide a dataset's answer shape (RGTask.multiline)
_SHAPE: dict[str, tuple[bool, bool]] = {}  # task name -> (answers span several lines, entries carry one)
MAX_MISSES = 2000               # consecutive entries without a new test question before a space is "exhausted"


def _package():
    """reasoning-gym, imported on first use (it takes ~1.5 s); a ValueError line when it is missing."""
    try:
        import reasoning_gym
        import reasoning_gym.factory  # noqa: F401
    except ImportError:
        raise ValueError("rg: tasks need the package reasoning-gym, a dependency of nanoseek "
                         "(pip install reasoning-gym)") from None
    return reasoning_gym


def dataset_names() -> list[str]:
    """Every dataset reasoning-gym registers."""
    return sorted(_package().factory.DATASETS)


def split_of(question: str) -> str:
    """"test" or "train": a pure function of the question text, not of the dataset or its config,
    so a question that two configs or two datasets ask (``chain_sum`` and ``decimal_chain_sum``
    share wordings) is held out under all of them."""
    h = hashlib.sha256(f"rg:\x00{question}".encode()).digest()
    return "test" if int.from_bytes(h[:4], "big") % 1000 < TEST_PER_MILLE else "train"


def stream_seed(stream: str, seed: int) -> int:
    """The reasoning-gym seed a draw of ``stream`` ("train", "test", "fewshot") starts from."""
    return STREAMS[stream] * STREAM_SPAN + (int(seed) % SEEDS) * DRAW_SPAN


# ----------------------------------------------------------------------------- the spec

# bare words that look like a boolean, a null or a non-finite number in other languages: never strings
_LOOKALIKES = {"true": "True", "false": "False", "null": "None", "none": "None", "nil": "None",
               "nan": None, "inf": None, "infinity": None, "-inf": None}


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, complex):
        return False
    if isinstance(value, (list, tuple, set)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(k) and _finite(v) for k, v in value.items())
    return True


def _value(text: str) -> Any:
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in _LOOKALIKES and text not in ("True", "False", "None"):
            fix = _LOOKALIKES[text.lower()]
            raise ValueError(f"{text!r} is not a Python literal: write {fix}" if fix else
                             f"{text!r}: non-finite numbers are refused") from None
        if re.fullmatch(r"[A-Za-z_][\w.-]*", text):       # a bare word: a string
            return text
        raise ValueError(f"{text!r} is not a Python literal (a number, a quoted string, a list, "
                         "True/False/None)") from None
    if not _finite(value):
        raise ValueError(f"{text!r}: non-finite numbers are refused")
    return value


def _listed(value: Any) -> Any:
    """``value`` with tuples written as lists (one task name for ``(1, 2)`` and ``[1, 2]``)."""
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME(k=v, ...)"`` (the part after ``rg:``) -> (name, config); ValueError naming the problem."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\((.*)\))?\s*", spec, re.S)
    if not m:
        raise ValueError(f"task spec 'rg:{spec}': expected rg:NAME or rg:NAME(key=value, ...)")
    name, body = m.group(1), m.group(2)
    config: dict[str, Any] = {}
    for item in split_specs(body or ""):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"task spec 'rg:{spec}': {item.strip()!r} is not key=value")
        if key.strip() in config:
            raise ValueError(f"task spec 'rg:{spec}': {key.strip()} is given twice")
        try:
            config[key.strip()] = _value(value)
        except ValueError as e:
            raise ValueError(f"task spec 'rg:{spec}': {key.strip()} = {e}") from None
    return name, config


def canonical_name(name: str, config: dict[str, Any]) -> str:
    """The task name of a dataset and config: ``rg:NAME`` or ``rg:NAME(k=v,...)``, keys sorted."""
    if not config:
        return PREFIX + name
    return PREFIX + name + "(" + ",".join(f"{k}={_listed(config[k])!r}" for k in sorted(config)) + ")"


# ----------------------------------------------------------------------------- worked steps

def _gsm_cot(entry: dict) -> str:
    cot = str(entry["metadata"].get("answer_cot", ""))
    return "\n".join(line for line in cot.splitlines() if not line.startswith("####")).strip()


def _states(entry: dict) -> str:
    return "\n".join(str(s) for s in entry["metadata"].get("states", []))


# dataset -> the worked steps of an entry (the <think> of its SFT trace); others have none
TRACES: dict[str, Callable[[dict], str]] = {
    "gsm_symbolic": _gsm_cot,
    "string_manipulation": _states,
    "string_splitting": _states,
    "string_synthesis": _states,
}


# ----------------------------------------------------------------------------- the task

@dataclass
class RGTask:
    """One reasoning-gym dataset with its config, drawn and graded as a nanoseek task."""

    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    _scorer: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return canonical_name(self.dataset, self.config)

    @property
    def has_traces(self) -> bool:
        return self.dataset in TRACES

    def create(self, seed: int, size: int):
        """The reasoning-gym dataset at ``seed`` (ValueError, one line, for a config it refuses)."""
        try:
            return _package().create_dataset(self.dataset, seed=seed, size=size, **self.config)
        except Exception as e:             # its configs assert, or fail in their own ways on odd values
            raise ValueError(f"task spec {self.name!r}: reasoning-gym refuses the config: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def check(self) -> "RGTask":
        """The name and config keys exist and the dataset accepts the config; else a ValueError line."""
        names = dataset_names()
        if self.dataset not in names:
            close = difflib.get_close_matches(self.dataset, names, n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else \
                f"{len(names)} datasets, e.g. {', '.join(PREFIX + n for n in names[:5])}"
            raise ValueError(f"unknown reasoning-gym dataset {PREFIX + self.dataset!r}; {hint}")
        if self.dataset in UNSUPPORTED:
            raise ValueError(f"{PREFIX + self.dataset}: {UNSUPPORTED[self.dataset]}")
        config_cls = _package().factory.DATASETS[self.dataset][1]
        valid = [f.name for f in fields(config_cls) if f.name not in ("seed", "size")] \
            if is_dataclass(config_cls) else []
        bad = [k for k in self.config if k not in valid]
        if bad:
            raise ValueError(f"task spec {self.name!r}: unknown config key {bad[0]!r} of {self.dataset}; "
                             f"valid keys: {', '.join(valid)}")
        self.create(0, 1)
        return self

    def _problem(self, split: str, entry: dict) -> Problem:
        question = str(entry["question"])
        h = hashlib.sha256(f"{self.name}\x00{question}".encode()).hexdigest()[:10]
        p = Problem(task=self.name, id=f"{self.name}-{split}-{h}", prompt=question, answer=str(entry["answer"]),
                    reasoning=TRACES[self.dataset](entry) if self.has_traces else "", level=0)
        _ENTRIES[p.id] = entry
        return p

    def draw(self, split: str, n: int, seed: int = 0, stream: str | None = None,
             unique: bool | None = None) -> list[Problem]:
        """``n`` problems of ``split`` from ``stream`` (default: the split's own) at ``seed``; see the
        module doc. Test draws are distinct questions and may return fewer (the space ran out);
        train draws may repeat a question."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        unique = split == "test" if unique is None else unique
        stream = stream or split
        entries = _entries(self.dataset, self.config, stream_seed(stream, seed), split, n, unique)
        if not entries and n > 0:
            raise ValueError(f"{self.name}: no {split!r} question in {MAX_MISSES} draws")
        return [self._problem(split, e) for e in entries]

    def _shape(self) -> tuple[bool, bool]:
        """(multi-line, has gold) of the dataset's answers, from its first :data:`PROBE_ENTRIES`
        entries at seed 0; one rule per dataset and config, cached per process."""
        if self.name not in _SHAPE:
            answers = [e["answer"] for e in _entries(self.dataset, self.config, 0, None, PROBE_ENTRIES, False)]
            _SHAPE[self.name] = (any("\n" in str(a).strip() for a in answers if a is not None),
                                 all(a is not None for a in answers))
        return _SHAPE[self.name]

    @property
    def multiline(self) -> bool:
        """Whether the dataset's answers span several lines (a grid, a board, a list of moves): any
        of its first :data:`PROBE_ENTRIES` gold answers does."""
        return self._shape()[0]

    @property
    def has_gold(self) -> bool:
        """Whether the dataset's entries carry a gold answer (``boxnet``, ``graph_color``,
        ``rush_hour``, ... give None: many answers are right, ``score_answer`` checks them); one
        without is no SFT data and no few-shot example, only RL prompts and evaluation."""
        return self._shape()[1]

    def extractor(self, problem: Problem) -> Callable[[str], str | None]:
        """How a reply's answer to ``problem`` is read: :func:`~nanoseek.tasks.reply.extract_answer`
        on the text as written (a trailing period kept), and the whole ``Answer:`` block to the end
        of the reply when the dataset's answers span several lines (:attr:`multiline`, or this
        gold answer does)."""
        from nanoseek.tasks.reply import extract_answer

        block = "\n" in problem.answer.strip() or self.multiline
        return lambda text: extract_answer(text, block=block, as_written=True)

    def score_answer(self, answer: str | None, problem: Problem) -> float:
        """The dataset's own grade of an extracted answer, in [0, 1]; 0 for an unknown problem or an
        exception in the dataset's scorer (a verifier never crashes a run on adversarial text). The
        answer is graded as written; one ending in a period is also graded without it (``42.``
        closing a sentence), the better grade counting."""
        entry = _ENTRIES.get(problem.id)
        if entry is None or not isinstance(answer, str) or len(answer) > max(MAX_ANSWER_CHARS, 4 * len(problem.answer)):
            return 0.0                     # a runaway answer never reaches a (possibly sympy-based) scorer
        # a short one can run away too: "9**9**9**9" evaluated by a sympy-based scorer never ends
        if HUGE_POWER_RE.search(answer) and not HUGE_POWER_RE.search(problem.answer):
            return 0.0
        if self._scorer is None:
            self._scorer = self.create(0, 1)
        forms = [answer] + ([answer[:-1].strip()] if answer.endswith(".") and not answer.endswith("..") else [])
        best = 0.0
        for form in forms:
            try:
                with time_limit(SCORE_TIMEOUT_S):
                    best = max(best, float(self._scorer.score_answer(answer=form, entry=entry) or 0.0))
            except Exception:              # the scorer's own failure, or past the time limit: no grade
                pass
        return best

    def verify(self, answer: str | None, problem: Problem) -> bool:
        """Solved: the dataset grades the answer 1.0."""
        return self.score_answer(answer, problem) >= 1.0


# ----------------------------------------------------------------------------- drawing, independent of the hash seed

def _walk(dataset: str, config: dict[str, Any], seed: int, split: str | None, n: int, unique: bool) -> list[dict]:
    """The entries of a draw, in this process: the first ``n`` of ``split`` (every entry for None)
    walking reasoning-gym's entries from ``seed``; distinct questions when ``unique``."""
    size = min(DRAW_SPAN, 20 * n + MAX_MISSES)      # entries are prefix-stable: the size bounds the walk only
    try:
        ds = _package().create_dataset(dataset, seed=seed, size=size, **config)
    except Exception as e:             # its configs assert, or fail in their own ways on odd values
        raise ValueError(f"task spec {canonical_name(dataset, config)!r}: reasoning-gym refuses the config: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    state = random.getstate()
    try:
        for i in range(size):
            if len(out) >= n or misses >= MAX_MISSES:
                break
            random.seed(f"{seed}:{i}")     # str seeds hash with sha512: the same in every process
            entry = ds[i]
            q = str(entry["question"])
            if (split is not None and split_of(q) != split) or (unique and q in seen):
                misses += 1
                continue
            misses = 0
            seen.add(q)
            out.append(entry)
    finally:
        random.setstate(state)
    return out


_WORKER: dict[str, Any] = {}       # the child process that draws with PYTHONHASHSEED=0 (started once)
_WORKER_LOCK = threading.Lock()


def _entries(dataset: str, config: dict[str, Any], seed: int, split: str | None, n: int, unique: bool) -> list[dict]:
    """:func:`_walk`, with the same result whatever this process's ``PYTHONHASHSEED``: some datasets
    iterate over sets (polynomial_multiplication, isomorphic_strings, ransom_note, list_functions,
    knight_swap, word_ladder, sokoban), so their problems follow string hashing. A process with
    hash randomization draws in one child started with ``PYTHONHASHSEED=0`` (started on the first
    draw, ~2 s, then a pipe round trip per draw); a process started with 0 draws itself."""
    if sys.flags.hash_randomization == 0:
        return _walk(dataset, config, seed, split, n, unique)
    with _WORKER_LOCK:
        proc = _WORKER.get("proc")
        if proc is None or proc.poll() is not None:
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = {**os.environ, "PYTHONHASHSEED": "0",
                   "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
            proc = subprocess.Popen([sys.executable, "-m", "nanoseek.tasks.rg"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env)
            _WORKER["proc"] = proc
            atexit.register(_stop_worker)
        try:
            pickle.dump((dataset, config, seed, split, n, unique), proc.stdin)
            proc.stdin.flush()
            ok, value = pickle.load(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            _WORKER.pop("proc", None)
            raise ValueError(f"{canonical_name(dataset, config)}: the reasoning-gym draw process failed "
                             f"({type(e).__name__})") from None
    if not ok:
        raise ValueError(value)
    return value


def _stop_worker() -> None:
    proc = _WORKER.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=10)


def _serve() -> None:
    """The draw process: (dataset, config, seed, split, n, unique) pickles in on stdin, (ok, entries
    or an error line) out on stdout, until stdin closes. What reasoning-gym prints goes to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        try:
            request = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply = (True, _walk(*request))
        except ValueError as e:
            reply = (False, str(e))
        pickle.dump(reply, out)
        out.flush()


def rg_task(spec: str) -> RGTask:
    """The checked task of ``spec`` (the part after ``rg:``); ValueError, one line, otherwise."""
    name, config = parse_spec(spec)
    return RGTask(name, config).check()


__all__ = ["PREFIX", "TEST_PER_MILLE", "STREAMS", "TRACES", "RGTask", "rg_task", "parse_spec", "canonical_name",
           "split_of", "stream_seed", "dataset_names"]


if __name__ == "__main__":
    _serve()
