"""Sampling: temperature / top-k / top-p distributions, inverse-CDF draws, the repetition guard."""

from __future__ import annotations

import pytest
import torch

from nanoseek.infer.sampling import (GREEDY_BELOW, RowParams, SamplingParams, processed_probs, repeats_too_long,
                                     sample_from_probs)


def probs_of(logits, temperature=1.0, top_k=0, top_p=1.0):
    B = logits.shape[0]
    return processed_probs(logits, torch.full((B,), float(temperature)), torch.full((B,), top_k),
                           torch.full((B,), float(top_p)))


def test_temperature_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert torch.allclose(probs_of(logits), torch.tensor([[0.4, 0.3, 0.2, 0.1]]), atol=1e-6)
    assert torch.allclose(probs_of(logits, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0]]), atol=1e-6)
    # top-p 0.6: 0.4 alone is < 0.6, so 0.3 joins; 0.2 does not (0.7 before it)
    assert torch.allclose(probs_of(logits, top_p=0.6), torch.tensor([[4 / 7, 3 / 7, 0, 0]]), atol=1e-6)
    assert torch.allclose(probs_of(logits, top_p=0.01), torch.tensor([[1.0, 0, 0, 0]]), atol=1e-6)
    t2 = probs_of(logits, temperature=2.0)
    expect = torch.tensor([0.4, 0.3, 0.2, 0.1]) ** 0.5
    assert torch.allclose(t2, (expect / expect.sum())[None], atol=1e-6)
    # top-p applies to the top-k renormalised distribution (HF's warper order)
    assert torch.allclose(probs_of(logits, top_k=3, top_p=0.5), torch.tensor([[4 / 7, 3 / 7, 0, 0]]), atol=1e-6)


def test_rows_have_their_own_settings_and_greedy_is_one_hot():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    p = processed_probs(logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert p[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(p[1], logits[1].softmax(-1))
    rp = RowParams.build([SamplingParams(temperature=0), SamplingParams(temperature=1, top_k=1)], "cpu")
    assert not rp.all_greedy and rp.filtered
    assert rp.probs(logits).tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize("temps, top_k, top_p", [
    ([1.0] * 4, [0] * 4, [1.0] * 4),                 # GRPO's rollouts: every row at temperature 1
    ([1.0, 0.0, 1.0, 1.0], [0] * 4, [1.0] * 4),       # a greedy row among them
    ([0.7, 1.0, 1.3, 0.0], [0, 3, 0, 0], [1.0, 1.0, 0.8, 1.0]),
    ([0.0] * 4, [0] * 4, [1.0] * 4),
    ([1e-50, 1.0, 1.0000000001, 1], [0] * 4, [1.0] * 4),   # 0 and 1 in fp32: greedy, and unit rows
    ([1e-40, 0.5, 9.9999999e-6, 1.0], [0] * 4, [1.0] * 4),  # an fp32 denormal; GREEDY_BELOW in fp32
])
def test_row_params_shortcuts_give_the_same_bits(temps, top_k, top_p):
    """RowParams passes what it knows of the temperatures (a greedy row? all at 1?) so a step skips
    a host read and a division by 1: the distribution is bit for bit the one computed without."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 4
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in zip(temps, top_k, top_p)]
    rp = RowParams.build(params, "cpu")
    t32 = torch.tensor(temps, dtype=torch.float32)
    assert rp.unit_temperature == bool((t32 == 1).all()) and rp.any_greedy == any(t < GREEDY_BELOW for t in temps)
    greedy_as_zero = [0.0 if t < GREEDY_BELOW else t for t in temps]     # the host's rule decides a row
    plain = processed_probs(logits, torch.tensor(greedy_as_zero), torch.tensor(top_k), torch.tensor(top_p), rp.filtered)
    assert torch.equal(rp.probs(logits), plain)
    assert torch.equal(rp.probs(torch.stack([logits, logits], 1)), torch.stack([plain, plain], 1))


@pytest.mark.parametrize("t", [0.0, 1e-45, 1e-40, 1e-30, 1e-12, 9.99e-6, 9.9999999e-6])
def test_temperatures_below_greedy_below_are_greedy(t):
    """The limit of sampling as the temperature goes to 0. Before, 1e-40 (an fp32 denormal, > 0)
    divided logits into inf: a NaN distribution, and the sampler returned the last token id every
    step; 9.9999999e-6 rounds to fp32's 1e-5, so the host and the tensor must not judge it apart."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 30
    top = logits.argmax(-1)
    logits[torch.arange(3), (top + 1) % 50] = logits[torch.arange(3), top] - 3e-5   # sampled: not one-hot
    onehot = torch.nn.functional.one_hot(top, 50).float()
    assert SamplingParams(temperature=t).greedy
    rp = RowParams.build([SamplingParams(temperature=t), SamplingParams(temperature=1.0), SamplingParams(temperature=t)], "cpu")
    probs = rp.probs(logits)
    assert torch.equal(probs[[0, 2]], onehot[[0, 2]]) and torch.allclose(probs[1], logits[1].softmax(-1))
    if t != 9.9999999e-6:                    # a caller's own fp32 tensor (no host rule applied)
        assert torch.equal(probs_of(logits, temperature=t), onehot)
    assert sample_from_probs(probs, torch.rand(3))[[0, 2]].tolist() == logits.argmax(-1)[[0, 2]].tolist()


@pytest.mark.parametrize("t", [GREEDY_BELOW, 2e-5, 1e-3])
def test_small_temperatures_from_greedy_below_on_sample(t):
    """At GREEDY_BELOW and above a row samples (not greedy) and its distribution is finite."""
    assert not SamplingParams(temperature=t).greedy
    logits = torch.tensor([[0.0, 1e-6, -5.0] + [-30.0] * 5]) * 100
    p = probs_of(logits, temperature=t)
    assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-6
    assert p[0, 2:].sum() == 0 and 0 < p[0, 0] < 1                # the near-tie shares the mass


def test_argmax_by_max_is_torch_argmax():
    """Greedy steps take max(dim=-1).indices (faster on a CPU): the same index as argmax on tied
    maxima (the first), NaN (its index) and all -inf rows, fp32 and bf16, for rows of any length."""
    from nanoseek.infer.sampling import argmax

    g = torch.Generator().manual_seed(0)
    for V in (1, 7, 64, 4096):
        x = torch.randint(-3, 3, (16, V), generator=g).float()          # many ties
        x[3, V // 2] = float("nan")
        x[5] = float("-inf")
        for t in (x, x.bfloat16(), x[:, None, :][:, -1]):
            assert torch.equal(argmax(t), t.argmax(dim=-1))


def test_inverse_cdf_sampling():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(4, 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.999999])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3]   # zero-probability tokens never drawn
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    assert sample_from_probs(one_hot, torch.tensor([0.0])).item() == 2
    assert sample_from_probs(one_hot * 0.9999, torch.tensor([0.99999])).item() == 2  # unnormalised rows
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = sample_from_probs(p.expand(100_000, 4), torch.rand(100_000))
    assert torch.allclose(torch.bincount(draws, minlength=4).float() / 100_000, p, atol=0.01)


def test_sample_rng_is_per_seed_and_index():
    a = SamplingParams(seed=1)
    assert a.sample_rng(0).random() == SamplingParams(seed=1).sample_rng(0).random()
    assert a.sample_rng(0).random() != a.sample_rng(1).random()
    assert a.sample_rng(0).random() != SamplingParams(seed=2).sample_rng(0).random()


def test_repetition_guard():
    assert not repeats_too_long([1, 2, 3, 4] * 2, 8)
    assert repeats_too_long([9, 1, 2] + [5] * 8, 8)                 # one token 8 times
    assert repeats_too_long([7] + [1, 2] * 4, 8)                     # a bigram 4 times
    assert not repeats_too_long([1, 2, 3] * 3, 8)                    # a trigram: n > G // 4
    assert repeats_too_long([1, 2, 3] * 4, 12)
    assert not repeats_too_long([5] * 7, 8)                          # not long enough yet
    assert not repeats_too_long([5] * 50, 0)                         # off


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", -1, "max_new_tokens"), ("temperature", -1.0, "temperature"), ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"), ("n", 0, "n"), ("stop", [""], "stop"), ("repetition_guard", 2, "repetition_guard"),
    ("stop_token_ids", [-1], "stop_token_ids"),
    # inf (or 1e39, inf in fp32) made a banned token's -inf logit NaN: the last token id every step
    ("temperature", float("inf"), "temperature"), ("temperature", 1e39, "temperature"),
    ("temperature", float("nan"), "temperature"), ("temperature", 100.5, "temperature"),
])
def test_params_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**{field: value}).validate()
    assert SamplingParams(stop="x").validate().stop == ["x"]


def test_row_params_on_several_positions_per_row():
    rp = RowParams.build([SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.8)], "cpu")
    logits = torch.randn(2, 3, 11)
    together = rp.probs(logits)
    for j in range(3):
        assert torch.allclose(together[:, j], rp.probs(logits[:, j]))
