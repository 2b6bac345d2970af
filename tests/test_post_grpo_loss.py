"""GRPO's pure math against hand-computed numbers: advantages, k3 KL, clipping, aggregations."""

import math

import pytest
import torch

from nanoseek.post.grpo_loss import (aggregate, group_advantages, grpo_loss, k3_kl, overlong_penalty,
                                     token_entropy, token_logprobs, zero_std_groups)


def test_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])           # two groups of 3
    a = group_advantages(r, 3)
    # group [1, 0, 0]: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected = torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s])
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    # Dr. GRPO: no std scaling
    torch.testing.assert_close(group_advantages(r, 3, scale_rewards=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3, -1 / 3, -1 / 3]))


def test_all_equal_group_has_zero_advantage():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 1.0])
    for scale in (True, False):
        a = group_advantages(r, 4, scale_rewards=scale)
        assert torch.equal(a[:8], torch.zeros(8))
        assert a[8:].abs().min() > 0.1
    assert zero_std_groups(r, 4).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)


def test_k3_kl_zero_when_equal_and_hand_value():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    # pi = 0.5, pi_ref = 0.25: ratio 0.5 -> 0.5 - ln 0.5 - 1 = 0.193147...
    kl = k3_kl(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25)))
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    # grpo_loss: with policy == reference, the KL term adds nothing
    lp = torch.tensor([[-1.0, -2.0]])
    out = grpo_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 2), ref_logp=lp.clone(), beta=0.5)
    assert out.kl.item() == 0.0
    assert out.loss.item() == pytest.approx(-1.0)


def _one_token(rho: float, adv: float, eps_low=0.2, eps_high=0.3):
    logp = torch.tensor([[math.log(rho)]], requires_grad=True)
    out = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1),
                    eps_low=eps_low, eps_high=eps_high)
    out.loss.backward()
    return out, logp.grad.item()


def test_clipped_ratio_at_both_bounds():
    # A > 0: the objective is capped at (1 + eps_high) A and the gradient vanishes above it
    out, g = _one_token(1.5, 2.0)
    assert out.loss.item() == pytest.approx(-1.3 * 2.0) and g == 0.0 and out.clip_high_frac.item() == 1.0
    out, g = _one_token(1.2, 2.0)                               # inside: -rho A, d/dlogp = -rho A
    assert out.loss.item() == pytest.approx(-2.4) and g == pytest.approx(-2.4) and out.clip_frac.item() == 0
    # A < 0: capped at (1 - eps_low) A below the low bound, no gradient there
    out, g = _one_token(0.5, -1.0)
    assert out.loss.item() == pytest.approx(0.8) and g == 0.0 and out.clip_low_frac.item() == 1.0
    # ...but a ratio above 1 + eps_high with A < 0 is NOT clipped (pessimistic min keeps rho A)
    out, g = _one_token(1.5, -1.0)
    assert out.loss.item() == pytest.approx(1.5) and g == pytest.approx(1.5) and out.clip_frac.item() == 0
    # and a ratio below 1 - eps_low with A > 0 keeps rho A too
    out, g = _one_token(0.5, 1.0)
    assert out.loss.item() == pytest.approx(-0.5) and g == pytest.approx(-0.5)


# A hand example: 2 sequences, max length 3; sequence 0 has 3 valid tokens, sequence 1 has 1.
# rho = 1 everywhere (on-policy first pass), so the per-token loss is -A (+ beta KL).
LOGP = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("mode,expected", [
    ("grpo", ((-1 - 1 - 1) / 3 + 2 / 1) / 2),                  # mean of per-sequence means = 0.5
    ("dapo", (-1 - 1 - 1 + 2) / 4),                              # token mean = -0.25
    ("dr_grpo", (-1 - 1 - 1 + 2) / (2 * 5)),                     # sum / (sequences * max_len 5) = -0.1
])
def test_loss_aggregation_hand_computed(mode, expected):
    out = grpo_loss(LOGP, LOGP, ADV, MASK, loss_agg=mode, max_len=5)
    assert out.loss.item() == pytest.approx(expected)


def test_aggregation_with_kl_hand_computed():
    # reference log-probs differ by d = ref - logp = ln 0.5 on every token: k3 = 0.5 + ln 2 - 1
    k = 0.5 + math.log(2) - 1
    out = grpo_loss(LOGP, LOGP, ADV, MASK, ref_logp=LOGP + math.log(0.5), beta=0.1, loss_agg="dapo")
    assert out.loss.item() == pytest.approx((-1 - 1 - 1 + 2) / 4 + 0.1 * k)
    assert out.kl.item() == pytest.approx(k)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LOGP, LOGP, ADV, MASK, beta=0.1)


def test_microbatch_normalisers_sum_to_full_batch():
    torch.manual_seed(0)
    per_tok = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    mask[:, 0] = 1
    for mode in ("grpo", "dapo", "dr_grpo"):
        full = aggregate(per_tok, mask, mode, max_len=6)
        parts = sum(aggregate(per_tok[i:i + 2], mask[i:i + 2], mode, max_len=6, total_sequences=4,
                              total_tokens=mask.sum().item()) for i in (0, 2))
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(per_tok, mask, "mean")


def test_overlong_penalty():
    lengths = torch.tensor([10, 16, 18, 20, 25])
    # max_len 20, buffer 4: free up to 16, linear to -1 at 20
    assert overlong_penalty(lengths, 20, 4).tolist() == pytest.approx([0, 0, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 20, 0).tolist() == [0] * 5


def test_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    assert token_entropy(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
