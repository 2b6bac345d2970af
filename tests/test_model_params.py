"""Parameter counts (analytic == instantiated, tensor by tensor; the published 671B / 37B on the
meta device, and DeepSeek-V3.2's equal to transformers' own model on the meta device), activated
parameters measured from gradients, KV-cache bytes (analytic == the cache), init, finite
gradients, bf16."""

from __future__ import annotations

import json
import math
import resource
import warnings
from collections import Counter

import pytest
import torch

from nanoseek.model import DeepseekV3ForCausalLM, load_model_config
from nanoseek.model.cache import KVCache
from nanoseek.model.config import PRESET_DIR
from nanoseek.model.dsa import Indexer
from nanoseek.model.params import (
    KV_FORMATS, count_params, expert_params, indexer_params, kv_cache_bytes_per_token, kv_cache_parts, layer_params,
)

CONFIGS = {
    "mla_q_lora": {},
    "mla_no_q_lora": {"q_lora_rank": None},
    "dense_only": {"n_routed_experts": 0},
    "mha": {"attention_type": "mha", "num_key_value_heads": 2},
    "gqa_dense": {"attention_type": "mha", "num_attention_heads": 4, "num_key_value_heads": 1, "n_routed_experts": 0},
    "tied": {"tie_word_embeddings": True},
    "no_mtp": {"num_nextn_predict_layers": 0},
    "mtp2": {"num_nextn_predict_layers": 2},
    "bias_shared2_freq2": {"attention_bias": True, "n_shared_experts": 2, "moe_layer_freq": 2,
                           "num_hidden_layers": 4, "first_k_dense_replace": 0},
    "no_shared_greedy_v2": {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy",
                            "n_group": 1, "topk_group": 1},
    # DeepSeek-V3.2: a lightning indexer in every layer, MTP blocks included
    "v32": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 3},
    "v32_mtp2_bias_dense_first2": {"index_n_heads": 3, "index_head_dim": 12, "index_topk": 5, "attention_bias": True,
                                   "num_nextn_predict_layers": 2, "first_k_dense_replace": 2, "q_lora_rank": 24},
    "v32_dense_tied": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 1, "n_routed_experts": 0,
                       "tie_word_embeddings": True},
}


def component(name: str) -> str:
    """The ParamCount breakdown key a state-dict tensor belongs to."""
    if name.startswith("model.mtp."):
        return "mtp"
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name == "model.norm.weight" or "layernorm.weight" in name and ".self_attn." not in name:
        return "norms"
    if ".self_attn.indexer." in name:
        return "indexer"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_mlp"
    raise AssertionError(f"unclassified tensor {name}")


def instantiated_counts(model) -> Counter:
    """Unique parameters + the e_score_correction_bias buffers, by component."""
    counts: Counter = Counter()
    for name, p in model.named_parameters():          # tied weights appear once
        counts[component(name)] += p.numel()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            counts[component(name)] += b.numel()
    return counts


@pytest.mark.parametrize("name", CONFIGS)
def test_count_matches_instantiated_model(tiny_config, name):
    cfg = tiny_config(**CONFIGS[name])
    model = DeepseekV3ForCausalLM(cfg)
    pc = count_params(cfg)
    got = instantiated_counts(model)
    assert got.pop("mtp", 0) == pc.mtp
    assert dict(got) == {k: v for k, v in pc.breakdown.items() if v}
    assert pc.total == sum(got.values()) == model.num_parameters()
    assert model.num_parameters(exclude_mtp=False) == pc.total + pc.mtp - sum(
        b.numel() for n, b in model.named_buffers() if n.startswith("model.mtp.") and n.endswith("bias"))
    for i, layer in enumerate(list(model.model.layers) + list(model.model.mtp)):   # MTP k is layer L + k
        n = sum(p.numel() for p in layer.parameters()) + sum(
            b.numel() for bn, b in layer.named_buffers() if bn.endswith("e_score_correction_bias"))
        if i >= cfg.num_hidden_layers:   # MTP: enorm, hnorm, eh_proj, shared_head.norm around the block
            n -= 2 * cfg.hidden_size + 2 * cfg.hidden_size ** 2 + cfg.hidden_size
        assert n == sum(layer_params(cfg, i)[0].values()), f"layer {i}"


@pytest.mark.parametrize("name", ["mla_q_lora", "mha", "dense_only", "tied", "v32", "v32_dense_tied"])
def test_active_count_measured_from_gradients(tiny_config, name, monkeypatch):
    """Backprop one decoded token (its context cached without grad): the parameters it touches
    are the activated ones (routed experts counted per expert slice; the embedding and the router
    bias count in full, as in the published 37B). A V3.2 indexer gets no gradient from the language
    model loss (its selection is discrete): it counts as activated when its key and its scores were
    computed for the token (``keys`` reads wk and k_norm, ``scores`` wq_b and weights_proj)."""
    cfg = tiny_config(**CONFIGS[name])
    if cfg.index_n_heads:   # every key attended, else a token that drops its own latent leaves kv_a without gradient
        cfg = cfg.replace(index_topk=8)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[7, 9, 3, 4, 8]]), positions=torch.arange(5)[None], cache=cache)
    ran: dict[str, set[int]] = {"keys": set(), "scores": set()}
    for method in ran:
        real = getattr(Indexer, method)
        monkeypatch.setattr(Indexer, method,
                            lambda self, *a, _real=real, _m=method: (ran[_m].add(id(self)), _real(self, *a))[1])
    model(torch.tensor([[5]]), positions=torch.tensor([[5]]), cache=cache).logits.sum().backward()
    active = 0
    for mname, m in model.named_modules():
        if isinstance(m, Indexer) and not mname.startswith("model.mtp."):
            assert id(m) in ran["keys"] and id(m) in ran["scores"], mname
            active += sum(p.numel() for p in m.parameters())
    for pname, p in model.named_parameters():
        if pname.startswith("model.mtp.") or ".indexer." in pname:
            continue
        if ".mlp.experts." in pname:
            touched = p.grad.flatten(1).abs().sum(1) > 0                 # [E]
            assert touched.sum() == cfg.num_experts_per_tok
            active += touched.sum().item() * p[0].numel()
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
            active += p.numel()
    active += sum(m.gate.e_score_correction_bias.numel() for m in model.moe_layers())
    assert active == count_params(cfg).active
    assert count_params(cfg).active_breakdown.get("indexer", 0) == cfg.num_hidden_layers * indexer_params(cfg)


def test_published_counts_on_meta_device():
    cfg = load_model_config("deepseek-v3")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                # KiB on Linux
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, init_weights=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1024 ** 2   # < 1 GiB (the real thing: 1.3 TB)
    assert all(t.is_meta for t in model.parameters()) and all(t.is_meta for t in model.buffers())
    got = instantiated_counts(model)
    mtp = got.pop("mtp")
    assert sum(got.values()) == 671_026_419_200
    pc = count_params(cfg)
    assert pc.total == 671_026_419_200 and model.num_parameters() == pc.total
    assert dict(got) == {k: v for k, v in pc.breakdown.items() if v}
    assert mtp == pc.mtp and 11.5e9 < mtp < 11.7e9
    # the facts' decomposition: 2Vd + d + 3 dense layers + 58 MoE layers
    d, V = 7168, 129280
    attn = 187_107_328
    dense = attn + 3 * d * 18432 + 2 * d
    moe = attn + 257 * 3 * d * 2048 + 256 * d + 256 + 2 * d
    assert (dense, moe) == (583_483_392, 11_507_286_272)
    assert sum(layer_params(cfg, 0)[0].values()) == dense and sum(layer_params(cfg, 3)[0].values()) == moe
    assert 2 * V * d + d + 3 * dense + 58 * moe == 671_026_419_200
    # activated: all but the 248 routed experts a token is not sent to, in 58 layers
    assert pc.active == pc.total - 58 * (256 - 8) * expert_params(cfg) == 37_552_297_472
    assert pc.active_without_embedding == pc.active - V * d
    assert round(pc.active / 1e9, 2) == 37.55 and round(pc.active_without_embedding / 1e9, 2) == 36.63


# DeepSeek-V3.2(-Exp): V3's 671B plus a 13,959,424-parameter indexer in each of the 61 layers
V32_TOTAL, V32_ACTIVE = 671_877_944_064, 38_403_822_336


def test_published_v32_counts_on_meta_device():
    cfg = load_model_config("deepseek-v3.2")
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64        # wq_b, wk, k_norm, weights_proj
    assert indexer_params(cfg) == per_layer == 13_959_424
    pc, v3 = count_params(cfg), count_params(load_model_config("deepseek-v3"))
    assert pc.breakdown["indexer"] == pc.active_breakdown["indexer"] == 61 * per_layer
    assert (pc.total, pc.active) == (V32_TOTAL, V32_ACTIVE)
    assert (pc.total - v3.total, pc.active - v3.active, pc.mtp - v3.mtp) == (61 * per_layer, 61 * per_layer, per_layer)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, init_weights=False)
    got = instantiated_counts(model)
    assert got.pop("mtp") == pc.mtp
    assert dict(got) == {k: v for k, v in pc.breakdown.items() if v}
    assert model.num_parameters() == pc.total


def test_published_v32_counts_equal_transformers_on_meta_device():
    """transformers' own DeepseekV32ForCausalLM of the preset's config.json, built on the meta device:
    its parameters plus the routers' e_score_correction_bias buffers (nanoseek counts them, as the
    published V3 figure does) are nanoseek's total; without the routed experts a token is not sent to,
    its activated count. transformers has no MTP module for V3.2; nanoseek counts MTP apart."""
    transformers = pytest.importorskip("transformers")
    d = json.loads((PRESET_DIR / "deepseek-v3.2.json").read_text())
    d.pop("quantization_config")                  # build the bf16 model; FP8 storage changes no count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cfg = transformers.DeepseekV32Config.from_dict(d)
        with torch.device("meta"):
            hf = transformers.DeepseekV32ForCausalLM(hf_cfg)
    assert all(p.is_meta for p in hf.parameters())
    total = sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    inactive = 0
    for layer in hf.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            n = sum(p.numel() for p in experts.parameters())
            inactive += n // hf_cfg.n_routed_experts * (hf_cfg.n_routed_experts - hf_cfg.num_experts_per_tok)
    indexer = sum(p.numel() for n, p in hf.named_parameters() if ".indexer." in n)
    pc = count_params(load_model_config("deepseek-v3.2"))
    assert (total, total - inactive, indexer) == (pc.total, pc.active, pc.breakdown["indexer"])
    assert (total, total - inactive) == (V32_TOTAL, V32_ACTIVE)


# ------------------------------------------------------------------ KV-cache bytes
@pytest.mark.parametrize("name", ["mla_q_lora", "mha", "v32", "v32_mtp2_bias_dense_first2", "v32_dense_tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_the_cache(tiny_config, name, dtype):
    """KVCache.bytes_per_token (what the engine allocates: latent, rope key and, for V3.2, the
    indexer key, all in the model's dtype) equals the analytic figure, per layer and in all."""
    cfg = tiny_config(**CONFIGS[name])
    cache = KVCache(cfg, batch_size=2, max_len=3, dtype=dtype, device="meta")
    assert cache.bytes_per_token == kv_cache_bytes_per_token(cfg, dtype.itemsize)
    assert cache.bytes_per_token == cfg.num_hidden_layers * sum(kv_cache_parts(cfg, dtype.itemsize).values())
    one = KVCache(cfg, batch_size=1, max_len=1, dtype=dtype, device="meta", num_layers=1)
    assert one.bytes_per_token == kv_cache_bytes_per_token(cfg, dtype.itemsize, per_layer=True)
    fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]   # the formats naming nanoseek's cache
    assert kv_cache_bytes_per_token(cfg, fmt) == cache.bytes_per_token


def test_kv_cache_formats_on_the_published_configs():
    v3, v32 = load_model_config("deepseek-v3"), load_model_config("deepseek-v3.2")
    by_hand = {   # per token per layer: latent 512, rope key 64, V3.2's indexer key 128 values
        "fp32": ((512 + 64) * 4, 128 * 4),
        "bf16": ((512 + 64) * 2, 128 * 2),
        "fp8": (512 + 64, 128),
        "bf16-fp8-index": ((512 + 64) * 2, 128 + 4),              # FP8 indexer key + one fp32 scale
        "fp8-flashmla": (512 + 4 * 4 + 64 * 2, 128 + 4),          # FlashMLA's 656 B entry
    }
    assert set(by_hand) == set(KV_FORMATS)
    for fmt, (mla, index) in by_hand.items():
        assert kv_cache_bytes_per_token(v3, fmt, per_layer=True) == mla, fmt
        assert kv_cache_parts(v32, fmt) == {"latent": kv_cache_parts(v3, fmt)["latent"],
                                            "rope_key": kv_cache_parts(v3, fmt)["rope_key"], "indexer_key": index}
        assert kv_cache_bytes_per_token(v32, fmt) == 61 * (mla + index), fmt
    assert kv_cache_bytes_per_token(v32, 2) == 61 * 1408 == 85_888
    assert kv_cache_bytes_per_token(v32, "fp8-flashmla", per_layer=True) == 656 + 132
    assert kv_cache_parts(v32, 2, absorbed=False)["indexer_key"] == 256
    with pytest.raises(ValueError, match="bf16-fp8-index"):
        kv_cache_parts(v32, "int4")


# ------------------------------------------------------------------ init, gradients, dtypes
def test_init_follows_the_report(tiny_config):
    cfg = tiny_config(initializer_range=0.006, hidden_size=64, vocab_size=512)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name
        else:
            assert abs(p.std().item() - 0.006) < 0.0015, name
    assert model.expert_bias().abs().sum() == 0
    ids = torch.randint(0, 512, (2, 16))
    loss = model(ids, labels=ids).loss.item()
    assert abs(loss - math.log(512)) < 0.05                                # near-uniform predictions at init


@pytest.mark.parametrize("name", ["mla_q_lora", "gqa_dense", "mtp2", "tied"])
def test_every_parameter_gets_a_finite_gradient(tiny_config, name):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(**CONFIGS[name]))
    model.set_seq_aux_alpha(1e-3)
    ids = torch.randint(0, 128, (2, 24))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss)
    loss = out.loss + 0.3 * (out.mtp_loss if out.mtp_loss is not None else 0)
    loss = loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_bf16_forward_backward_on_cpu(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids, labels=ids.roll(-1, 1))
    model.to(torch.bfloat16)
    out = model(ids, labels=ids.roll(-1, 1))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=0.02)
    assert out.mtp_loss.item() == pytest.approx(ref.mtp_loss.item(), rel=0.02)
    (out.loss + out.mtp_loss).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), pname
        assert p.grad.dtype == p.dtype
    model.eval()
    cache = model.new_cache(2, 16)
    assert cache.dtype == torch.bfloat16
    with torch.no_grad():
        step = model(ids[:, :8], positions=torch.arange(8).expand(2, 8), cache=cache).logits
        full = model(ids[:, :8]).logits
    torch.testing.assert_close(step.float(), full.float(), rtol=0, atol=0.05)


def test_logits_to_keep_and_hidden(tiny_model):
    model = tiny_model().eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, return_hidden=True)
        last = model(ids, logits_to_keep=3)
    assert full.hidden.shape == (2, 10, 32) and last.logits.shape == (2, 3, 128)
    torch.testing.assert_close(last.logits, full.logits[:, -3:])
    torch.testing.assert_close(model.lm_head(full.hidden), full.logits)
