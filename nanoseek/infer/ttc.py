"""Test-time compute: more samples per question, and how accuracy grows with them.

OpenAI's o1/o3 and DeepSeek-R1 report accuracy as a function of inference compute. At our scale
the knob is the number of samples k per question, with three ways to turn k samples into one
answer (or a success):

* **pass@k** (Chen et al. 2021): the chance that at least one of k samples is right, estimated
  without bias from n >= k samples with c right: ``1 - C(n-c, k) / C(n, k)``.
* **maj@k** (self-consistency, Wang et al. 2022; R1's "cons@64"): extract each sample's final
  answer, vote, and score the most common one. Answers are compared after canonicalisation
  (numbers by value, so "7", "7.0" and "14/2" agree); samples with no extractable answer do not
  vote; a tie goes to the answer seen first in the subset.
* **best-of-k**: keep the sample a scorer ranks highest: a verifier (an outcome reward model,
  or the task's checker, which makes it an oracle equal to pass@k) or the model's own mean
  token log-probability (no extra model needed).

maj@k and best-of-k for k < n are expectations over k-subsets of the n samples: exact when
there are at most ``trials`` subsets, else averaged over ``trials`` random subsets (seeded).

:func:`sampling_curve` is pure (records in, table out) and testable without a model;
:func:`evaluate_task` samples a task set with the engine and builds the curve. Run it as
``python -m nanoseek.infer.ttc --model RUN_OR_CHECKPOINT --task arithmetic``.
"""

from __future__ import annotations

import argparse

from nanoseek import limits
import itertools
import json
import math
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def canonical_answer(answer: str | None) -> str | None:
    """The form answers are compared in for voting: numbers by exact value, else lower-case text
    with whitespace collapsed; None / empty stays None (no vote)."""
    if answer is None:
        return None
    text = " ".join(str(answer).split())
    if not text:
        return None
    number = text.replace(",", "")
    try:
        if "/" in number:
            a, b = number.split("/", 1)
            return str(Fraction(int(a), int(b)))
        return str(Fraction(number))
    except (ValueError, ZeroDivisionError):
        return text.lower()


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common canonical answer (ties: the one seen first); None if nobody answered."""
    votes = [a for a in (canonical_answer(x) for x in answers) if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


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


def format_curve(rows: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'k':>5} {'pass@k':>8} {'maj@k':>8} {'best-of-k':>10}")
    for r in rows:
        lines.append(f"{r['k']:>5} {r['pass@k']:>8.3f} {r['maj@k']:>8.3f} {r['best_of_k']:>10.3f}")
    return "\n".join(lines)


def plot_curve(rows: list[dict], path: str, title: str = "") -> None:
    """Accuracy against samples (log2 x axis) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("pass@k", "pass@k (any correct)"), ("maj@k", "maj@k (self-consistency)"),
                       ("best_of_k", "best-of-k (mean log-prob)")):
        ax.plot(ks, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per question (k)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- with a model

def task_prompt_ids(tokenizer, prompt: str, style: str = "chat") -> list[int]:
    """Token ids of a question: "chat" = the chat template with an open ``<think>`` (R1),
    "r1-zero" = R1-Zero's plain-text template, "plain" = BOS + the question. The question is
    text in every style: only the template makes control tokens."""
    if style == "chat":
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True, think=True)[0]
    if style == "r1-zero":
        from nanoseek.tasks.generators import r1_zero_segments

        return [tokenizer.bos_id] + tokenizer.encode_segments(r1_zero_segments(prompt))
    if style == "plain":
        return [tokenizer.bos_id] + tokenizer.encode_text(prompt)
    raise ValueError(f"prompt style must be 'chat', 'r1-zero' or 'plain', got {style!r}")


def evaluate_task(engine, tokenizer, task_name: str, n_problems: int, n_samples: int, params=None,
                  ks: Sequence[int] | None = None, split: str = "test", seed: int = 0, style: str = "chat",
                  level: int | None = None, scorer: Callable | None = None) -> dict:
    """Sample ``n_samples`` completions for ``n_problems`` problems of a task; the curve and records.

    ``scorer(completion) -> float`` ranks samples for best-of-k (default: mean token log-prob).
    Samples of one problem are split into requests of at most ``engine.max_batch_size``.
    """
    from nanoseek.tasks.generators import extract_answer, get_task

    from .sampling import SamplingParams

    task = get_task(task_name)
    problems = task.generate(split, n_problems, seed=seed, level=level)
    base = params or SamplingParams(max_new_tokens=256, temperature=0.6, top_p=0.95)  # R1's evaluation settings
    scorer = scorer or (lambda c: c.mean_logprob)
    per_request = min(n_samples, engine.max_batch_size)
    prompts = [task_prompt_ids(tokenizer, p.prompt, style) for p in problems]
    completions: list[list] = [[] for _ in problems]
    for chunk, start in enumerate(range(0, n_samples, per_request)):
        n = min(per_request, n_samples - start)
        p = SamplingParams(**{**asdict(base), "n": n, "seed": (base.seed or 0) * 7919 + chunk})
        for i, comps in enumerate(engine.generate(prompts, p)):
            completions[i].extend(comps)
    records = []
    for prob, comps in zip(problems, completions):
        recs = []
        for c in comps:
            answer = extract_answer(c.text)
            recs.append(SampleRecord(answer, answer is not None and task.verify(answer, prob), float(scorer(c))))
        records.append(recs)
    return {"task": task_name, "split": split, "problems": n_problems, "samples": n_samples,
            "curve": sampling_curve(records, ks, seed=seed),
            "records": [[asdict(r) for r in recs] for recs in records]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoseek.infer.ttc",
                                description="Accuracy against the number of samples (pass@k, maj@k, best-of-k) "
                                            "on a built-in task set.")
    p.add_argument("--model", required=True, help="run folder or HF checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: found next to the model)")
    p.add_argument("--task", default="arithmetic", help="task name (nanoseek.tasks.generators), default arithmetic")
    p.add_argument("--problems", type=limits.positive_int, default=32, help="number of held-out problems (default 32)")
    p.add_argument("--samples", type=limits.positive_int, default=16, help="samples per problem n (default 16)")
    p.add_argument("--level", type=limits.positive_int, help="task difficulty level (default: all levels mixed)")
    p.add_argument("--style", default="chat", choices=["chat", "r1-zero", "plain"], help="prompt format")
    p.add_argument("--max-new-tokens", type=limits.positive_int, default=256)
    p.add_argument("--temperature", type=limits.temperature, default=0.6)
    p.add_argument("--top-p", type=limits.open_prob, default=0.95)
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--batch-size", type=limits.positive_int, default=16, help="engine cache rows (default 16)")
    p.add_argument("--json", help="write the curve and per-sample records to this JSON file")
    p.add_argument("--plot", help="write the accuracy-vs-samples plot to this PNG")
    args = p.parse_args(argv)

    from .engine import Engine
    from .loading import load_for_inference
    from .sampling import SamplingParams

    model, tokenizer = load_for_inference(args.model, tokenizer_path=args.tokenizer, require_tokenizer=True)
    engine = Engine(model, tokenizer, max_batch_size=args.batch_size)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    result = evaluate_task(engine, tokenizer, args.task, args.problems, args.samples, params,
                           seed=args.seed, style=args.style, level=args.level)
    title = f"{args.task} ({args.problems} test problems, {args.samples} samples each)"
    print(format_curve(result["curve"], title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot_curve(result["curve"], args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
