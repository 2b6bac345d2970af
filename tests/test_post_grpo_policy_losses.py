"""GSPO and CISPO (``[grpo] policy_loss``) against hand computations, and the clip loss unchanged.

Float64, small tensors, padding in the masks holding garbage log-probs that must not count, ratios
inside, at and beyond the clip bounds; values and gradients. A short GRPO run with each new policy
loss must still train (the digit-7 task of tests/test_post_grpo.py).
"""

import math

import pytest
import torch

from nanoseek.post.grpo import GRPOSection
from nanoseek.post.grpo_loss import POLICY_LOSSES, aggregate, grpo_loss, k3_kl

D = torch.float64
GARBAGE = 7.0          # log-prob written into padding: any leak into the loss or the ratio shows


def _leaf(x):
    return torch.tensor(x, dtype=D, requires_grad=True)


def _run(logp_rows, old_rows, adv, mask_rows, **kw):
    logp = _leaf(logp_rows)
    out = grpo_loss(logp, torch.tensor(old_rows, dtype=D), torch.tensor(adv, dtype=D), torch.tensor(mask_rows),
                    **kw)
    out.loss.backward()
    return out, logp.grad


# ----------------------------------------------------------------------------- GSPO
def test_gspo_sequence_ratio_value_and_gradient_by_hand():
    # seq 0: 3 valid tokens, log ratios 0.1, 0.2, 0.0 -> s0 = e^0.1 = 1.105 (inside [0.8, 1.3]), A0 = +1
    # seq 1: 2 valid tokens + 1 pad, log ratios 0.5, 0.3 -> s1 = e^0.4 = 1.492 > 1.3 with A1 = +2: clipped
    # seq 2: 1 valid token + 2 pads, log ratio ln 0.5 -> s2 = 0.5 < 0.8 with A2 = -1: clipped
    # seq 3: 2 valid tokens, log ratios ln 2, ln 2 -> s3 = 2 > 1.3 with A3 = -0.5: NOT clipped (pessimistic min)
    old = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0], [-3.0, 0.0, 0.0], [-1.0, -1.0, 0.0]]
    lr = [[0.1, 0.2, 0.0], [0.5, 0.3, 0.0], [math.log(0.5), 0.0, 0.0], [math.log(2), math.log(2), 0.0]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]]
    logp = [[o + r if m else GARBAGE for o, r, m in zip(orow, rrow, mrow)] for orow, rrow, mrow in zip(old, lr, mask)]
    adv = [1.0, 2.0, -1.0, -0.5]
    out, g = _run(logp, old, adv, mask, eps_low=0.2, eps_high=0.3, policy_loss="gspo", loss_agg="grpo")
    s0, s3 = math.exp(0.1), 2.0
    objective = [s0 * 1.0, 1.3 * 2.0, 0.8 * -1.0, s3 * -0.5]                  # per sequence
    assert out.loss.item() == pytest.approx(-sum(objective) / 4, abs=1e-12)
    # d loss / d logp_it = -(1/B) A_i s_i / |o_i| on the valid tokens of unclipped sequences, else 0
    expected = torch.zeros(4, 3, dtype=D)
    expected[0, :3] = -(1 / 4) * 1.0 * s0 / 3
    expected[3, :2] = -(1 / 4) * -0.5 * s3 / 2
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=0)
    # clip fractions count tokens of clipped sequences: seq 1 (2 tokens, high), seq 2 (1 token, low) of 8
    assert out.clip_high_frac.item() == pytest.approx(2 / 8) and out.clip_low_frac.item() == pytest.approx(1 / 8)
    assert out.ratio_mean.item() == pytest.approx((3 * s0 + 2 * math.exp(0.4) + 0.5 + 2 * 2) / 8)


@pytest.mark.parametrize("A,bound", [(1.0, "high"), (-1.0, "low")])
def test_gspo_at_and_beyond_the_small_clip_bounds(A, bound):
    # the paper's epsilons: s clipped to [1 - 3e-4, 1 + 4e-4]; a sequence of 4 equal token log ratios
    eps_low, eps_high = 3e-4, 4e-4
    edge = math.log(1 + eps_high) if bound == "high" else math.log(1 - eps_low)
    vals = {}
    for name, lr in (("inside", edge * (1 - 1e-6)), ("beyond", edge * (1 + 1e-6)), ("far", edge * 3)):
        out, g = _run([[lr] * 4], [[0.0] * 4], [A], [[1, 1, 1, 1]], eps_low=eps_low, eps_high=eps_high,
                      policy_loss="gspo")
        vals[name] = (out.loss.item(), g)
    s_in = math.exp(edge * (1 - 1e-6))
    torch.testing.assert_close(vals["inside"][1], torch.full((1, 4), -A * s_in / 4, dtype=D), atol=1e-12, rtol=0)
    assert torch.equal(vals["beyond"][1], torch.zeros(1, 4, dtype=D))           # clipped: no gradient
    assert torch.equal(vals["far"][1], torch.zeros(1, 4, dtype=D))
    clipped = -(1 + eps_high) * A if bound == "high" else -(1 - eps_low) * A
    assert vals["inside"][0] == pytest.approx(clipped, abs=1e-8)                  # continuous at the bound
    assert vals["beyond"][0] == pytest.approx(clipped, abs=1e-15) and vals["far"][0] == pytest.approx(clipped)


def test_gspo_on_policy_is_the_sequence_level_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, dtype=D).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    A = torch.tensor([0.7, -1.3, 0.4], dtype=D)
    out = grpo_loss(logp, logp.detach(), A, mask, policy_loss="gspo", eps_low=3e-4, eps_high=4e-4)
    (g,) = torch.autograd.grad(out.loss, logp)
    # -1/B sum_i A_i 1/|o_i| sum_t log pi(o_it): the length-normalised REINFORCE gradient
    pg = -(A * (logp * mask).sum(1) / mask.sum(1)).mean()
    (g_ref,) = torch.autograd.grad(pg, logp)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    assert out.ratio_mean.item() == pytest.approx(1.0) and out.clip_frac.item() == 0.0
    assert out.loss.item() == pytest.approx(-A.mean().item())                   # s = 1: -mean(A)


# ----------------------------------------------------------------------------- CISPO
def test_cispo_clipped_weight_value_and_gradient_by_hand():
    # weights clip(rho, 1 - eps_low, 1 + eps_high), detached; every token keeps w A grad log pi
    rho = [[0.5, 1.2, 7.0], [0.01, 6.0, 1.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    old = [[-1.0, -2.0, -0.5], [-0.3, -1.5, 0.0]]
    logp = [[o + math.log(r) if m else GARBAGE for o, r, m in zip(orow, rrow, mrow)]
            for orow, rrow, mrow in zip(old, rho, mask)]
    adv = [1.0, -2.0]
    for eps_low, eps_high, w in ((1.0, 4.0, [[0.5, 1.2, 5.0], [0.01, 5.0]]),       # MiniMax-M1: no lower bound
                                 (0.2, 0.3, [[0.8, 1.2, 1.3], [0.8, 1.3]])):
        out, g = _run(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, policy_loss="cispo",
                      loss_agg="dapo")
        n = 5                                                                     # valid tokens
        per_tok = [-w[i][t] * adv[i] * logp[i][t] for i in range(2) for t in range(3) if mask[i][t]]
        assert out.loss.item() == pytest.approx(sum(per_tok) / n, abs=1e-12)
        expected = torch.tensor([[-w[0][0] * 1.0 / n, -w[0][1] * 1.0 / n, -w[0][2] * 1.0 / n],
                                 [-w[1][0] * -2.0 / n, -w[1][1] * -2.0 / n, 0.0]], dtype=D)
        torch.testing.assert_close(g, expected, atol=1e-12, rtol=0)                # clipped tokens keep a gradient
        assert out.clip_high_frac.item() == pytest.approx(2 / 5)                     # rho 7 and 6, whatever A
        assert out.clip_low_frac.item() == pytest.approx(0 if eps_low == 1.0 else 2 / 5)


def test_cispo_at_the_bound_and_its_gradient_never_vanishes():
    # A ratio just inside and just beyond 1 + eps_high: the weight is continuous and the gradient is -w A
    for rho, w in ((5.0 * (1 - 1e-9), 5.0 * (1 - 1e-9)), (5.0 * (1 + 1e-9), 5.0), (50.0, 5.0)):
        out, g = _run([[math.log(rho)]], [[0.0]], [1.5], [[1]], eps_low=1.0, eps_high=4.0, policy_loss="cispo")
        assert g.item() == pytest.approx(-w * 1.5, rel=1e-12)
        assert out.loss.item() == pytest.approx(-w * 1.5 * math.log(rho), rel=1e-12)
    # on-policy CISPO is the token-level REINFORCE gradient -A grad log pi (aggregated as chosen)
    torch.manual_seed(1)
    logp = torch.randn(2, 4, dtype=D).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    A = torch.tensor([0.5, -1.0], dtype=D)
    out = grpo_loss(logp, logp.detach(), A, mask, policy_loss="cispo", eps_low=1.0, eps_high=4.0, loss_agg="dapo")
    (g,) = torch.autograd.grad(out.loss, logp)
    (g_ref,) = torch.autograd.grad(-(A[:, None] * logp * mask).sum() / mask.sum(), logp)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- the clip loss is unchanged
def _clip_loss_before(logp, old, adv, mask, ref, beta, eps_low, eps_high, agg, max_len):
    """GRPO's loss as nanoseek computed it before the policy-loss registry (the formula, written out)."""
    A = adv.unsqueeze(1)
    ratio = torch.exp(logp - old)
    obj = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    kl = k3_kl(logp, ref) if beta > 0 else torch.zeros_like(logp)
    return aggregate(-(obj - beta * kl), mask.to(logp.dtype), agg, max_len=max_len)


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_clip_policy_loss_values_and_gradients_are_as_before(agg):
    torch.manual_seed(2)
    logp = (torch.randn(4, 6, dtype=D) * 0.3 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 6, dtype=D) * 0.3            # ratios on both sides of both bounds
    ref = logp.detach() + torch.randn(4, 6, dtype=D) * 0.1
    mask = (torch.rand(4, 6) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(4, dtype=D)
    for policy in (None, "clip"):
        kw = {} if policy is None else {"policy_loss": policy}
        out = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.05, eps_low=0.2, eps_high=0.28, loss_agg=agg,
                        max_len=6, **kw)
        before = _clip_loss_before(logp, old, adv, mask, ref, 0.05, 0.2, 0.28, agg, 6)
        assert out.loss.item() == pytest.approx(before.item(), abs=1e-12)
        g, g_before = (torch.autograd.grad(x, logp)[0] for x in (out.loss, before))
        torch.testing.assert_close(g, g_before, atol=1e-12, rtol=0)
        assert out.clip_frac.item() > 0                                    # the bounds were exercised


def test_unknown_policy_loss_and_config_keys():
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), policy_loss="ppo")
    assert set(POLICY_LOSSES) == {"clip", "gspo", "cispo"}
    assert GRPOSection().clip_range == (0.2, 0.2)
    assert GRPOSection(policy_loss="gspo").validate().clip_range == (3e-4, 4e-4)
    assert GRPOSection(policy_loss="cispo", cispo_eps_high=2.0).validate().clip_range == (1.0, 2.0)
    for bad, needle in [({"policy_loss": "ppo"}, "policy_loss = 'ppo'"), ({"gspo_eps_low": 1.0}, "gspo_eps_low"),
                        ({"gspo_eps_high": -1e-4}, "gspo_eps_high"), ({"cispo_eps_low": 1.5}, "cispo_eps_low"),
                        ({"cispo_eps_high": -1.0}, "cispo_eps_high"), ({"eps_low": 1.0}, "eps_low = 1.0")]:
        with pytest.raises(ValueError, match=needle):
            GRPOSection(**bad).validate()
