"""Simulated FP8 training: e4m3 error bounds, per-tile / per-block scales, the three quantised
GEMMs (forward, dgrad, wgrad) against explicit formulas, and the swap on a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import fp8
from nanoseek.model.fp8 import (E4M3_MAX, disable_simulated_precision, enable_simulated_precision, fp8_linear,
                                quantize_activation_tiles, quantize_blockwise, quantize_token_tiles,
                                quantize_weight_blocks, round_bf16, simulated_linear)


def rel_bound_ok(x, deq, scale_per_elem):
    """e4m3 has 3 mantissa bits: a normal value rounds within 2^-4 relative; a subnormal (below
    2^-6 after scaling) within half its step 2^-9, i.e. 2^-10 x scale absolute."""
    err = (deq - x).abs()
    bound = torch.maximum(x.abs() * 2 ** -4, scale_per_elem * 2 ** -10) * (1 + 1e-6)
    return bool((err <= bound).all())


def test_e4m3_error_within_format_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g) * torch.logspace(-3, 2, 384)    # channels over 5 decades
    deq, scale = quantize_blockwise(x, (1, 128))
    assert scale.shape == (256, 3)
    per_elem = scale.repeat_interleave(128, dim=1)
    assert rel_bound_ok(x, deq, per_elem)
    # each tile's largest magnitude maps to 448, so it survives (up to the fp32 rounding of the scale)
    tiles = x.view(256, 3, 128)
    arg = tiles.abs().argmax(-1, keepdim=True)
    assert torch.allclose(tiles.gather(-1, arg), deq.view(256, 3, 128).gather(-1, arg), rtol=1e-6, atol=0)
    assert torch.allclose(scale, tiles.abs().amax(-1) / E4M3_MAX)
    # typical error of e4m3 rounding on Gaussian data: a few percent, not zero
    y = torch.randn(512, 512, generator=g)
    rel = ((quantize_weight_blocks(y) - y).abs() / y.abs().clamp_min(1e-3)).median()
    assert 0.005 < rel < 0.04


def test_scales_are_per_tile_and_per_block_with_edges():
    x = torch.randn(300, 200)
    _, s_act = quantize_blockwise(x, (1, 128))
    _, s_w = quantize_blockwise(x, (128, 128))
    _, s_tok = quantize_blockwise(x, (128, 1))
    assert s_act.shape == (300, 2) and s_w.shape == (3, 2) and s_tok.shape == (3, 200)
    # the edge block (rows 256..299, cols 128..199) is scaled by what it holds
    assert torch.isclose(s_w[2, 1], x[256:, 128:].abs().max() / E4M3_MAX)
    assert torch.isclose(s_act[5, 1], x[5, 128:].abs().max() / E4M3_MAX)
    # an all-zero block gets scale 1 and stays exactly zero
    z = torch.zeros(4, 256)
    dz, sz = quantize_blockwise(z, (1, 128))
    assert torch.equal(dz, z) and torch.equal(sz, torch.ones(4, 2))


@pytest.mark.parametrize("kind", ["activation", "weight", "token"])
def test_an_outlier_only_affects_its_own_tile(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 256, generator=g)
    quant = {"activation": quantize_activation_tiles, "weight": quantize_weight_blocks,
             "token": quantize_token_tiles}[kind]
    x_out = x.clone()
    x_out[3, 5] = 1e6                                  # one huge value (e4m3 spans ~18 binades)
    err_clean = (quant(x) - x).abs()
    err_out = (quant(x_out) - x_out).abs()
    same = torch.ones_like(x, dtype=torch.bool)        # elements outside the outlier's tile / block
    if kind == "activation":
        same[3, :128] = False
    elif kind == "weight":
        same[:128, :128] = False
    else:
        same[:128, 5] = False
    assert torch.equal(err_clean[same], err_out[same])
    tile = ~same
    tile[3, 5] = False
    # inside the tile the small values now share the outlier's scale and lose precision
    assert err_out[tile].mean() > 10 * err_clean[tile].mean()


def test_fp8_linear_forward_dgrad_wgrad_match_the_quantised_formulas():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 150, 160, generator=g, requires_grad=True)       # 300 tokens, K = 160
    w = (torch.randn(136, 160, generator=g) * 0.05).requires_grad_(True)
    b = torch.randn(136, generator=g).requires_grad_(True)
    y = fp8_linear(x, w, b)
    x2 = x.detach().reshape(-1, 160)
    expected = round_bf16(quantize_activation_tiles(x2) @ quantize_weight_blocks(w.detach()).T + b.detach())
    assert torch.equal(y.detach().reshape(-1, 136), expected)
    gy = torch.randn(2, 150, 136, generator=g)
    y.backward(gy)
    g2 = gy.reshape(-1, 136)
    assert torch.equal(x.grad.reshape(-1, 160), quantize_activation_tiles(g2) @ quantize_weight_blocks(w.detach()))
    assert torch.equal(w.grad, quantize_token_tiles(g2).T @ quantize_token_tiles(x2))
    assert torch.allclose(b.grad, g2.sum(0))
    # and all three are close to the exact (unquantised) linear, as e4m3 allows
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.linear(xr, wr, b.detach()).backward(gy)
    for got, ref in ((x.grad, xr.grad), (w.grad, wr.grad)):
        rel = (got - ref).norm() / ref.norm()
        assert 1e-4 < rel < 0.08


def test_bf16_control_and_autocast_output_dtype():
    x = torch.randn(4, 8, 64)
    w = torch.randn(32, 64)
    y = simulated_linear(x, w, fmt="bf16")
    assert torch.equal(y, round_bf16(round_bf16(x) @ round_bf16(w).T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert simulated_linear(x, w, fmt="fp8").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown simulated format"):
        simulated_linear(x, w, fmt="fp4")


def test_enable_on_a_model_swaps_the_right_modules_and_trains(tiny_model):
    model = tiny_model(seed=0)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))
    x, y = ids[:, :-1], ids[:, 1:]
    ref = model(x, labels=y)
    changed = enable_simulated_precision(model, "fp8")
    assert "lm_head" not in changed
    assert not any(name.endswith("mlp.gate") for name in changed)              # the router stays fp32
    for must in ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_b_proj",
                 "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
                 "model.layers.1.mlp.experts", "model.layers.1.mlp.shared_experts.down_proj", "model.mtp.0.eh_proj"):
        assert must in changed, must
    out = model(x, labels=y)
    assert torch.isfinite(out.loss) and out.loss != ref.loss
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 0.02
    (out.loss + out.mtp_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    restored = disable_simulated_precision(model)
    assert sorted(restored) == sorted(changed)
    assert torch.equal(model(x, labels=y).loss, ref.loss)


def test_simulated_experts_dispatch_equals_the_model_when_quantisation_is_off(tiny_model, monkeypatch):
    model = tiny_model(seed=1)
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(4))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.mtp_loss).backward()
    ref_logits = out.logits.detach()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_simulated_precision(model, "fp8")
    identity = lambda t, counts=None: t.float()                                  # noqa: E731
    monkeypatch.setattr(fp8, "_operands", lambda fmt, block: (identity, identity, identity))
    monkeypatch.setattr(fp8, "round_bf16", identity)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert torch.allclose(out.logits, ref_logits, atol=1e-5, rtol=1e-5)
    (out.loss + out.mtp_loss).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4), n


def test_segmented_token_tiles_and_stacked_weight_blocks():
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([130, 0, 5, 256, 1])
    x = torch.randn(int(counts.sum()), 40, generator=g) * torch.logspace(-2, 2, int(counts.sum()))[:, None]
    got = quantize_token_tiles(x, counts=counts)
    parts, start = [], 0
    for n in counts.tolist():                                    # tiles restart at every segment
        parts.append(quantize_token_tiles(x[start:start + n]) if n else x[:0])
        start += n
    assert torch.equal(got, torch.cat(parts))
    assert not torch.equal(got, quantize_token_tiles(x))          # global tiles would cross segments
    w = torch.randn(3, 136, 70, generator=g)
    stacked, scale = quantize_blockwise(w, (128, 128))
    assert scale.shape == (3, 2, 1)
    assert all(torch.equal(stacked[e], quantize_weight_blocks(w[e])) for e in range(3))


def test_grouped_expert_gemms_match_the_quantised_formulas():
    g = torch.Generator().manual_seed(6)
    counts = torch.tensor([3, 0, 140, 9])
    M = int(counts.sum())
    x = torch.randn(M, 64, generator=g, requires_grad=True)
    w = (torch.randn(4, 48, 64, generator=g) * 0.1).requires_grad_(True)
    y = fp8._SimulatedGroupedLinear.apply(x, w, counts, "fp8", 128, torch.float32)
    gy = torch.randn(M, 48, generator=g)
    y.backward(gy)
    xq, gq = quantize_activation_tiles(x.detach()), quantize_activation_tiles(gy)
    start = 0
    for e, n in enumerate(counts.tolist()):
        sl = slice(start, start + n)
        wq = quantize_weight_blocks(w.detach()[e])
        assert torch.allclose(y[sl].detach(), round_bf16(xq[sl] @ wq.T), atol=1e-6)
        assert torch.allclose(x.grad[sl], gq[sl] @ wq, atol=1e-6)
        expected_w = (quantize_token_tiles(gy[sl]).T @ quantize_token_tiles(x.detach()[sl]) if n
                      else torch.zeros(48, 64))
        assert torch.allclose(w.grad[e], expected_w, atol=1e-5)
        start += n
