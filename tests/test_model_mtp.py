"""Multi-token prediction: the MTP loss against a hand-built computation, its switches, and
mtp_forward (the speculative-decoding entry point) with and without a KV cache."""

from __future__ import annotations

import pytest
import torch


def batch(seed=0, B=2, T=12, V=128):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, 4] = -100                                                 # ignored targets stay ignored
    labels[1, -1] = -100
    return ids, labels


def hand_ce(logits, targets):
    """Mean over targets != -100 of -log softmax(logits)[target], in float64."""
    logp = logits.double().log_softmax(-1)
    keep = targets != -100
    return -logp[keep].gather(-1, targets[keep][:, None]).mean()


def mtp_block(model, k, emb, h_prev, positions):
    """MTP module k by its equations: Block(W_proj [RMSNorm(Emb) ; RMSNorm(h)]) then its norm."""
    mtp = model.model.mtp[k]
    cos, sin = model.model.rotary_emb(positions)
    h = torch.cat([mtp.enorm(emb), mtp.hnorm(h_prev)], dim=-1) @ mtp.eh_proj.weight.T   # embedding first
    h = h + mtp.self_attn(mtp.input_layernorm(h), cos, sin, positions)
    h = h + mtp.mlp(mtp.post_attention_layernorm(h))
    return mtp.shared_head.norm(h)


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_matches_hand_computation(tiny_model, depth):
    model = tiny_model(num_nextn_predict_layers=depth)
    ids, labels = batch()
    out = model(ids, labels=labels, return_hidden=True)
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    B, T = ids.shape
    h = out.hidden                                                      # h^0: the main model's final normed states
    emb = model.model.embed_tokens
    ces = []
    for k in range(1, depth + 1):
        n = T - k                                                       # positions i with a target t_{i+k+1}
        h = mtp_block(model, k - 1, emb(ids[:, k:]), h[:, :n], torch.arange(n).expand(B, n))
        ces.append(hand_ce(model.lm_head(h), labels[:, k:]))           # labels[i + k] = t_{i+k+1}
    expected = sum(ces) / depth
    assert out.mtp_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(hand_ce(out.logits, labels).item(), rel=1e-5)
    assert abs(out.mtp_loss.item() - out.loss.item()) > 1e-3            # not the main loss again


def test_mtp_loss_trains_mtp_and_shared_weights(tiny_model):
    model = tiny_model()
    ids, labels = batch()
    model(ids, labels=labels).mtp_loss.backward()
    mtp = model.model.mtp[0]
    for p in (mtp.eh_proj.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.shared_head.norm.weight,
              mtp.self_attn.kv_b_proj.weight, model.lm_head.weight, model.model.embed_tokens.weight,
              model.model.layers[0].self_attn.o_proj.weight):           # through h^0 into the main model
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_mtp_switches(tiny_model):
    ids, labels = batch()
    model = tiny_model(num_nextn_predict_layers=0)
    assert len(model.model.mtp) == 0 and not any(n.startswith("model.mtp") for n, _ in model.named_parameters())
    assert model(ids, labels=labels).mtp_loss is None
    model = tiny_model()
    model.use_mtp = False                                              # e.g. MTP dropped for SFT
    assert model(ids, labels=labels).mtp_loss is None
    model.use_mtp = True
    assert model(ids[:, :1], labels=labels[:, :1]).mtp_loss is None    # no position has a second target
    assert model(ids).mtp_loss is None                                 # no labels, no losses


def test_mtp_forward_matches_training_path(tiny_model):
    model = tiny_model().eval()
    ids, _ = batch(T=10)
    B, T = ids.shape
    with torch.no_grad():
        h0 = model(ids, return_hidden=True).hidden
        pos = torch.arange(T - 1).expand(B, T - 1)
        h1, logits = model.mtp_forward(0, h0[:, :-1], ids[:, 1:], pos)
        ref = mtp_block(model, 0, model.model.embed_tokens(ids[:, 1:]), h0[:, :-1], pos)
    torch.testing.assert_close(h1, ref)
    torch.testing.assert_close(logits, model.lm_head(ref))


@pytest.mark.parametrize("absorb", [False, True])
def test_mtp_forward_with_cache_equals_full(tiny_model, absorb):
    """Draft-style use: the MTP block decodes incrementally in the extra cache layers."""
    model = tiny_model().eval()
    model.set_absorb(absorb)
    ids, _ = batch(T=10)
    B, T = ids.shape
    with torch.no_grad():
        h0 = model(ids, return_hidden=True).hidden
        _, full = model.mtp_forward(0, h0[:, :-1], ids[:, 1:], torch.arange(T - 1).expand(B, T - 1))
        cache = model.new_cache(B, T, with_mtp=True)
        assert len(cache.a) == model.config.num_hidden_layers + 1
        steps = [model.mtp_forward(0, h0[:, :4], ids[:, 1:5], torch.arange(4).expand(B, 4), cache=cache)[1]]
        for i in range(4, T - 1):
            steps.append(model.mtp_forward(0, h0[:, i:i + 1], ids[:, i + 1:i + 2],
                                           torch.full((B, 1), i), cache=cache)[1])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)
