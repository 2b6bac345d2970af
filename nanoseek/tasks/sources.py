"""Task sources: what a task spec names, resolved in one registry.

A task spec (``nanoseek eval --tasks``, GRPO's ``prompts``, SFT's ``tasks:`` data, the speedrun's
``[eval]``) is a comma-separated list of items. An item whose prefix before the first ``:`` is a
key of :data:`SOURCES` goes to that source's resolver with the rest of the item; any other item
is a built-in task spec (``arithmetic``, ``arithmetic:1-2``: :mod:`nanoseek.tasks.generators`)::

    arithmetic:1-2, rg:chain_sum(min_terms=2, max_terms=2), rg:leg_counting

Commas inside brackets or quotes belong to the item (:func:`~nanoseek.tasks.generators.split_specs`). Every source gives a
:class:`TaskSource`: its ``name`` (the ``task`` of its problems and results), held-out
``test_problems``, ``problems`` of a split to train on (RL prompts, SFT traces), few-shot ``examples`` for base
models (train split, never the test problems), the ``accuracy`` of an extracted answer and, for
sources graded outside the built-in verifiers, an ``external_scorer`` the RL reward calls.
:meth:`TaskSource.score_reply` is how a reply is graded in an evaluation mode: the answer is
:func:`~nanoseek.tasks.reply.extract_answer`'s; format is an ``Answer:`` line in ``fewshot``
mode, R1's ``<think>`` format otherwise (:func:`nanoseek.tasks.rewards.score_external`). A
source with another notion of a reply (code run on tests) overrides it.

Registered: ``rg`` (reasoning-gym, :mod:`nanoseek.tasks.rg`). Another source registers by
adding its prefix and resolver to :data:`SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from nanoseek.tasks.generators import Problem, Task, get_task, parse_task_specs, split_specs
from nanoseek.tasks.rg import rg_task


class TaskSource:
    """One task of a spec. Subclasses define the problems and ``accuracy``."""

    name: str = ""

    def test_problems(self, n: int, seed: int, levels: Sequence[int] | None = None) -> list[Problem]:
        raise NotImplementedError

    def problems(self, split: str, n: int, seed: int, level: int | Sequence[int] | None = None) -> list[Problem]:
        """``n`` problems of ``split`` to train on (RL prompts, SFT traces; repeats allowed when the space is small)."""
        raise NotImplementedError

    def examples(self, level: int, k: int, seed: int) -> list[Problem]:
        raise NotImplementedError

    def accuracy(self, answer: str | None, problem: Problem) -> float:
        raise NotImplementedError

    def external_scorer(self, problem: Problem) -> Callable[[str | None], float] | None:
        """The RL reward's verifier of ``problem`` when it is not a built-in task's (else None)."""
        return lambda answer: self.accuracy(answer, problem)

    def score_reply(self, text: str, problem: Problem, mode: str) -> tuple[bool, bool, str | None]:
        """(correct, well formed, extracted answer) of one reply in evaluation ``mode``."""
        from nanoseek.tasks.reply import extract_answer, states_answer_line
        from nanoseek.tasks.rewards import RewardConfig, score_external

        if mode == "fewshot":
            answer = extract_answer(text)
            return answer is not None and self.accuracy(answer, problem) >= 1.0, states_answer_line(text), answer
        r = score_external(text, lambda a: self.accuracy(a, problem) if a is not None else 0.0,
                           RewardConfig.for_template(mode))
        return bool(r.correct), bool(r.format_ok), r.answer


@dataclass
class BuiltinSource(TaskSource):
    """A built-in task with optional levels (``arithmetic:1-2``); ``levels`` None: the caller's default."""

    task: Task
    levels: tuple[int, ...] | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.task.name

    def test_problems(self, n, seed, levels=None):
        lv = self.levels if self.levels is not None else levels
        return self.task.generate("test", n, seed=seed, level=list(lv) if lv else None, allow_fewer=True)

    def problems(self, split, n, seed, level=None):
        lv = self.levels if self.levels is not None else level
        try:
            return self.task.generate(split, n, seed=seed, level=lv)
        except ValueError:  # the level's space is smaller than n: draw with repeats
            return self.task.generate(split, n, seed=seed, level=lv, unique=False)

    def examples(self, level, k, seed):
        return self.task.generate("train", k, seed=seed, level=level)

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

    def examples(self, level, k, seed):
        return self.task.draw("train", k, seed, stream="fewshot")

    def accuracy(self, answer, problem):
        return self.task.score_answer(answer, problem)


def _rg(rest: str) -> TaskSource:
    return RGSource(rg_task(rest))


# prefix -> resolver of the item's rest (after "PREFIX:"); items without a registered prefix are built-in
SOURCES: dict[str, Callable[[str], TaskSource]] = {"rg": _rg}


def resolve(item: str) -> TaskSource:
    """The source of one spec item; ValueError, one line naming the item, otherwise."""
    item = item.strip()
    prefix, _, rest = item.partition(":")
    if prefix in SOURCES:
        return SOURCES[prefix](rest)
    [(name, levels)] = parse_task_specs([item])
    return BuiltinSource(get_task(name), levels)


def parse_sources(spec: str | Sequence[str]) -> list[TaskSource]:
    """Every item of ``spec`` resolved; ValueError naming the first bad item."""
    items = split_specs(spec)
    if not items:
        raise ValueError(f"task spec {spec!r} names no task")
    return [resolve(i) for i in items]


__all__ = ["TaskSource", "BuiltinSource", "RGSource", "SOURCES", "resolve", "parse_sources"]
