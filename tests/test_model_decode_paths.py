"""The inference-side model paths added for fast decoding, each checked against the path it replaces.

* ``Experts.forward_dense`` (every expert on every token) and ``Experts.forward_gathered`` (each
  (token, expert) pair's matrices gathered), the static-shape paths the compiled decode step runs,
  equal the grouped training path, including experts that get no token, and the compiled step
  picks the gathered one up to E pairs or its byte budget (``moe.GATHER_MAX_BYTES``);
* ``KVCache`` keeps one buffer per MLA layer, ``[c_KV | k_rope]``: the ``a`` / ``b`` views, the
  legacy ``write`` / ``read`` and the slot API address the same memory;
* ``CacheMask`` (built once per forward): its absorbed-path bias is 0 / -inf exactly where
  ``visible`` says, laid out [B, T*H, S] for multi-token steps (MTP verification);
* the absorbed path over a cache with a 2-token step and ragged positions equals the naive one.
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.model.attention import CacheMask
from nanoseek.model import moe
from nanoseek.model.moe import Experts


def _random_experts(cfg, seed=0):
    torch.manual_seed(seed)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.2)
        ex.down_proj.normal_(0, 0.2)
    return ex


STATIC_PATHS = ["forward_dense", "forward_gathered"]


@pytest.mark.parametrize("path", STATIC_PATHS)
@pytest.mark.parametrize("N", [1, 3, 16])
def test_static_experts_equal_grouped(tiny_config, N, path):
    cfg = tiny_config()                                   # 8 experts, top-2
    ex = _random_experts(cfg)
    x = torch.randn(N, cfg.hidden_size)
    # random routing; with N <= 3 at least 2 of the 8 experts receive no token
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(N)])
    w = torch.rand(N, cfg.num_experts_per_tok)
    with torch.no_grad():
        ref, ref_counts = ex(x, w, idx)
        out, counts = getattr(ex, path)(x, w, idx)
    assert (ref_counts == 0).any() or N == 16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist()


@pytest.mark.parametrize("path", STATIC_PATHS)
def test_static_experts_all_tokens_on_one_expert(tiny_config, path):
    cfg = tiny_config()
    ex = _random_experts(cfg, seed=1)
    x = torch.randn(5, cfg.hidden_size)
    idx = torch.tensor([[3, 5]] * 5)                      # experts 3 and 5 get everything, the rest nothing
    w = torch.rand(5, 2)
    with torch.no_grad():
        ref, _ = ex(x, w, idx)
        out, counts = getattr(ex, path)(x, w, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [0, 0, 0, 5, 0, 5, 0, 0]


@pytest.mark.parametrize("path", STATIC_PATHS)
def test_static_experts_sum_an_expert_chosen_twice(tiny_config, path):
    """V4's hash-routed layers can give a token the same expert in two slots (``tid2eid`` is drawn at
    random): the expert's output counts once per slot, as in the grouped path."""
    cfg = tiny_config()
    ex = _random_experts(cfg, seed=3)
    x = torch.randn(3, cfg.hidden_size)
    idx = torch.tensor([[6, 6], [5, 5], [5, 2]])
    w = torch.rand(3, 2)
    with torch.no_grad():
        ref, ref_counts = ex(x, w, idx)
        out, counts = getattr(ex, path)(x, w, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist() == [0, 0, 1, 0, 0, 3, 2, 0]


@pytest.mark.parametrize("path", STATIC_PATHS)
def test_static_experts_backward_matches(tiny_config, path):
    cfg = tiny_config()
    ex = _random_experts(cfg, seed=2)
    x = torch.randn(6, cfg.hidden_size)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(6)])
    w = torch.rand(6, 2)
    grads = []
    for fn in (ex.forward, getattr(ex, path)):
        ex.zero_grad()
        fn(x, w, idx)[0].square().sum().backward()
        grads.append((ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("N,budget,expected", [(1, None, "forward_gathered"), (64, None, "forward_gathered"),
                                                (1, 0, "forward_gathered"), (4, 0, "forward_gathered"),
                                                (5, 0, "forward_dense"), (5, 10, "forward_gathered"),
                                                (6, 10, "forward_dense")])
def test_compiled_decode_gathers_up_to_its_byte_budget(tiny_config, monkeypatch, N, budget, expected):
    """The compiled decode gathers each (token, expert) pair's matrices while the N k pairs are at
    most the E experts (no more matrices read than the dense path's), or their matrices fit
    GATHER_MAX_BYTES a layer (the default: far beyond these sizes), else runs every expert; the
    choice is made only while compiling an eval-mode forward. 8 experts, top-2."""
    cfg = tiny_config()                                   # 8 experts, top-2
    ex = _random_experts(cfg).eval()
    assert ex.expert_nbytes() == (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * 4
    if budget is not None:                                # a budget of `budget` expert matrices a layer
        monkeypatch.setattr(moe, "GATHER_MAX_BYTES", budget * ex.expert_nbytes())
    x, w = torch.randn(N, cfg.hidden_size), torch.rand(N, 2)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(N)])
    called = []
    for name in STATIC_PATHS:
        monkeypatch.setattr(Experts, name, lambda self, *a, name=name: called.append(name) or (a[0], None))
    # the custom op's own dispatch would see the patched is_compiling (and leave dynamo's rules for it
    # built wrongly for later tests in this process): the plain function in its place
    monkeypatch.setattr(moe, "grouped_linear_op", moe.grouped_linear)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ex(x, w, idx)
    assert called == [expected]
    called.clear()
    ex.train()(x, w, idx)                                 # a compiled training forward keeps the grouped path
    assert called == []


def test_gather_budget_counts_bytes(tiny_config, monkeypatch):
    """bf16 experts are half the bytes: twice the pairs fit the same budget (8 experts, top-2)."""
    ex = _random_experts(tiny_config()).eval()
    monkeypatch.setattr(moe, "GATHER_MAX_BYTES", 6 * ex.expert_nbytes())     # 6 fp32 experts, 12 bf16
    monkeypatch.setattr(Experts, "forward_gathered", lambda self, *a: ("gathered", None))
    monkeypatch.setattr(Experts, "forward_dense", lambda self, *a: ("dense", None))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def path(module, n, dtype):
        x = torch.randn(n, module.gate_up_proj.shape[-1], dtype=dtype)
        return module(x, torch.rand(n, 2), torch.tensor([[0, 1]] * n))[0]

    assert path(ex, 6, torch.float32) == "dense"                  # 12 pairs: more than E and the budget
    ex = ex.to(torch.bfloat16)
    assert path(ex, 6, torch.bfloat16) == "gathered"              # 12 pairs x half the bytes
    assert path(ex, 7, torch.bfloat16) == "dense"


def test_kv_cache_views_share_one_buffer(tiny_model):
    model = tiny_model()
    c, r = model.config.kv_lora_rank, model.config.qk_rope_head_dim
    cache = model.new_cache(3, 8)
    assert all(a.data_ptr() == kv.data_ptr() for a, kv in zip(cache.a, cache.kv))
    latent, k_pe = torch.randn(2, 2, c), torch.randn(2, 2, r)
    pos = torch.tensor([[4, 5], [0, 1]])
    rows = torch.tensor([2, 0])
    cache.write(1, pos, latent, k_pe, rows)
    slots = cache.read_slots(1, 6, rows)                               # [2, 6, c + r]
    torch.testing.assert_close(slots[0, 4:6], torch.cat([latent[0], k_pe[0]], dim=-1))
    torch.testing.assert_close(slots[1, 0:2], torch.cat([latent[1], k_pe[1]], dim=-1))
    a, b = cache.read(1, 6, rows)
    torch.testing.assert_close(a, slots[..., :c])
    torch.testing.assert_close(b, slots[..., c:])
    cache.copy_rows([2], [1], 6)
    torch.testing.assert_close(cache.kv[1][1, :6], cache.kv[1][2, :6])
    with pytest.raises(ValueError, match="exceeds the cache length 8"):
        cache.check_positions(torch.tensor([[8]]))


def test_cache_mask_bias_layout():
    pos = torch.tensor([[2, 3], [0, 1]])
    m = CacheMask(pos, 4)
    assert m.length == 4
    bias = m.bias(3)                                                    # [B, T*H, S]
    assert bias.shape == (2, 6, 4)
    for t in range(2):
        for h in range(3):
            expect = torch.where(m.visible[:, t], 0.0, float("-inf"))
            assert torch.equal(bias[:, t * 3 + h], expect)
    one = CacheMask(pos[:, :1], 4).bias(3)
    assert one.shape == (2, 1, 4)                                       # broadcast over heads


@torch.no_grad()
def test_absorbed_equals_naive_for_two_token_ragged_steps(tiny_model):
    model = tiny_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    outs = []
    for absorb in (False, True):
        cache = model.new_cache(2, 16)
        model.set_absorb(False)
        model(ids[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache)
        model.set_absorb(absorb)
        pos = torch.tensor([[5, 6], [3, 4]])                           # row 1 rewinds: stale slots masked
        outs.append(model(ids[:, 5:7], positions=pos, cache=cache).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-5)
