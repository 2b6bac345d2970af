"""MLA and the MHA/GQA baseline: RoPE/YaRN numbers, independent references, the two MLA paths,
and decoding with the latent KV cache (ragged batches, row-mapped caches) against full forwards."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.model import DeepseekV3ForCausalLM, load_model_config
from nanoseek.model.attention import MHA, MLA
from nanoseek.model.cache import KVCache
from nanoseek.model.params import kv_cache_bytes_per_token
from nanoseek.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq, yarn_correction_range

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


# ------------------------------------------------------------------ RoPE / YaRN numbers
def hand_yarn(dim, base, factor, orig, beta_fast=32.0, beta_slow=1.0):
    """DeepSeek's YaRN in plain float64 math: (low, high, per-pair inverse frequencies)."""
    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    freqs = []
    for i in range(dim // 2):
        f = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)   # 0: keep f, 1: f / factor
        freqs.append(f / factor * ramp + f * (1 - ramp))
    return low, high, freqs


def test_yarn_published_config():
    c = load_model_config("deepseek-v3")
    low, high, freqs = hand_yarn(64, 10000.0, 40.0, 4096)
    assert (low, high) == (10, 23)
    assert yarn_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)
    inv_freq, attention_factor = rope_inv_freq(c)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (32,)
    expected = torch.tensor(freqs, dtype=torch.float64)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    # the first 10 pairs keep their frequency, pairs 23.. are fully interpolated (divided by 40)
    assert inv_freq[9].item() == pytest.approx(10000.0 ** (-18 / 64), rel=1e-6)
    assert inv_freq[25].item() == pytest.approx(10000.0 ** (-50 / 64) / 40, rel=1e-6)
    assert attention_factor == 1.0  # mscale / mscale_all_dim = 1 for the released config
    mscale = 0.1 * math.log(40) + 1
    assert round(mscale, 4) == 1.3689
    with torch.device("meta"):
        assert MLA(c, 0).softmax_scale == pytest.approx(mscale ** 2 / math.sqrt(192))
    assert round(c.softmax_scale, 5) == 0.13523


def test_yarn_attention_factor_when_mscales_differ(tiny_config):
    c = tiny_config(rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 1.0})
    _, factor = rope_inv_freq(c)
    assert factor == pytest.approx((0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))
    _, factor = rope_inv_freq(tiny_config(rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 16}))
    assert factor == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's own default without mscales


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_is_a_complex_rotation(interleave):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 11, 100, 1000]])
    freq = torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    angle = pos[..., None].double() * freq                                  # [B, T, 4]
    out = apply_rope(x, angle.cos(), angle.sin(), interleave)
    if interleave:   # pairs (x0, x1), (x2, x3), ...
        z = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2).contiguous())
        ref = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[:, :, None]).flatten(-2)
    else:            # pairs (x_i, x_{i+4})
        z = torch.complex(x[..., :4], x[..., 4:])
        r = z * torch.polar(torch.ones_like(angle), angle)[:, :, None]
        ref = torch.cat([r.real, r.imag], dim=-1)
    torch.testing.assert_close(out, ref)


def test_rope_scores_depend_only_on_relative_position(tiny_config):
    rope = RotaryEmbedding(tiny_config(qk_rope_head_dim=8, rope_scaling=YARN))
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def score(pq, pk):
        cos, sin = rope(torch.tensor([[pq, pk]]))
        qr = apply_rope(q.expand(1, 2, 8), cos, sin)[0, 0]
        kr = apply_rope(k.expand(1, 2, 8), cos, sin)[0, 1]
        return (qr * kr).sum().item()
    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_rope_tables_stay_fp32_in_a_bf16_model(tiny_model):
    model = tiny_model(rope_scaling=YARN)
    pos = torch.tensor([[0, 1, 200]])
    cos32, _ = model.model.rotary_emb(pos)
    model.to(torch.bfloat16)
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32
    cos16, _ = rope(pos)
    assert cos16.dtype == torch.float32
    torch.testing.assert_close(cos16, cos32)   # bf16 inverse frequencies would be off by radians at 200


# ------------------------------------------------------------------ independent references
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, pos, dim, base):
    """Interleaved RoPE of x [T, ..., dim] as complex multiplication, float64."""
    freq = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    angle = pos[:, None].double() * freq                                    # [T, dim/2]
    shape = x.shape
    z = torch.view_as_complex(x.reshape(*shape[:-1], dim // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(angle), angle).view(angle.shape[0], *([1] * (x.dim() - 2)), dim // 2)
    return torch.view_as_real(z * rot).reshape(shape)


def causal_attention(q, k, v, scale):
    """q [T, H, dq], k [S, H, dq], v [S, H, dv], causal -> [T, H, dv]."""
    s = torch.einsum("thd,shd->hts", q, k) * scale
    T = q.shape[0]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


def mla_reference(att: MLA, c, x):
    """MLA for one sequence x [T, d] straight from the V3 equations, in float64."""
    W = {n: p.detach().double() for n, p in att.named_parameters()}
    T, H, nope, rope_d = x.shape[0], c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
    pos = torch.arange(T)
    if c.q_lora_rank:
        q = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], 1e-6) @ W["q_b_proj.weight"].T
    else:
        q = x @ W["q_proj.weight"].T
    q = q.view(T, H, nope + rope_d)
    kv = x @ W["kv_a_proj_with_mqa.weight"].T
    latent = rms(kv[:, : c.kv_lora_rank], W["kv_a_layernorm.weight"], 1e-6)
    k_rope = rotate(kv[:, c.kv_lora_rank:], pos, rope_d, c.rope_theta)       # ONE head, shared
    kvb = (latent @ W["kv_b_proj.weight"].T).view(T, H, nope + c.v_head_dim)
    k = torch.cat([kvb[..., :nope], k_rope[:, None].expand(T, H, rope_d)], -1)
    q = torch.cat([q[..., :nope], rotate(q[..., nope:], pos, rope_d, c.rope_theta)], -1)
    out = causal_attention(q, k, kvb[..., nope:], (nope + rope_d) ** -0.5)
    return out.reshape(T, -1) @ W["o_proj.weight"].T


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("absorb", [False, True])
def test_mla_matches_reference(tiny_config, q_lora_rank, absorb):
    c = tiny_config(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    att = MLA(c, 0)
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    att.absorb = absorb
    rope = RotaryEmbedding(c)
    x = torch.randn(2, 7, c.hidden_size)
    pos = torch.arange(7).expand(2, 7)
    cos, sin = rope(pos)
    out = att(x, cos, sin, pos)
    for b in range(2):
        torch.testing.assert_close(out[b].double(), mla_reference(att, c, x[b].double()), rtol=1e-4, atol=1e-5)


def test_gqa_matches_reference(tiny_config):
    c = tiny_config(attention_type="mha", num_attention_heads=4, num_key_value_heads=2, n_routed_experts=0)
    torch.manual_seed(0)
    att = MHA(c, 0)
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 6, c.hidden_size)
    pos = torch.arange(6).expand(1, 6)
    cos, sin = RotaryEmbedding(c)(pos)
    out = att(x, cos, sin, pos)[0].double()
    W = {n: p.detach().double() for n, p in att.named_parameters()}
    xd, nope, r, H = x[0].double(), c.qk_nope_head_dim, c.qk_rope_head_dim, 4

    def proj(name, heads, dim):
        t = (xd @ W[f"{name}.weight"].T).view(6, heads, dim)
        return torch.cat([t[..., :nope], rotate(t[..., nope:], pos[0], r, c.rope_theta)], -1) if name != "v_proj" else t
    q, k, v = proj("q_proj", H, c.qk_head_dim), proj("k_proj", 2, c.qk_head_dim), proj("v_proj", 2, c.v_head_dim)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)     # query heads 0,1 -> kv head 0
    ref = causal_attention(q, k, v, c.qk_head_dim ** -0.5).reshape(6, -1) @ W["o_proj.weight"].T
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the two MLA paths, whole model
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}])
def test_naive_and_absorbed_logits_equal(tiny_model, overrides):
    model = tiny_model(**overrides).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        naive = model(ids).logits
        model.set_absorb(True)
        absorbed = model(ids).logits
    assert naive.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=2e-5)


# ------------------------------------------------------------------ decoding with the cache
def full_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def decode(model, ids, prefill, cache=None, rows=None, chunk=1):
    """Prefill ids[:, :prefill] then feed the rest `chunk` tokens at a time; logits at every position."""
    B, T = ids.shape
    cache = cache or model.new_cache(B, T)
    out = []
    with torch.no_grad():
        for start in [0] + list(range(prefill, T, chunk)):
            end = prefill if start == 0 else min(start + chunk, T)
            pos = torch.arange(start, end).expand(B, end - start)
            out.append(model(ids[:, start:end], positions=pos, cache=cache, rows=rows).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"rope_scaling": YARN}])
def test_incremental_decoding_equals_full_forward(tiny_model, absorb, overrides):
    model = tiny_model(**overrides).eval()
    model.set_absorb(absorb)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    ref = full_logits(model, ids)
    torch.testing.assert_close(decode(model, ids, prefill=5), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(decode(model, ids, prefill=3, chunk=4), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("absorb", [False, True])
def test_ragged_batch_decoding(tiny_model, absorb):
    """Two prompts of lengths 3 and 7, right-padded in one prefill, then decoded together with
    per-row positions: every real position's logits equal each sequence's own full forward."""
    model = tiny_model().eval()
    model.set_absorb(absorb)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (9,), generator=g), torch.randint(0, 128, (13,), generator=g)]
    lens = [3, 7]
    refs = [full_logits(model, s[None])[0] for s in seqs]
    cache = model.new_cache(2, 16)
    prompt = torch.zeros(2, 7, dtype=torch.long)
    for r, (s, n) in enumerate(zip(seqs, lens)):
        prompt[r, :n] = s[:n]
    with torch.no_grad():
        logits = model(prompt, positions=torch.arange(7).expand(2, 7), cache=cache).logits
        for r, n in enumerate(lens):
            torch.testing.assert_close(logits[r, :n], refs[r][:n], rtol=0, atol=2e-5)
        for step in range(6):   # row 0 decodes positions 3..8, row 1 positions 7..12, in one batch
            pos = torch.tensor([[lens[0] + step], [lens[1] + step]])
            ids = torch.stack([seqs[r][pos[r, 0]] for r in range(2)])[:, None]
            logits = model(ids, positions=pos, cache=cache).logits
            for r in range(2):
                torch.testing.assert_close(logits[r, 0], refs[r][pos[r, 0]], rtol=0, atol=2e-5)


@pytest.mark.parametrize("absorb", [False, True])
def test_rows_map_into_a_bigger_cache(tiny_model, absorb):
    """Sequences live in rows 3 and 1 of a 4-row cache whose other rows (and row 3's far slots,
    from an earlier longer request) hold other data; decoding them together via `rows` is exact."""
    model = tiny_model().eval()
    model.set_absorb(absorb)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 128, (10,), generator=g), torch.randint(0, 128, (8,), generator=g)
    junk = torch.randint(0, 128, (4, 16), generator=g)
    cache = model.new_cache(4, 16)
    with torch.no_grad():
        model(junk, positions=torch.arange(16).expand(4, 16), cache=cache)   # stale data everywhere
        pa = model(a[None, :6], positions=torch.arange(6)[None], cache=cache, rows=torch.tensor([3])).logits
        pb = model(b[None, :2], positions=torch.arange(2)[None], cache=cache, rows=torch.tensor([1])).logits
        ra, rb = full_logits(model, a[None])[0], full_logits(model, b[None])[0]
        torch.testing.assert_close(pa[0], ra[:6], rtol=0, atol=2e-5)
        torch.testing.assert_close(pb[0], rb[:2], rtol=0, atol=2e-5)
        for step in range(4):
            pos = torch.tensor([[6 + step], [2 + step]])
            ids = torch.stack([a[6 + step], b[2 + step]])[:, None]
            logits = model(ids, positions=pos, cache=cache, rows=torch.tensor([3, 1])).logits
            torch.testing.assert_close(logits[0, 0], ra[6 + step], rtol=0, atol=2e-5)
            torch.testing.assert_close(logits[1, 0], rb[2 + step], rtol=0, atol=2e-5)


def test_copy_rows_shares_a_prefill(tiny_model):
    model = tiny_model().eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    ref = full_logits(model, ids)[0]
    cache = model.new_cache(3, 12)
    with torch.no_grad():
        model(ids[:, :6], positions=torch.arange(6)[None], cache=cache, rows=torch.tensor([0]))
        cache.copy_rows([0, 0], [1, 2], 6)
        logits = model(ids[:, 6:7].expand(3, 1), positions=torch.full((3, 1), 6), cache=cache).logits
    for r in range(3):
        torch.testing.assert_close(logits[r, 0], ref[6], rtol=0, atol=2e-5)


def test_cache_errors(tiny_model):
    model = tiny_model().eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="positions are required"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the cache length 4"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[3, 4]]), cache=cache)


# ------------------------------------------------------------------ the dense MHA/GQA baseline
def test_dense_gqa_baseline_trains_and_decodes(tiny_model):
    model = tiny_model(attention_type="mha", num_attention_heads=4, num_key_value_heads=2, n_routed_experts=0)
    assert all(isinstance(layer.self_attn, MHA) for layer in model.model.layers)
    assert model.moe_layers() == [] and model.expert_bias() is None
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    out = model(ids, labels=ids.roll(-1, 1))
    (out.loss + out.mtp_loss).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    model.set_absorb(True)  # a no-op for MHA, must not break it
    torch.testing.assert_close(decode(model, ids, prefill=4), full_logits(model, ids), rtol=0, atol=2e-5)


# ------------------------------------------------------------------ cache sizes
def test_kv_cache_bytes_published():
    c = load_model_config("deepseek-v3")
    assert kv_cache_bytes_per_token(c, per_layer=True) == 1152        # (512 + 64) values * 2 bytes
    assert kv_cache_bytes_per_token(c) == 70272                       # * 61 layers
    assert kv_cache_bytes_per_token(c, absorbed=False, per_layer=True) == 128 * (192 + 128) * 2
    meta = KVCache(c, batch_size=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert meta.bytes_per_token == 70272


@pytest.mark.parametrize("overrides", [{}, {"attention_type": "mha", "num_key_value_heads": 1}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_match_analytic(tiny_config, overrides, dtype):
    c = tiny_config(**overrides)
    model = DeepseekV3ForCausalLM(c)
    cache = model.new_cache(3, 10, dtype=dtype)
    per_token = kv_cache_bytes_per_token(c, dtype_bytes=dtype.itemsize)
    assert cache.bytes_per_token == per_token
    total = sum(t.numel() * t.element_size() for t in cache.a + cache.b)
    assert total == per_token * 3 * 10
