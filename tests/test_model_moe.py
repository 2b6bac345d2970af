"""DeepSeekMoE: the router against an independent top-k reference, group limiting, the bias's
role, experts against a per-token loop, grouped-matmul fallback, aux-loss-free balancing, the
sequence-wise balance loss, and fp32 routing state in a bf16 model."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.model import moe as moe_mod
from nanoseek.model.moe import SMALL_TOPK, Gate, MoE, grouped_mm_supported, max_violation, top_k


def make_moe(cfg, seed=0, std=0.3):
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=std)
    return m


# ------------------------------------------------------------------ an independent router
def reference_route(x, weight, bias, cfg):
    """Per token, in float64 with Python lists: {expert: weight} following the V3 gate rules."""
    E, G, k = cfg.n_routed_experts, cfg.n_group or 1, cfg.num_experts_per_tok
    tg, per = cfg.topk_group or G, E // G
    out = []
    for row in (x.double() @ weight.double().T).tolist():
        if cfg.scoring_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        sb = [si + (bias[i].item() if bias is not None else 0.0) for i, si in enumerate(s)]
        candidates = list(range(E))
        if G > 1 and cfg.topk_method != "greedy":
            def group_score(g):
                vals = sorted(sb[g * per:(g + 1) * per], reverse=True)
                return sum(vals[:2]) if cfg.topk_method == "noaux_tc" else vals[0]
            kept = sorted(range(G), key=group_score, reverse=True)[:tg]
            candidates = [e for g in kept for e in range(g * per, (g + 1) * per)]
        chosen = sorted(candidates, key=lambda e: sb[e], reverse=True)[:k]
        w = [s[e] for e in chosen]
        if cfg.norm_topk_prob:
            w = [wi / sum(w) for wi in w]
        out.append({e: wi * cfg.routed_scaling_factor for e, wi in zip(chosen, w)})
    return out


@pytest.mark.parametrize("overrides", [
    dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2),
    dict(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=3),
    dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4),
    dict(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3),
    dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=1),
    dict(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False),
    dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, scoring_func="softmax",
         topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, scoring_func="softmax",
         topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_router_matches_reference_topk(tiny_config, overrides, with_bias, compiled):
    """The router's choice and weights, eagerly and as a compiled graph traces it (its top-k of
    at most SMALL_TOPK as rounds of argmax: no ``topk`` left in the graph)."""
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    if gate.e_score_correction_bias is not None and with_bias:
        gate.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(64, cfg.hidden_size)
    if compiled:
        ops = []

        def backend(gm, example_inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
            return gm
        torch._dynamo.reset()                       # (each case's gate is a new trace of Gate.forward)
        weights, idx, scores = torch.compile(gate, backend=backend, fullgraph=True)(x)
        assert not [o for o in ops if "topk" in o], ops
    else:
        weights, idx, scores = gate(x)
    assert weights.dtype == torch.float32 and idx.shape == (64, cfg.num_experts_per_tok)
    ref = reference_route(x, gate.weight.detach(), gate.e_score_correction_bias, cfg)
    for n in range(64):
        got = dict(zip(idx[n].tolist(), weights[n].tolist()))
        assert set(got) == set(ref[n]), f"token {n}: {sorted(got)} != {sorted(ref[n])}"
        for e, w in ref[n].items():
            assert got[e] == pytest.approx(w, rel=1e-5)


@pytest.mark.parametrize("k", range(1, SMALL_TOPK + 2))
def test_top_k_as_the_compiled_graph_runs_it_equals_topk(k):
    """Under torch.compile top_k is k rounds of argmax (k <= SMALL_TOPK, torch.topk above): the
    same values and indices, largest first, rows with masked (-inf) entries included."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(50, 12, generator=g)
    x[::3, 4:8] = float("-inf")                        # masked groups, as group-limited routing leaves them
    torch._dynamo.reset()
    got = torch.compile(lambda t: top_k(t, k), backend="eager", fullgraph=True)(x)
    want = x.topk(k, dim=-1)
    assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)
    assert torch.equal(top_k(x, k)[1], want.indices)     # eager: torch.topk itself


def gate_with_logits(cfg, logits):
    """A gate whose router logits for input x = identity rows are exactly `logits`."""
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(cfg.n_routed_experts))
    return gate, torch.tensor([logits], dtype=torch.float32)


def test_group_limiting_excludes_masked_groups(tiny_config):
    cfg = tiny_config(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    # group 0 holds the single best expert but a poor second; groups 1 and 2 have the best top-2 sums
    logits = [6.0, -9.0, 2.0, 1.9, 1.5, 1.4, -5.0, -5.0]
    gate, x = gate_with_logits(cfg, logits)
    _, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]
    gate, x = gate_with_logits(cfg.replace(n_group=1, topk_group=1), logits)
    assert sorted(gate(x)[1][0].tolist()) == [0, 2]   # without group limiting, expert 0 wins


def test_bias_changes_selection_not_weights(tiny_config):
    cfg = tiny_config(hidden_size=8, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    logits = [3.0, 2.0, 1.0, 0.0, -1.0, -1.0, -2.0, -3.0]
    gate, x = gate_with_logits(cfg, logits)
    w0, idx0, _ = gate(x)
    assert sorted(idx0[0].tolist()) == [0, 1]
    gate.e_score_correction_bias[5] = 0.7            # sigmoid(-1) + 0.7 = 0.97 > sigmoid(2) = 0.88
    w1, idx1, scores = gate(x)
    assert sorted(idx1[0].tolist()) == [0, 5]
    s = torch.sigmoid(torch.tensor(logits))
    torch.testing.assert_close(scores[0], s)         # returned scores are unbiased
    expected = {0: s[0] / (s[0] + s[5]) * 2.5, 5: s[5] / (s[0] + s[5]) * 2.5}
    for e, w in zip(idx1[0].tolist(), w1[0].tolist()):
        assert w == pytest.approx(expected[e].item(), rel=1e-6)
    assert w1.sum().item() == pytest.approx(2.5)


def test_top1_weight_is_normalised(tiny_config):
    """norm_topk_prob with one expert gives weight routed_scaling_factor (as HF and DeepSeek's code)."""
    cfg = tiny_config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    w, _, _ = gate(torch.randn(5, cfg.hidden_size))
    torch.testing.assert_close(w, torch.full((5, 1), 2.5))


# ------------------------------------------------------------------ experts
def reference_moe(m: MoE, x):
    """sum_k w_k SwiGLU_k(x) + shared(x), one token at a time."""
    weights, idx, _ = m.gate(x)
    inter = m.experts.intermediate
    out = []
    for n in range(x.shape[0]):
        y = m.shared_experts(x[n]) if m.shared_experts is not None else torch.zeros_like(x[n])
        for w, e in zip(weights[n], idx[n]):
            gu = m.experts.gate_up_proj[e]
            h = torch.nn.functional.silu(gu[:inter] @ x[n]) * (gu[inter:] @ x[n])
            y = y + w * (m.experts.down_proj[e] @ h)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("n_shared", [1, 0, 2])
def test_moe_matches_per_token_loop(tiny_config, n_shared):
    cfg = tiny_config(n_shared_experts=n_shared)
    m = make_moe(cfg).eval()
    x = torch.randn(2, 9, cfg.hidden_size)
    torch.testing.assert_close(m(x).view(-1, cfg.hidden_size), reference_moe(m, x.view(-1, cfg.hidden_size)),
                               rtol=1e-4, atol=2e-5)


def test_grouped_fallback_equals_grouped_path(tiny_config, monkeypatch):
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    m = make_moe(cfg)
    x = torch.randn(3, 11, cfg.hidden_size)
    calls = {"n": 0}
    real = torch._grouped_mm if hasattr(torch, "_grouped_mm") else None

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    def run():
        m.zero_grad()
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    if real is not None:
        monkeypatch.setattr(torch, "_grouped_mm", counting)
    y_grouped, g_grouped = run()
    grouped_ran = calls["n"] > 0
    assert grouped_ran == grouped_mm_supported("cpu", torch.float32)
    monkeypatch.setattr(moe_mod, "grouped_mm_supported", lambda *a: False)
    calls["n"] = 0
    y_loop, g_loop = run()
    assert calls["n"] == 0                       # the fallback really ran
    torch.testing.assert_close(y_loop, y_grouped, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_loop, g_grouped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_loop.view(-1, cfg.hidden_size),
                               reference_moe(m, x.view(-1, cfg.hidden_size)).detach(), rtol=1e-4, atol=2e-5)


def test_grouped_mm_probe_is_independent_of_grad_mode_and_rng():
    grouped_mm_supported.cache_clear()
    try:
        with torch.inference_mode():
            first = grouped_mm_supported("cpu", torch.float32)
        torch.manual_seed(0)
        state = torch.get_rng_state()
        grouped_mm_supported.cache_clear()
        with torch.no_grad():
            assert grouped_mm_supported("cpu", torch.float32) == first
        assert torch.equal(torch.get_rng_state(), state)
        grouped_mm_supported.cache_clear()
        assert grouped_mm_supported("cpu", torch.float32) == first
        if hasattr(torch, "_grouped_mm"):
            assert first  # torch 2.13 runs grouped matmuls on CPU in fp32
    finally:
        grouped_mm_supported.cache_clear()


def test_no_token_is_dropped(tiny_config):
    cfg = tiny_config(n_group=1, topk_group=1)
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.gate.e_score_correction_bias[:] = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # everyone to 0 and 1
        y = m(torch.randn(1, 40, cfg.hidden_size))
    assert m.load.tolist() == [40, 40, 0, 0, 0, 0, 0, 0]
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------ aux-loss-free balancing
def test_update_bias_step_is_sign_of_load_gap(tiny_config):
    cfg = tiny_config()
    m = make_moe(cfg)
    m.load.copy_(torch.tensor([10.0, 0, 5, 5, 1, 9, 5, 5]))           # mean 5
    load = m.update_bias(0.01)
    assert load.tolist() == [10, 0, 5, 5, 1, 9, 5, 5]
    expected = torch.tensor([-0.01, 0.01, 0, 0, 0.01, -0.01, 0, 0])
    torch.testing.assert_close(m.gate.e_score_correction_bias, expected)
    assert m.load.sum() == 0                                           # reset for the next step
    m.load.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))
    seen = []
    m.update_bias(0.01, load_reduce=lambda t: (seen.append(t.clone()), t + torch.arange(8.0) * 10)[1])
    assert seen[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    # reduced load [1, 10, 20, ..., 70], mean 35.125: experts 0-3 up, 4-7 down
    torch.testing.assert_close(m.gate.e_score_correction_bias, expected + torch.tensor([0.01] * 4 + [-0.01] * 4))
    before = m.gate.e_score_correction_bias.clone()
    m.load.fill_(3.0)
    m.update_bias(0.0)
    torch.testing.assert_close(m.gate.e_score_correction_bias, before)


def test_load_is_counted_only_in_training(tiny_config):
    cfg = tiny_config()
    m = make_moe(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    m.eval()
    m(x)
    assert m.load.sum() == 0
    m.train()
    m(x)
    m(x)
    assert m.load.sum() == 2 * 10 * cfg.num_experts_per_tok


def test_bias_updates_balance_a_skewed_load(tiny_config):
    """Tokens whose router affinities favour two experts: MaxVio falls as the bias adapts."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2)
    m = make_moe(cfg).train()
    torch.manual_seed(1)
    direction = torch.randn(cfg.hidden_size)
    with torch.no_grad():
        m.gate.weight[:2] += 0.5 * direction                          # experts 0, 1 favoured
    x = (torch.randn(4, 64, cfg.hidden_size) + direction).detach()
    maxvio = []
    for _ in range(80):
        with torch.no_grad():
            m(x)
        maxvio.append(max_violation(m.update_bias(0.01)).item())
    assert maxvio[0] > 3.0, maxvio[0]                                  # heavily skewed at first
    assert max(maxvio[-10:]) < 0.6 * maxvio[0]
    assert sum(maxvio[-10:]) / 10 < 0.3 * maxvio[0], maxvio[-10:]
    bias = m.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()                            # favoured experts pushed down


def test_max_violation():
    assert max_violation(torch.tensor([1.0, 1.0, 4.0])).item() == pytest.approx(1.0)
    torch.testing.assert_close(max_violation(torch.tensor([[2.0, 2.0], [0.0, 4.0]])), torch.tensor([0.0, 1.0]))


def test_model_level_bias_update_covers_mtp(tiny_model):
    model = tiny_model(num_hidden_layers=3, first_k_dense_replace=1)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids.roll(-1, 1))
    loads = model.update_expert_bias(0.01)
    assert loads.shape == (2, 8) and (loads.sum(dim=1) == 20 * 2).all()
    bias = model.expert_bias()
    assert bias.shape == (2, 8) and bias.abs().sum() > 0
    mtp_bias = model.model.mtp[0].mlp.gate.e_score_correction_bias
    assert mtp_bias.abs().sum() > 0                                   # MTP's MoE saw 9 positions per row
    assert all(m.load.sum() == 0 for m in model.moe_layers())


# ------------------------------------------------------------------ sequence-wise balance loss
def test_sequence_aux_loss_by_hand(tiny_config):
    cfg = tiny_config()
    m = make_moe(cfg).train()
    m.seq_aux_alpha = 0.01
    B, T, E, K = 2, 6, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(B, T, cfg.hidden_size)
    m(x)
    _, idx, scores = m.gate(x.view(-1, cfg.hidden_size))
    idx, scores = idx.view(B, T, K), scores.view(B, T, E).double()
    total = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[b, t].tolist()) for t in range(T))
            P = sum(scores[b, t, i] / scores[b, t].sum() for t in range(T)) / T
            total += f * P
    assert m.aux_loss.item() == pytest.approx(0.01 * total.item() / B, rel=1e-5)
    m.aux_loss.backward()
    assert m.gate.weight.grad.abs().sum() > 0                          # trains the router through P


def test_aux_loss_reported_fresh(tiny_model):
    model = tiny_model(num_hidden_layers=3, first_k_dense_replace=1)
    model.set_seq_aux_alpha(0.001)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids.roll(-1, 1))
    parts = [m.aux_loss for m in model.moe_layers()] + [model.model.mtp[0].mlp.aux_loss]
    assert all(p is not None for p in parts)
    torch.testing.assert_close(out.aux_loss, torch.stack(parts).sum())  # MTP's balance loss included
    model.eval()
    assert model(ids, labels=ids.roll(-1, 1)).aux_loss is None           # not a stale training value
    assert all(m.aux_loss is None for m in model.moe_layers())
    model.train()
    model.set_seq_aux_alpha(0.0)
    assert model(ids, labels=ids.roll(-1, 1)).aux_loss is None


# ------------------------------------------------------------------ dtypes
def test_router_state_stays_exact_fp32_in_bf16(tiny_model):
    model = tiny_model()
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(std=0.01)
    moe.load.fill_(1001.0)                                              # not representable in bf16
    w, b = moe.gate.weight.detach().clone(), moe.gate.e_score_correction_bias.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(moe.gate.weight, w) and torch.equal(moe.gate.e_score_correction_bias, b)
        assert moe.load.dtype == torch.float32 and moe.load[0].item() == 1001.0
        assert moe.experts.gate_up_proj.dtype != torch.float32         # everything else follows the cast
        assert isinstance(moe.gate.weight, torch.nn.Parameter)
    model.float()
    assert moe.experts.gate_up_proj.dtype == torch.float32
