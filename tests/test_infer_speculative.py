"""MTP self-speculative decoding: the acceptance rule, and greedy output identical with and without it."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.speculative import speculative_accept

VOCAB = 264
PROMPTS = [[256, 5, 6, 7, 8, 9], [10], [1, 2, 3, 99, 100]]


def agreeing_model(attn_scale: float, seed: int = 0):
    """A model whose MTP head mostly agrees with the main model: MLP outputs zeroed (each position's
    hidden state is its token embedding plus scaled attention) and the MTP module wired to pass the
    embedding of t_{i+1} straight through, so it predicts what the main model predicts after t_{i+1}
    up to the attention term. attn_scale 0: they always agree; larger: they disagree more often."""
    model = make_tiny_model(seed=seed, vocab_size=VOCAB).eval()
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("o_proj.weight"):
                p.mul_(attn_scale)
            if "down_proj" in name:
                p.zero_()
        for mtp in model.model.mtp:
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :d].copy_(torch.eye(d))
    return model


def run(model, use_mtp: bool, params: SamplingParams):
    engine = Engine(model, None, max_batch_size=8, max_seq_len=64, use_mtp=use_mtp)
    return engine, [[c.token_ids for c in r] for r in engine.generate(PROMPTS, params)]


GREEDY = SamplingParams(max_new_tokens=20, temperature=0, n=2, ignore_eos=True)


def test_greedy_identical_with_mtp_on_random_weights():
    model = make_tiny_model(seed=3, vocab_size=VOCAB).eval()
    _, plain = run(model, False, GREEDY)
    engine, spec = run(model, True, GREEDY)
    assert spec == plain
    assert engine.spec_stats.drafted > 0


@pytest.mark.parametrize("scale, min_rate, max_rate", [(0.0, 1.0, 1.0), (0.3, 0.2, 0.95)])
def test_greedy_identical_with_accepted_and_rejected_drafts(scale, min_rate, max_rate):
    model = agreeing_model(scale)
    _, plain = run(model, False, GREEDY)
    engine, spec = run(model, True, GREEDY)
    assert spec == plain
    s = engine.spec_stats
    assert min_rate <= s.acceptance_rate <= max_rate            # both paths were exercised at 0.3
    assert s.tokens_per_step == pytest.approx(1 + s.accepted / s.drafted, abs=0.15)
    # fewer forward passes than tokens when drafts are accepted
    generated = sum(len(t) for r in spec for t in r)
    assert engine.stats.decode_tokens == generated - sum(len(r) for r in spec)   # minus the prefill tokens
    if scale == 0.0:
        assert engine.stats.decode_steps < 0.6 * engine.stats.decode_tokens


def test_sampled_speculative_decoding_is_seeded_and_respects_stops():
    model = agreeing_model(0.3)
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.9, n=2, seed=5, ignore_eos=True)
    e1, a = run(model, True, params)
    _, b = run(model, True, params)
    assert a == b
    assert e1.spec_stats.accepted > 0
    assert all(len(t) == 15 for r in a for t in r)              # two tokens per step never overshoot the limit


def test_accept_rule_reproduces_the_target_distribution():
    """Monte Carlo over many rows: P(output = x) must be p(x) whatever the draft distribution q."""
    torch.manual_seed(0)
    B, V = 200_000, 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    draft = torch.multinomial(q, B, replacement=True)
    tok, accepted = speculative_accept(p.expand(B, V), q.expand(B, V), draft, torch.rand(B), torch.rand(B))
    freq = torch.bincount(tok, minlength=V).float() / B
    assert torch.allclose(freq, p, atol=0.006)
    expected_acceptance = torch.minimum(p, q).sum()              # sum_x min(p, q)
    assert float(accepted.float().mean()) == pytest.approx(float(expected_acceptance), abs=0.006)


def test_accept_rule_greedy_one_hot():
    V = 6
    p = torch.nn.functional.one_hot(torch.tensor([2, 4]), V).float()
    q = torch.nn.functional.one_hot(torch.tensor([2, 1]), V).float()
    draft = torch.tensor([2, 1])
    tok, acc = speculative_accept(p, q, draft, torch.zeros(2), torch.zeros(2))
    assert acc.tolist() == [True, False]
    assert tok.tolist() == [2, 4]                                # rejected: the target's argmax
    tok, acc = speculative_accept(p, q, draft, torch.full((2,), 0.999), torch.full((2,), 0.999))
    assert acc.tolist() == [True, False] and tok.tolist() == [2, 4]


def test_greedy_and_sampled_requests_share_speculative_steps():
    model = agreeing_model(0.3)
    _, plain = run(model, False, GREEDY)
    engine = Engine(model, None, max_batch_size=8, max_seq_len=64, use_mtp=True)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, n=2, seed=2, ignore_eos=True)
    first = engine._enqueue(PROMPTS[1], sampled)                # a sampled batch drafts first...
    engine._step_guarded()
    greedy = engine._enqueue(PROMPTS[0], GREEDY)                 # ...then greedy rows join it
    while not (greedy.done and first.done):
        engine._step_guarded()
    assert [c.token_ids for c in greedy.result()] == plain[0]
    assert all(len(c.token_ids) == 20 for c in first.result())
