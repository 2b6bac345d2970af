"""Task sources: what a task spec names, resolved in one registry.

A task spec (``nanoseek eval --tasks``, GRPO's ``prompts``, SFT's ``tasks:`` data, the speedrun's
``[eval]``) is a comma-separated list of items. An item whose prefix before the first ``:`` (the
whole item when it has none) is a key of :data:`SOURCES` goes to that source's resolver; any
other item is a built-in task spec (``arithmetic``, ``arithmetic:1-2``: :mod:`nanoseek.tasks.generators`)::

    arithmetic:1-2, rg:chain_sum(min_terms=2, max_terms=2), rg:leg_counting, humaneval:0-19

Commas inside brackets or quotes belong to the item (:func:`~nanoseek.tasks.generators.split_specs`).
Every item resolves to a :class:`~nanoseek.tasks.source.TaskSource`, the one interface the
evaluation harness, the RL prompts and the SFT data use (none of them branches on a source's kind):

* ``name``: the ``task`` of its problems and results.
* Problems: ``test_problems`` (held out), ``draw`` (the held-out set of one evaluation with the
  notes it deserves: fewer problems than asked, levels that do not apply), ``problems`` of a split
  to train on (RL prompts, SFT traces; a source without a training split says so in one line, and
  its ``trainable`` is False, so the post-training configs refuse it when they are read),
  few-shot ``examples`` for base models (train split, never the test problems; none by default).
* Prompting: ``prompt_ids`` (a problem rendered in an evaluation mode; default: the mode's
  template of :mod:`nanoseek.tasks.reply`) and ``stop_rule`` (where generation stops; default:
  the template's).
* Grading: ``accuracy`` of an extracted answer; ``external_scorer``, the RL reward's verifier for
  sources graded outside the built-in verifiers; ``score_reply`` (one reply in an evaluation mode:
  the answer is :func:`~nanoseek.tasks.reply.extract_answer`'s, format is an ``Answer:`` line in
  ``fewshot`` mode, R1's ``<think>`` format otherwise, :func:`nanoseek.tasks.rewards.score_external`);
  ``score_replies`` (a batch, in order; default one by one, so a source that runs code scores
  many samples in parallel by overriding it).

A built-in item may end in ``@fixed`` (the one original wording of its training problems) or
``@varied`` (the default: many wordings, :mod:`nanoseek.tasks.phrasing`); held-out problems are asked
in the original wording either way.

Registered: ``rg`` (reasoning-gym, :mod:`nanoseek.tasks.rg`), ``humaneval`` (HumanEval,
:mod:`nanoseek.tasks.humaneval`: its own prompts, stop sequences and sandboxed, parallel scoring) and
``reword`` (``reword:GROUP:TASK[:LEVELS]``: a built-in task's held-out problems in a wording of GROUP,
original, seen or unseen; evaluation only: the speedrun report's phrasing robustness).
Another source registers by adding its prefix and resolver to :data:`SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from nanoseek.tasks.generators import Task, get_task, parse_task_items, split_specs
from nanoseek.tasks.humaneval import HumanEvalSource
from nanoseek.tasks.phrasing import DEFAULT_PHRASING, GROUPS
from nanoseek.tasks.rg import rg_task
from nanoseek.tasks.source import Reply, TaskSource


@dataclass
class BuiltinSource(TaskSource):
    """A built-in task with optional levels (``arithmetic:1-2``); ``levels`` None: the caller's default."""

    task: Task
    levels: tuple[int, ...] | None = None
    phrasing: str = DEFAULT_PHRASING    # how training problems are worded (the spec's @PHRASING)
    has_levels = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.task.name

    def _levels(self, levels):
        return list(self.levels) if self.levels is not None else (list(levels) if levels else None)

    def label(self, levels=None):
        lv = self._levels(levels)
        return self.name + (":" + ",".join(map(str, lv)) if lv else "")

    # Evaluation asks in the original wording (fixed), whatever the phrasing: its numbers stay comparable
    # across runs and recipes, and the robustness table (RewordSource) asks the same problems in others.
    def test_problems(self, n, seed, levels=None):
        return self.task.generate("test", n, seed=seed, level=self._levels(levels), allow_fewer=True, phrasing="fixed")

    def problems(self, split, n, seed, level=None):
        lv = self.levels if self.levels is not None else level
        try:
            return self.task.generate(split, n, seed=seed, level=lv, phrasing=self.phrasing)
        except ValueError:  # the level's space is smaller than n: draw with repeats
            return self.task.generate(split, n, seed=seed, level=lv, unique=False, phrasing=self.phrasing)

    def examples(self, level, k, seed):
        return self.task.generate("train", k, seed=seed, level=level, phrasing="fixed")

    def accuracy(self, answer, problem):
        return float(answer is not None and self.task.verify(answer, problem))

    def external_scorer(self, problem):
        return None                 # the Problem's own exact verifier (nanoseek.tasks.rewards.score)


@dataclass
class RGSource(TaskSource):
    """A reasoning-gym dataset (:class:`nanoseek.tasks.rg.RGTask`); it has no levels."""

    task: Any

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.task.name

    def test_problems(self, n, seed, levels=None):
        return self.task.draw("test", n, seed)

    def problems(self, split, n, seed, level=None):
        return self.task.draw(split, n, seed, unique=False)

    @property
    def has_gold(self) -> bool:  # type: ignore[override]
        return self.task.has_gold

    def examples(self, level, k, seed):
        if not self.has_gold:           # "Answer: None" would teach a wrong answer: zero-shot (the harness notes it)
            return []
        return self.task.draw("train", k, seed, stream="fewshot")

    def accuracy(self, answer, problem):
        return self.task.score_answer(answer, problem)

    def extractor(self, problem):
        return self.task.extractor(problem)


@dataclass
class RewordSource(BuiltinSource):
    """A built-in task's held-out problems asked in a wording of ``group`` (``reword:GROUP:SPEC``,
    :meth:`nanoseek.tasks.generators.Task.reword`): the same problems, ids, answers and verifier as the
    task's evaluation, another prompt; the speedrun report's phrasing-robustness table. For evaluation only."""

    group: str = "seen"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"reword:{self.group}:{self.task.name}"

    def test_problems(self, n, seed, levels=None):
        return [replace(self.task.reword(p, self.group, seed), task=self.name)
                for p in super().test_problems(n, seed, levels)]

    problems = TaskSource.problems            # no training split: paraphrases of held-out problems
    # (few-shot examples: the task's own, in the original wording, before the reworded question)

    @classmethod
    def from_spec(cls, item: str) -> "RewordSource":
        _, _, rest = item.partition(":")
        group, _, spec = rest.partition(":")
        if group.strip() not in GROUPS or not spec.strip():
            raise ValueError(f"task spec {item!r}: reword:GROUP:TASK[:LEVELS] with GROUP one of {GROUPS}, "
                             "e.g. reword:unseen:arithmetic:1-2")
        [(name, levels, _)] = parse_task_items([spec])
        return cls(get_task(name), levels, "fixed", group=group.strip())


def _rg(item: str) -> TaskSource:
    return RGSource(rg_task(item.partition(":")[2]))


# prefix -> resolver of the whole item ("PREFIX" or "PREFIX:..."); items without a registered prefix are built-in
SOURCES: dict[str, Callable[[str], TaskSource]] = {"rg": _rg, "humaneval": HumanEvalSource.from_spec,
                                                   "reword": RewordSource.from_spec}


def resolve(item: str) -> TaskSource:
    """The source of one spec item; ValueError, one line naming the item, otherwise."""
    item = item.strip()
    prefix = item.partition(":")[0].strip().lower()
    if prefix in SOURCES:
        return SOURCES[prefix](item)
    [(name, levels, phrasing)] = parse_task_items([item])
    return BuiltinSource(get_task(name), levels, phrasing)


def parse_sources(spec: str | Sequence[str]) -> list[TaskSource]:
    """Every item of ``spec`` resolved; ValueError naming the first bad item."""
    items = split_specs(spec)
    if not items:
        raise ValueError(f"task spec {spec!r} names no task")
    return [resolve(i) for i in items]


__all__ = ["Reply", "TaskSource", "BuiltinSource", "RewordSource", "RGSource", "SOURCES", "resolve", "parse_sources"]
