"""Sampling metrics: how accuracy grows with k samples per question (test-time compute).

OpenAI's o1/o3 and DeepSeek-R1 report accuracy as a function of inference compute. At our scale
the knob is the number of samples k per question, with three ways to turn k samples into one
answer (or a success):

* **pass@k** (Chen et al. 2021): the chance that at least one of k samples is right, estimated
  without bias from n >= k samples with c right: ``1 - C(n-c, k) / C(n, k)``.
* **maj@k** (self-consistency, Wang et al. 2022; R1's "cons@64"): extract each sample's final
  answer, vote, and score the most common one. Answers are compared after canonicalisation
  (:func:`nanoseek.tasks.reply.canonical_answer`: numbers by value, so "7", "7.0" and "14/2"
  agree); samples with no extractable answer do not vote; a tie goes to the answer seen first in
  the subset (:func:`nanoseek.tasks.reply.majority_vote`).
* **best-of-k**: keep the sample a scorer ranks highest: a verifier (an outcome reward model,
  or the task's checker, which makes it an oracle equal to pass@k) or the model's own mean
  token log-probability (no extra model needed).

maj@k and best-of-k for k < n are expectations over k-subsets of the n samples: exact when
there are at most ``trials`` subsets, else averaged over ``trials`` random subsets (seeded).

Everything here is pure (records in, numbers out) and testable without a model; the evaluation
harness (:mod:`nanoseek.eval.harness`) draws the samples and :mod:`nanoseek.eval.results` keeps
pass@k and maj@k per problem.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Sequence

from nanoseek.tasks.reply import canonical_answer, majority_vote


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class SampleRecord:
    """What the curve needs of one sample: its extracted answer, whether it is right, a score."""

    answer: str | None
    correct: bool
    score: float = 0.0


def _subsets(n: int, k: int, trials: int, rng: random.Random) -> list[tuple[int, ...]]:
    if math.comb(n, k) <= trials:
        return list(itertools.combinations(range(n), k))
    return [tuple(rng.sample(range(n), k)) for _ in range(trials)]


def maj_at_k(samples: Sequence[SampleRecord], k: int, trials: int = 200, seed: int = 0) -> float:
    """Expected correctness of the majority answer of k of the samples."""
    right = {canonical_answer(s.answer): s.correct for s in samples if canonical_answer(s.answer) is not None}
    subsets = _subsets(len(samples), k, trials, random.Random(seed))
    hits = 0
    for sub in subsets:
        voted = majority_vote([samples[i].answer for i in sub])
        hits += bool(voted is not None and right.get(voted, False))
    return hits / len(subsets)


def best_of_k(samples: Sequence[SampleRecord], k: int, trials: int = 200, seed: int = 0) -> float:
    """Expected correctness of the highest-scoring of k of the samples (ties: the first)."""
    subsets = _subsets(len(samples), k, trials, random.Random(seed))
    hits = sum(samples[max(sub, key=lambda i: samples[i].score)].correct for sub in subsets)
    return hits / len(subsets)


def sampling_curve(problems: Sequence[Sequence[SampleRecord]], ks: Sequence[int] | None = None,
                   trials: int = 200, seed: int = 0) -> list[dict]:
    """Accuracy against k, averaged over problems: rows {k, pass@k, maj@k, best_of_k}.

    Every problem needs the same number n of samples; ks default to 1, 2, 4, ... up to n.
    """
    if not problems:
        raise ValueError("sampling_curve needs at least one problem")
    n = len(problems[0])
    if n == 0 or any(len(p) != n for p in problems):
        sizes = sorted({len(p) for p in problems})
        raise ValueError(f"every problem needs the same, non-zero number of samples; got {sizes}")
    ks = list(ks) if ks is not None else [2 ** i for i in range(int(math.log2(n)) + 1)]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k must be in [1, n={n}], got {bad}")
    rows = []
    for k in ks:
        rows.append({
            "k": k,
            "pass@k": sum(pass_at_k(n, sum(s.correct for s in p), k) for p in problems) / len(problems),
            "maj@k": sum(maj_at_k(p, k, trials, seed) for p in problems) / len(problems),
            "best_of_k": sum(best_of_k(p, k, trials, seed) for p in problems) / len(problems),
        })
    return rows


__all__ = ["pass_at_k", "SampleRecord", "maj_at_k", "best_of_k", "sampling_curve"]
