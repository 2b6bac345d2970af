"""The spike guard's decisions in isolation (the trainer-level tests are in test_train_loop.py)."""

from __future__ import annotations

import math

from nanoseek.train.config import SpikeSection
from nanoseek.train.spike import SpikeGuard, Verdict


def feed(g: SpikeGuard, losses, start=0):
    return [g.observe(start + i, x, 1.0).verdict for i, x in enumerate(losses)]


def test_non_finite_is_always_skipped_even_disabled_and_early():
    g = SpikeGuard(SpikeSection(enabled=False))
    assert g.observe(0, math.nan, 1.0).verdict is Verdict.SKIP
    assert g.observe(1, 2.0, math.inf).verdict is Verdict.SKIP
    assert "non-finite gradient norm" in g.observe(2, 2.0, math.nan).reason
    assert g.observe(3, 1e9, 1.0).verdict is Verdict.OK          # statistics are off when disabled


def test_fast_spike_after_min_history_by_sigma_and_by_ratio():
    early = SpikeGuard(SpikeSection(window=10, min_history=5, sigma=6.0, ratio=0.0, max_skips=0, trend_factor=0))
    assert feed(early, [3.0, 3.1, 100.0]) == [Verdict.OK] * 3       # no verdict before min_history
    g = SpikeGuard(SpikeSection(window=10, min_history=5, sigma=6.0, ratio=0.0, max_skips=0, trend_factor=0))
    assert feed(g, [3.0, 3.1, 2.9, 3.0, 3.05, 2.95, 3.0]) == [Verdict.OK] * 7
    d = g.observe(7, 5.0, 1.0)
    assert d.verdict is Verdict.SKIP and "robust std" in d.reason
    assert g.observe(8, 3.0, 1.0).verdict is Verdict.OK
    assert 5.0 not in g.losses                                      # a skipped loss is not history
    r = SpikeGuard(SpikeSection(window=10, min_history=3, sigma=0.0, tail=0.0, ratio=2.0, max_skips=0, trend_factor=0))
    feed(r, [3.0, 3.0, 3.0])
    assert r.observe(3, 5.9, 1.0).verdict is Verdict.OK and r.observe(4, 6.1, 1.0).verdict is Verdict.SKIP


def test_std_floor_keeps_a_flat_plateau_from_flagging_noise():
    g = SpikeGuard(SpikeSection(window=10, min_history=5, sigma=6.0, ratio=0, trend_factor=0))
    feed(g, [2.0] * 8)                                               # std 0
    assert g.observe(8, 2.1, 1.0).verdict is Verdict.OK             # within 6 x 1% of the mean
    assert g.observe(9, 2.2, 1.0).verdict is Verdict.SKIP


def test_repeated_skips_recheck_the_last_accepted_batch_and_roll_back_only_if_it_fails():
    g = SpikeGuard(SpikeSection(window=10, min_history=3, max_skips=2, skip_window=5, trend_factor=0))
    feed(g, [3.0, 3.0, 3.0])
    asked = []

    def healthy():
        asked.append(1)
        return 3.0, 1.0

    assert g.observe(3, 100.0, 1.0, recheck=healthy).verdict is Verdict.SKIP and not asked   # 1 skip: no check
    feed(g, [3.0] * 5, 4)
    assert g.observe(9, 100.0, 1.0, recheck=healthy).verdict is Verdict.SKIP         # the first skip left the window
    d = g.observe(10, math.nan, 1.0, recheck=healthy)
    assert d.verdict is Verdict.SKIP and asked == [1]          # 2 skips: checked, the weights are fine: bad data
    for k in range(11, 60):                                    # a long garbage document: skipped, never rolled back
        assert g.observe(k, 100.0, 1.0, recheck=healthy).verdict is Verdict.SKIP
    assert g.observe(60, 100.0, 1.0).verdict is Verdict.SKIP   # nothing to re-check: skip
    d = g.observe(61, 100.0, 1.0, recheck=lambda: (90.0, 1.0))  # the model now fails an ordinary batch
    assert d.verdict is Verdict.ROLLBACK and "fails the last accepted batch" in d.reason
    d = g.observe(62, 3.0, math.nan, recheck=lambda: (3.0, math.nan))  # ...or its gradient is not finite
    assert d.verdict is Verdict.ROLLBACK and "non-finite gradient" in d.reason


def test_upward_trend_asks_for_a_rollback_and_state_round_trips():
    c = SpikeSection(window=20, min_history=4, sigma=0, ratio=0, trend_window=4, trend_factor=1.5)
    g = SpikeGuard(c)
    feed(g, [4.0, 3.0, 2.0, 2.0, 2.0, 2.0])                          # best lower quartile 2.0
    state = g.state_dict()
    verdicts = feed(g, [2.5, 3.5, 4.5, 5.5], 6)                      # quartiles 2.0, 2.0, 2.375, 3.25
    assert verdicts == [Verdict.OK, Verdict.OK, Verdict.OK, Verdict.ROLLBACK]
    h = SpikeGuard(c)
    h.load_state_dict(__import__("json").loads(__import__("json").dumps(state)))
    assert feed(h, [2.5, 3.5, 4.5, 5.5], 6) == verdicts
