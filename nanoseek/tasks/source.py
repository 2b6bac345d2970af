"""The interface every task source implements (:mod:`nanoseek.tasks.sources` is the registry that
resolves a task spec's items to them; the interface is described there).

:class:`TaskSource` holds the defaults that fit a question-and-answer task: prompts rendered by the
evaluation templates of :mod:`nanoseek.tasks.reply`, their stop rule, grading of the answer that
:func:`~nanoseek.tasks.reply.extract_answer` finds, one reply at a time, no few-shot examples and no
training split. A source overrides what it does differently: built-in tasks and reasoning-gym
(:mod:`nanoseek.tasks.sources`) only their problems and grading; HumanEval
(:mod:`nanoseek.tasks.humaneval`) also its prompts, stop sequences and batched, parallel scoring.
Kept apart from the registry so that a source module can build on it while the registry imports
every source.
"""

from __future__ import annotations

from typing import Callable, Sequence

from nanoseek.tasks.generators import Problem

Reply = tuple[bool, bool, str | None]   # (correct, well formed, extracted answer) of one reply


class TaskSource:
    """One task of a spec. Subclasses define ``name``, ``test_problems`` and ``accuracy``; every
    other method has a default that fits a question-and-answer task."""

    name: str = ""
    has_levels: bool = False        # whether a caller's default levels (eval ``levels``) apply
    has_gold: bool = True           # whether problems carry a gold answer to show (SFT targets, few-shot examples)

    # -------------------------------------------------------------- problems

    def test_problems(self, n: int, seed: int, levels: Sequence[int] | None = None) -> list[Problem]:
        """``n`` distinct held-out problems (fewer when the space is smaller)."""
        raise NotImplementedError

    def label(self, levels: Sequence[int] | None = None) -> str:
        """How notes name this task at ``levels``."""
        return self.name

    def draw(self, n: int, seed: int, levels: Sequence[int] | None = None) -> tuple[list[Problem], list[str]]:
        """(held-out problems, notes) of one evaluation of ``n`` problems; ``levels``: the caller's
        default levels (noted as not applying to a source without levels)."""
        notes = []
        if levels and not self.has_levels:
            notes.append(f"{self.name}: --levels does not apply (it has no levels)")
            levels = None
        drawn = self.test_problems(n, seed, levels)
        if len(drawn) < n:
            notes.append(f"{self.label(levels)}: only {len(drawn)} distinct held-out problems exist (asked for {n}); "
                         "all of them were evaluated")
        return drawn, notes

    def problems(self, split: str, n: int, seed: int, level: int | Sequence[int] | None = None) -> list[Problem]:
        """``n`` problems of ``split`` to train on (RL prompts, SFT traces; repeats allowed when the
        space is small); ValueError, one line, for a source that has none."""
        raise ValueError(f"task {self.name!r} is for evaluation only: it has no {split!r} problems to train on")

    @property
    def trainable(self) -> bool:
        """Whether the source has problems to train on: it overrides :meth:`problems`; one that does not is for
        evaluation only (the post-training configs refuse it when they are read)."""
        return type(self).problems is not TaskSource.problems

    def examples(self, level: int, k: int, seed: int) -> list[Problem]:
        """``k`` worked train problems shown before a base model's question (default: none)."""
        return []

    # -------------------------------------------------------------- prompting

    def prompt_ids(self, tokenizer, problem: Problem, mode: str, examples: Sequence[Problem] = (),
                   tools: Sequence[dict] | None = None, system: str | None = None) -> list[int]:
        """The prompt of ``problem`` in evaluation ``mode`` (``examples``: few-shot, ``fewshot`` mode;
        ``tools``: function definitions the system turn describes, ``system``: a system turn, chat modes)."""
        from nanoseek.tasks.reply import render_prompt

        return render_prompt(tokenizer, problem, mode, list(examples), tools=tools, system=system)

    def stop_rule(self, tokenizer, mode: str) -> tuple[list[str], list[int]]:
        """(stop strings, stop token ids) of a sample in evaluation ``mode``."""
        from nanoseek.tasks.reply import stop_rule

        return stop_rule(tokenizer, mode)

    # -------------------------------------------------------------- grading

    def accuracy(self, answer: str | None, problem: Problem) -> float:
        raise NotImplementedError

    def external_scorer(self, problem: Problem) -> Callable[[str | None], float] | None:
        """The RL reward's verifier of ``problem`` when it is not a built-in task's (else None)."""
        return lambda answer: self.accuracy(answer, problem)

    def extractor(self, problem: Problem) -> Callable[[str], str | None]:
        """How the answer to ``problem`` is read from a reply (default: :func:`~nanoseek.tasks.reply.extract_answer`)."""
        from nanoseek.tasks.reply import extract_answer

        return extract_answer

    def score_reply(self, text: str, problem: Problem, mode: str) -> Reply:
        """(correct, well formed, extracted answer) of one reply in evaluation ``mode``."""
        from nanoseek.tasks.reply import states_answer_line
        from nanoseek.tasks.rewards import RewardConfig, score_external

        extract = self.extractor(problem)
        if mode == "fewshot":
            answer = extract(text)
            return answer is not None and self.accuracy(answer, problem) >= 1.0, states_answer_line(text), answer
        r = score_external(text, lambda a: self.accuracy(a, problem) if a is not None else 0.0,
                           RewardConfig.for_template(mode), extract)
        return bool(r.correct), bool(r.format_ok), r.answer

    def score_replies(self, items: Sequence[tuple[Problem, str]], mode: str) -> list[Reply]:
        """:meth:`score_reply` of every (problem, reply text), in order."""
        return [self.score_reply(text, p, mode) for p, text in items]


__all__ = ["Reply", "TaskSource"]
