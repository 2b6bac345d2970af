"""Sampling metrics: pass@k, majority vote, best-of-n and the accuracy-vs-samples curve."""

from __future__ import annotations

import math

import pytest

from conftest import make_tiny_model
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.eval.sampling_metrics import SampleRecord, best_of_k, maj_at_k, pass_at_k, sampling_curve
from nanoseek.infer.engine import Engine
from nanoseek.tasks.reply import canonical_answer, majority_vote


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert pass_at_k(5, 1, 5) == 1.0                   # n - c < k: some subset always holds it
    assert pass_at_k(100, 7, 10) == pytest.approx(1 - math.comb(93, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_canonical_answers_and_vote():
    assert canonical_answer("7") == canonical_answer("7.0") == canonical_answer("14/2") == canonical_answer(" 7 ")
    assert canonical_answer("1,000") == "1000"
    assert canonical_answer("  Paris ") == "paris"
    assert canonical_answer("") is None and canonical_answer(None) is None
    assert majority_vote(["3", "4", "4.0", None, "3", "4"]) == "4"
    assert majority_vote(["5", "6"]) == "5"            # tie: first seen
    assert majority_vote([None, None]) is None


def test_maj_and_best_of_k_exact_over_subsets():
    # answers a (right) x2, b (wrong) x1: maj@1 = 2/3; maj@3 = 1; maj@2 = P(subset has both a) + ties...
    s = [SampleRecord("a", True, 0.0), SampleRecord("a", True, -5.0), SampleRecord("b", False, -1.0)]
    assert maj_at_k(s, 1) == pytest.approx(2 / 3)
    assert maj_at_k(s, 3) == 1.0
    # k=2 subsets: {0,1} -> a; {0,2} tie a/b, a first -> right; {1,2} tie, a first -> right
    assert maj_at_k(s, 2) == 1.0
    # best-of-k by score: {0,1}->0 right, {0,2}->0 right, {1,2}->2 wrong
    assert best_of_k(s, 2) == pytest.approx(2 / 3)
    assert best_of_k(s, 3) == 1.0


def test_sampling_curve_rows_and_monotone_pass_at_k():
    problems = [
        [SampleRecord("1", True, -1), SampleRecord("2", False, -2), SampleRecord("2", False, -3),
         SampleRecord(None, False, -9)],
        [SampleRecord("x", False, -1), SampleRecord("y", True, -0.5), SampleRecord("y", True, -2),
         SampleRecord("y", True, -4)],
    ]
    rows = sampling_curve(problems)
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[0]["pass@k"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert rows[-1]["pass@k"] == 1.0
    assert rows[-1]["maj@k"] == pytest.approx(0.5)     # problem 1 votes "2" (wrong), problem 2 votes "y"
    assert rows[-1]["best_of_k"] == pytest.approx(1.0)  # highest score is right in both
    assert all(a["pass@k"] <= b["pass@k"] for a, b in zip(rows, rows[1:]))
    with pytest.raises(ValueError, match="same"):
        sampling_curve([problems[0], problems[1][:2]])


def test_harness_end_to_end_with_a_tiny_model():
    """The harness's per-problem pass@k / maj@k on a real engine: every k-subset is enumerated
    here, so a right vote needs a right sample (maj@k <= pass@k), and pass@k grows with k."""
    from nanoseek.eval.harness import evaluate

    model = make_tiny_model(seed=0, vocab_size=264).eval()
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, max_seq_len=160)
    result = evaluate(model, ByteTokenizer(), "arithmetic", n_problems=2, k=6, mode="chat", temperature=1.0,
                      max_new_tokens=4, seed=1, engine=engine)
    assert len(result.problems) == 2 and all(len(p.correct) == 6 for p in result.problems)
    for p in result.problems:
        assert sorted(p.pass_at) == sorted(p.maj_at) == [1, 2, 4, 6]
        for k in p.pass_at:
            assert p.maj_at[k] <= p.pass_at[k] + 1e-9
        assert all(a <= b for a, b in zip(list(p.pass_at.values()), list(p.pass_at.values())[1:]))
