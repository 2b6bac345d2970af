"""Tests for ``nanoseek estimate``: the published DeepSeek-V3 and V3.2 numbers, the arithmetic of
each section checked by hand on small configs, the layer-kind registry, the accelerator table, and
the CLI (tables, --json, --contexts, --compare, clear errors)."""

from __future__ import annotations

import json

import pytest

from nanoseek.cli import main
from nanoseek.estimate.comm import comm_estimate, ep_all_to_all
from nanoseek.estimate.attention import (
    LAYER_KINDS, decode_attention_flops, kind_of, kv_bytes, kv_read_bytes, layer_kinds, mean_min,
    train_attention_flops,
)
from nanoseek.estimate.cli import KV_DTYPES
from nanoseek.estimate.estimate import estimate, param_report, parse_contexts, parse_count, training_cost
from nanoseek.estimate.flops import (
    EstimateError, attention_flops_per_token, flops_per_token, training_flops_breakdown,
)
from nanoseek.estimate.gpus import GPUS, GPUSpecError, get_gpu, gpu_spec_from_dict, load_gpu_spec
from nanoseek.estimate.inference import context_costs, decode_estimate, decode_weight_bytes, experts_touched
from nanoseek.estimate.memory import (
    Layout, activation_bytes_per_token, estimate_for_layout, stage_layers,
)
from nanoseek.model.config import PRESET_DIR as PRESETS, ModelConfig, load_model_config
from nanoseek.model.params import KV_FORMATS, count_params, indexer_params, kv_cache_bytes_per_token, layer_params


@pytest.fixture(scope="module")
def v3():
    return load_model_config("deepseek-v3")


@pytest.fixture(scope="module")
def v32():
    return load_model_config("deepseek-v3.2")


@pytest.fixture(scope="module")
def tiny():
    return load_model_config("tiny")


def _tiny_v32(**kw) -> ModelConfig:
    return load_model_config("tiny").replace(**{"index_n_heads": 4, "index_head_dim": 16, "index_topk": 6, **kw})


def _dense_mha(**kw) -> ModelConfig:
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, qk_nope_head_dim=6, qk_rope_head_dim=2,
                v_head_dim=8, attention_type="mha", n_routed_experts=0, first_k_dense_replace=2,
                num_nextn_predict_layers=0, max_position_embeddings=256, rope_scaling=None)
    base.update(kw)
    return ModelConfig(**base).validate()


# ---------------------------------------------------------------------- published V3 numbers
def test_v3_parameters_and_kv_cache(v3):
    p = param_report(v3)
    assert p.total == 671_026_419_200
    assert p.active == 37_552_297_472 and 37.5e9 < p.active < 37.6e9
    assert p.active_without_embedding == p.active - 129280 * 7168
    assert sum(p.breakdown[k] for k in p.breakdown if k != "mtp") == p.total
    assert sum(p.active_breakdown[k] for k in p.active_breakdown if k != "mtp") == p.active
    assert 11e9 < p.mtp < 12e9 and p.total_with_mtp == p.total + p.mtp
    inf = decode_estimate(v3, get_gpu("h800"), context=4096, batch=1)
    mla = next(v for v in inf.variants if v.is_model)
    assert mla.bytes_per_token_per_layer == 1152 and mla.bytes_per_token == 70_272
    assert mla.bytes_per_request == 70_272 * 4096
    mha = next(v for v in inf.variants if v.kv_heads == 128)
    assert mha.bytes_per_token_per_layer == 128 * (192 + 128) * 2       # the naive MLA cache
    assert mha.times_model == pytest.approx(40960 / 576)                # 71x


def test_published_training_cost_and_implied_mfu(v3):
    h800 = get_gpu("h800")
    assert h800.bf16_tflops == 989.5
    tokens = parse_count("14.8T")
    c = training_cost(v3, tokens, h800, 2048, gpu_hours=parse_count("180K") * tokens / 1e12, price=2.0)
    assert c.gpu_hours == pytest.approx(2_664_000)
    assert c.cost_usd == pytest.approx(5_328_000)
    assert c.gpu_hours_per_trillion_tokens == pytest.approx(180_000)
    assert c.days == pytest.approx(2_664_000 / 2048 / 24)                # 54.2 days; 3.66 per T
    expected_total = tokens * flops_per_token(v3, 4096)
    assert c.total_flops == pytest.approx(expected_total)
    assert c.mfu == pytest.approx(expected_total / (2_664_000 * 3600 * 989.5e12))
    assert c.mfu_source == "implied by gpu_hours"
    assert 0.35 < c.mfu < 0.45                                            # ~40.7% of BF16 peak
    assert c.mfu_vs_fp8_peak == pytest.approx(c.mfu / 2)
    # and back: that MFU gives the same GPU-hours
    again = training_cost(v3, tokens, h800, 2048, mfu=c.mfu, price=2.0)
    assert again.gpu_hours == pytest.approx(2_664_000) and again.mfu_source == "given"


def test_flops_per_token_counts_what_it_documents(v3, tiny):
    b = training_flops_breakdown(v3, 4096, include_mtp=False)
    assert b["matmul"] == 6 * 36_625_618_432
    assert b["attention"] == 3 * 61 * 2 * 128 * (192 + 128) * (4097 / 2)
    assert b["mtp"] == 0
    assert flops_per_token(v3, 4096, include_mtp=False) == b["matmul"] + b["attention"]
    # attention grows linearly with the sequence, the rest does not
    assert attention_flops_per_token(v3, 8191) == 2 * attention_flops_per_token(v3, 4095)
    assert training_flops_breakdown(v3, 8191)["matmul"] == training_flops_breakdown(v3, 4095)["matmul"]
    # MTP by hand for tiny: enorm+hnorm+eh_proj+block(activated)+norm, plus the shared head again
    d, v = tiny.hidden_size, tiny.vocab_size
    _, act = layer_params(tiny, tiny.num_hidden_layers)
    mtp_params = 3 * d + 2 * d * d + sum(act.values()) + v * d
    b = training_flops_breakdown(tiny, 128)
    assert b["mtp"] == 6 * mtp_params + 3 * attention_flops_per_token(tiny, 128, layers=1)
    with pytest.raises(EstimateError):
        attention_flops_per_token(tiny, 0)


def test_training_cost_input_errors(v3):
    g = get_gpu("h100")
    with pytest.raises(EstimateError, match="not both"):
        training_cost(v3, 1e12, g, 8, mfu=0.4, gpu_hours=1e5)
    with pytest.raises(EstimateError, match="MFU"):
        training_cost(v3, 1e12, g, 8, mfu=1.5)
    default = training_cost(v3, 1e12, g, 8)
    assert default.mfu == 0.4 and default.mfu_source == "default"


def test_parse_count():
    assert parse_count("14.8T") == pytest.approx(14.8e12)
    assert parse_count("180K") == 180_000
    assert parse_count("2.664M") == pytest.approx(2_664_000)
    assert parse_count("37b") == 37e9
    assert parse_count("1e12") == 1e12 and parse_count("1,000") == 1000
    for bad in ("12X", "T", "", "1.2.3"):
        with pytest.raises(EstimateError, match="K, M, B or T"):
            parse_count(bad)


# ---------------------------------------------------------------------- other presets
def test_deepseek_v2_presets():
    v2 = param_report(load_model_config("deepseek-v2"))
    assert 235e9 < v2.total < 237e9 and 21e9 < v2.active < 22e9          # "236B total, 21B activated"
    lite_cfg = load_model_config("deepseek-v2-lite")
    lite = param_report(lite_cfg)
    assert 15.6e9 < lite.total < 15.8e9                                   # "15.7B"
    assert 2.4e9 < lite.active_without_embedding < 2.5e9                  # "2.4B activated"
    assert v2.mtp == 0 and lite.mtp == 0
    assert lite_cfg.q_lora_rank is None and lite_cfg.topk_method == "greedy"


# ---------------------------------------------------------------------- accelerators
def test_gpu_table():
    for name in ("a100", "h100", "h800", "h20", "h200", "b200"):
        g = get_gpu(name)
        assert g.bf16_tflops > 0 and g.hbm_gb > 0 and g.source
    h100, h800, h20 = get_gpu("H100"), get_gpu("h800"), get_gpu("h20")
    assert (h100.bf16_tflops, h100.fp8_tflops) == (h800.bf16_tflops, h800.fp8_tflops) == (989.5, 1979.0)
    assert (h100.nvlink_gb_s, h800.nvlink_gb_s) == (900, 400)
    assert h20.bf16_tflops < h100.bf16_tflops / 5 and h20.hbm_tb_s > h100.hbm_tb_s
    assert get_gpu("a100").fp8_tflops is None
    with pytest.raises(GPUSpecError) as e:
        get_gpu("h900")
    assert all(n in str(e.value) for n in GPUS)


def test_gpu_spec_files(tmp_path):
    (tmp_path / "g.toml").write_text(
        'name = "X1"\nbf16_tflops = 500\nfp8_tflops = 1000\nhbm_gb = 64\nhbm_tb_s = 2.0\n'
        'nvlink_gb_s = 200\nnetwork_gb_s = 25\ngpus_per_node = 4\n')
    g = load_gpu_spec(tmp_path / "g.toml")
    assert g.name == "X1" and g.bf16_flops == 500e12 and g.nvlink_bytes_s_per_direction == 100e9
    assert g.gpus_per_node == 4
    (tmp_path / "g.json").write_text(json.dumps({"name": "X2", "bf16_tflops": 100, "fp8_tflops": None,
                                                  "hbm_gb": 16, "hbm_tb_s": 1, "nvlink_gb_s": 0.5,
                                                  "network_gb_s": 1}))
    assert load_gpu_spec(tmp_path / "g.json").fp8_tflops is None
    ok = {"name": "Y", "bf16_tflops": 1, "hbm_gb": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1, "network_gb_s": 1}
    with pytest.raises(GPUSpecError, match="bf16_tflop"):
        gpu_spec_from_dict({**ok, "bf16_tflop": 3})
    with pytest.raises(GPUSpecError, match="hbm_gb"):
        gpu_spec_from_dict({k: v for k, v in ok.items() if k != "hbm_gb"})
    with pytest.raises(GPUSpecError, match="hbm_tb_s"):
        gpu_spec_from_dict({**ok, "hbm_tb_s": -1})
    with pytest.raises(GPUSpecError, match="no such file"):
        load_gpu_spec(tmp_path / "missing.toml")


# ---------------------------------------------------------------------- memory for a layout
def test_memory_single_gpu_by_hand(tiny):
    pc = count_params(tiny)
    m = estimate_for_layout(tiny, Layout(zero=0), "bf16", seq_len=64)
    n = pc.total + pc.mtp
    assert m.params_per_gpu == n
    assert (m.weights_bytes, m.grads_bytes, m.master_bytes, m.moments_bytes) == (2 * n, 4 * n, 4 * n, 8 * n)
    layers = sum(activation_bytes_per_token(tiny, i) for i in range(tiny.num_hidden_layers + 1))
    assert m.activations_bytes == layers * 64 + tiny.vocab_size * 4 * 2 * 64
    assert m.total_bytes == 18 * n + m.activations_bytes


def test_memory_sharding_and_expert_parallel(tiny):
    pc = count_params(tiny)
    routed = pc.breakdown["routed_experts"] + layer_params(tiny, tiny.num_hidden_layers)[0]["routed_experts"]
    dense = pc.total + pc.mtp - routed
    for zero in (0, 1, 2, 3):
        m = estimate_for_layout(tiny, Layout(dp=4, ep=2, zero=zero), "fp8", seq_len=64)
        exp = lambda z: dense / (4 if zero >= z else 1) + routed / 2 / (2 if zero >= z else 1)  # noqa: E731
        assert m.params_per_gpu == dense + routed / 2
        assert m.weights_bytes == pytest.approx(1 * exp(3))
        assert m.grads_bytes == pytest.approx(4 * exp(2))
        assert m.master_bytes == pytest.approx(4 * exp(1))
        assert m.moments_bytes == pytest.approx(4 * exp(1))
    with pytest.raises(EstimateError, match="must divide dp"):
        Layout(dp=4, ep=3).validate(tiny)
    with pytest.raises(EstimateError, match="n_routed_experts"):
        Layout(dp=16, ep=16).validate(tiny)
    with pytest.raises(EstimateError, match="dense"):
        Layout(dp=2, ep=2).validate(_dense_mha())


def test_memory_deepseek_v3_layout(v3):
    assert [len(r) for r in stage_layers(v3, 16)] == [4] * 13 + [3] * 3
    lay = Layout(dp=128, pp=16, ep=64, zero=1)
    m = estimate_for_layout(v3, lay, "fp8", gpu=get_gpu("h800"))
    assert m.gpus == 2048
    # the heaviest stage is stage 1, layers 4-7: 4 MoE layers, dense parts in full, routed experts / 64
    assert m.stage == 1 and m.stage_layers == [4, 5, 6, 7]
    tot, _ = layer_params(v3, 4)
    dense = 4 * (sum(tot.values()) - tot["routed_experts"])
    assert m.params_per_gpu == pytest.approx(dense + 4 * tot["routed_experts"] / 64)
    assert m.master_bytes == pytest.approx(4 * (dense / 128 + 4 * tot["routed_experts"] / 64 / 2))
    assert m.weights_bytes + m.grads_bytes + m.master_bytes + m.moments_bytes < 20e9
    rec = estimate_for_layout(v3, Layout(dp=128, pp=16, ep=64, zero=1, recompute=True), "fp8",
                              gpu=get_gpu("h800"))
    assert rec.activations_bytes < m.activations_bytes / 5 and rec.fits
    two = estimate_for_layout(v3, Layout(dp=128, pp=16, ep=64, micro_batch=2), "fp8")
    assert two.activations_bytes == pytest.approx(2 * m.activations_bytes, rel=1e-3)


def test_activation_bytes_dense_mha_by_hand():
    c = _dense_mha()
    d, h, kvh, qk, v, inter = 32, 4, 2, 8, 8, 64
    elems = 2 * d + h * qk + kvh * (qk + v) + h * v + 2 * d + 3 * inter
    assert activation_bytes_per_token(c, 0) == elems * 2 + h * 4 + 2 * 4     # + fp32 1/rms of its 2 RMSNorms


# ---------------------------------------------------------------------- inference
def test_experts_touched(v3):
    assert experts_touched(v3, 1) == pytest.approx(8)
    assert experts_touched(v3, 10_000) == pytest.approx(256)
    assert 8 < experts_touched(v3, 16) < 16 * 8


def test_decode_bound_by_hand():
    c = _dense_mha()
    g = gpu_spec_from_dict({"name": "T", "bf16_tflops": 1000, "hbm_gb": 1, "hbm_tb_s": 1,
                            "nvlink_gb_s": 1, "network_gb_s": 1})
    inf = decode_estimate(c, g, context=100, batch=2, price=3.6, weight_bytes=2)
    assert inf.serve_gpus == 1 and [v.kv_heads for v in inf.variants] == [2, 4, 1]
    own = inf.variants[0]
    assert own.is_model and own.bytes_per_token == 2 * 2 * (8 + 8) * 2      # kvh * (qk + v) * 2 B * layers
    pc = count_params(c)
    weights = (pc.total - pc.breakdown["embedding"] + 2 * 32) * 2
    assert decode_weight_bytes(c, 2, 2) == weights
    t_mem = (weights + 2 * 100 * own.bytes_per_token) / 1e12
    assert own.bound == "memory" and own.step_time_s == pytest.approx(t_mem)
    assert own.tokens_per_s == pytest.approx(2 / t_mem)
    assert own.usd_per_million_tokens == pytest.approx(1 * 3.6 / 3600 / (2 / t_mem) * 1e6)
    with pytest.raises(EstimateError, match="GQA"):
        decode_estimate(c, g, context=10, gqa_groups=3)


def test_decode_mla_fits_more_requests_than_mha(v3):
    inf = decode_estimate(v3, get_gpu("h800"), context=131072, batch=64, serve_gpus=32)
    by = {v.kv_heads: v for v in inf.variants}
    mla, mha, gqa = by[None], by[128], by[8]
    assert inf.weight_bytes_per_param == 1.0                              # V3 ships FP8
    assert mla.max_requests > gqa.max_requests > mha.max_requests
    assert mla.tokens_per_s > gqa.tokens_per_s > mha.tokens_per_s
    assert mha.batch == mha.max_requests < 64
    longer = decode_estimate(v3, get_gpu("h800"), context=262144, batch=64, serve_gpus=32)
    assert longer.variants[0].tokens_per_s < mla.tokens_per_s


# ---------------------------------------------------------------------- expert-parallel comm
def test_all_to_all_inside_one_node_h100_vs_h800(v3):
    h100 = ep_all_to_all(v3, get_gpu("h100"), 8, mfu=0.4)
    h800 = ep_all_to_all(v3, get_gpu("h800"), 8, mfu=0.4)
    assert h100.dispatch_bytes == 8 * 7168 * (1 + 4 / 128) and h100.combine_bytes == 8 * 7168 * 2
    assert h100.network_bytes_per_token == 0 and h100.nodes == 1
    distinct = 8 * (1 - (7 / 8) ** 8)
    assert h100.nvlink_bytes_per_token == pytest.approx(distinct * 7 / 8 * 7168 * (3 + 1 / 32))
    assert h800.nvlink_time_us == pytest.approx(h100.nvlink_time_us * 900 / 400)
    assert h800.compute_time_us == h100.compute_time_us
    assert h800.comm_to_compute > 2 * h100.comm_to_compute
    assert h100.train_comm_to_compute == pytest.approx(h100.comm_to_compute * 2 / 3)


def test_all_to_all_across_nodes_is_node_limited(v3):
    e = ep_all_to_all(v3, get_gpu("h800"), 64, mfu=0.4)
    assert e.nodes == 8 and e.node_limited and e.nodes_per_token == pytest.approx(4)
    assert e.remote_nodes_per_token == pytest.approx(3.5)
    assert e.network_bytes_per_token == pytest.approx(3.5 * 7168 * (3 + 1 / 32))
    h100 = ep_all_to_all(v3, get_gpu("h100"), 64, mfu=0.4)
    assert e.network_time_us == h100.network_time_us == e.comm_time_us   # IB-bound: no H100 edge
    ce = comm_estimate(v3, get_gpu("h800"), 64)
    assert {x.gpu for x in ce.by_gpu} == {g.name for g in GPUS.values()}
    assert comm_estimate(v3, get_gpu("h800"), 1) is None
    six = gpu_spec_from_dict({"name": "six", "bf16_tflops": 1, "hbm_gb": 1, "hbm_tb_s": 1,
                              "nvlink_gb_s": 1, "network_gb_s": 1, "gpus_per_node": 6})
    with pytest.raises(EstimateError, match="multiple of 6"):
        ep_all_to_all(v3, six, 8)
    with pytest.raises(EstimateError, match="must divide"):
        ep_all_to_all(v3, get_gpu("h800"), 12)


# ---------------------------------------------------------------------- V3.2 and the layer kinds
def _tiny_v4(kind: str):
    """v4-tiny with every layer of one V4 kind (layer_types spelled as transformers does)."""
    from nanoseek.estimate.family import V4_KINDS, V4Estimand
    layer_type = {v: k for k, v in V4_KINDS.items()}[kind]
    cfg = V4Estimand.from_json(PRESETS / "v4-tiny.json")
    return cfg.replace(layer_types=[layer_type] * cfg.num_hidden_layers)


def _sample(kind: str):
    """A small config whose layers are of ``kind``; a kind added to the registry needs one here."""
    if kind in ("sliding", "csa", "hca"):
        return _tiny_v4(kind)
    return {"mla": load_model_config("tiny"), "mla+indexer": _tiny_v32(), "mha": _dense_mha()}[kind]


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_every_layer_kind_is_consistent(kind):
    """For every registered kind: its training mean equals the mean of its decode counts over a causal
    sequence, its cache holds what nanoseek's KVCache holds, and a decode step never reads more
    than the cache."""
    cfg = _sample(kind)
    v4 = hasattr(cfg, "layer_types")
    assert layer_kinds(cfg) == [kind] * cfg.num_hidden_layers
    assert kind_of(cfg, 10**6).name == ("sliding" if v4 else kind)       # V4's MTP block: sliding window
    k = LAYER_KINDS[kind]
    for length in (1, 5, 6, 7, 40, 100, 257):
        attended = sum(k.keys(cfg, t)[0] for t in range(1, length + 1)) / length
        scored = sum(k.keys(cfg, t)[1] for t in range(1, length + 1)) / length
        assert k.mean_keys(cfg, length) == pytest.approx((attended, scored))
        assert k.read_bytes(cfg, length, KV_FORMATS["bf16"]) <= k.cache_bytes(cfg, length, KV_FORMATS["bf16"])
        if v4:      # the V4 model's own count of what it caches (ring + entries; compressor state apart)
            from nanoseek.model.v4.params import kv_cache_values
            state = 4 * sum(LAYER_KINDS[x].state_values(cfg, length) for x in layer_kinds(cfg))
            assert kv_bytes(cfg, length, "fp32") - state == 4 * sum(kv_cache_values(cfg, length).values())
    for dtype_bytes, fmt in (() if v4 else ((4, "fp32"), (2, "bf16"))):
        assert kv_bytes(cfg, 9, fmt) == 9 * kv_cache_bytes_per_token(cfg, dtype_bytes)


def test_mean_min_by_brute_force():
    for k in (1, 3, 2048):
        for length in (1, 2, 3, 4, 100, 5000):
            assert mean_min(k, length) == pytest.approx(sum(min(k, t) for t in range(1, length + 1)) / length)


def test_v32_parameters(v32, v3):
    p, q = param_report(v32), param_report(v3)
    assert p.breakdown["indexer"] == p.active_breakdown["indexer"] == 61 * 13_959_424
    assert p.total == q.total + 61 * 13_959_424 == 671_877_944_064
    assert p.active == q.active + 61 * 13_959_424 == 38_403_822_336
    assert p.mtp == q.mtp + 13_959_424 and p.active_breakdown["mtp"] == q.active_breakdown["mtp"] + 13_959_424
    assert sum(p.breakdown[k] for k in p.breakdown if k != "mtp") == p.total
    # training memory holds the indexer's weights and its activations (q 64 x 128, k before and after
    # its norm, 64 head weights, in bf16)
    for i in (0, 3):
        assert activation_bytes_per_token(v32, i) - activation_bytes_per_token(v3, i) == (64 * 128 + 2 * 128 + 64) * 2
    lay = Layout(dp=128, pp=16, ep=64)
    assert (estimate_for_layout(v32, lay, "fp8").params_per_gpu - estimate_for_layout(v3, lay, "fp8").params_per_gpu
            == 4 * 13_959_424)                                            # stage 1: layers 4-7


def test_v32_attention_flops_by_hand(v32, v3):
    """Decode (absorbed MLA): 2h(512 + 64) + 2h 512 = 278,528 FLOPs per attended key per layer; the
    indexer 2 x 64 x (128 + 1) = 16,512 per scored key. V3 attends to every key, V3.2 to 2,048."""
    per_key, per_scored = 2 * 128 * 576 + 2 * 128 * 512, 2 * 64 * 129
    for n in (1, 2048, 4096, 131072, 1048576):
        assert decode_attention_flops(v3, n) == {"core": 61 * n * per_key, "indexer": 0, "compressor": 0}
        assert decode_attention_flops(v32, n) == {"core": 61 * min(n, 2048) * per_key, "indexer": 61 * n * per_scored,
                                                  "compressor": 0}
        assert kv_read_bytes(v3, n) == kv_bytes(v3, n) == 61 * n * 1152
        assert kv_read_bytes(v32, n) == 61 * (n * 256 + min(n, 2048) * 1152)           # bf16
        assert kv_read_bytes(v32, n, "bf16-fp8-index") == 61 * (n * 132 + min(n, 2048) * 1152)
        assert kv_bytes(v32, n) == 61 * n * 1408
    # training (naive MLA, 2h(192 + 128) per key), x3 for the backward; the indexer trains too
    b = training_flops_breakdown(v32, 4096, include_mtp=False)
    assert b["attention"] == pytest.approx(3 * 61 * 81920 * mean_min(2048, 4096))
    assert b["indexer"] == pytest.approx(3 * 61 * per_scored * 4097 / 2)
    assert b["matmul"] == 6 * param_report(v32).active_without_embedding
    v3b = training_flops_breakdown(v3, 4096, include_mtp=False)
    assert v3b["indexer"] == 0 and b["attention"] < v3b["attention"]
    # at or below top-k every key is attended: V3.2's core attention is V3's
    assert training_flops_breakdown(v32, 2048)["attention"] == training_flops_breakdown(v3, 2048)["attention"]
    mtp = training_flops_breakdown(v32, 4096)["mtp"] - training_flops_breakdown(v3, 4096)["mtp"]
    core_saved = 81920 * (4097 / 2 - mean_min(2048, 4096))
    assert mtp == pytest.approx(6 * 13_959_424 + 3 * (per_scored * 4097 / 2 - core_saved))


def test_v32_decode_cost_is_flat_beyond_topk(v32, v3):
    contexts = [4096, 131072, 1048576]
    a = context_costs(v32, get_gpu("h800"), contexts, serve_gpus=64)
    b = context_costs(v3, get_gpu("h800"), contexts, serve_gpus=64)
    assert a[0].core_flops == a[1].core_flops == a[2].core_flops                   # flat: 2,048 keys
    assert b[2].core_flops == 256 * b[0].core_flops                                 # linear
    assert a[2].indexer_flops == 256 * a[0].indexer_flops
    assert a[2].attention_flops < b[2].attention_flops / 10
    assert a[0].keys_attended == {"mla+indexer": 2048} and a[2].keys_scored == {"mla+indexer": 1048576}
    assert b[2].keys_attended == {"mla": 1048576} and b[2].keys_scored == {"mla": 0}
    assert [r.beyond_max_position for r in a] == [False, False, True]               # 163,840 positions
    assert a[0].projection_flops == 2 * 61 * (187_107_328 + 13_959_424)
    assert a[0].model_flops == 2 * param_report(v32).active_without_embedding + a[0].core_flops + a[0].indexer_flops
    # the cache is larger (the indexer key), what a step reads far smaller at long context
    assert a[1].kv_bytes_per_token == 61 * 1408 and b[1].kv_bytes_per_token == 61 * 1152
    assert a[2].kv_read_bytes_per_step < b[2].kv_read_bytes_per_step / 4
    assert a[1].usd_per_million_tokens < b[1].usd_per_million_tokens
    assert b[2].usd_per_million_tokens / b[1].usd_per_million_tokens > 4                # dense: ~linear
    growth = [r[2].usd_per_million_tokens / r[1].usd_per_million_tokens for r in (a, b)]
    assert growth[0] < growth[1]
    with pytest.raises(EstimateError, match="context"):
        context_costs(v32, get_gpu("h800"), [0])


def test_v32_decode_bound_by_hand():
    """A tiny V3.2 model on a made-up GPU: bytes read = weights + every indexer key + the top-k latent
    entries; FLOPs = 2 x activated + core at the BF16 peak + indexer scores at the FP8 peak."""
    c = _tiny_v32(index_topk=6)
    g = gpu_spec_from_dict({"name": "T", "bf16_tflops": 100, "fp8_tflops": 400, "hbm_gb": 1, "hbm_tb_s": 1,
                            "nvlink_gb_s": 1, "network_gb_s": 1})
    ctx, b = 50, 3
    inf = decode_estimate(c, g, context=ctx, batch=b, price=3.6, weight_bytes=2, kv_format="bf16")
    names = [v.name for v in inf.variants]
    assert names[:2] == ["MLA+DSA (absorbed)", "MLA dense (absorbed)"]
    own, dense = inf.variants[0], inf.variants[1]
    L, h, lat, r, hi, di = 3, 4, 32, 8, 4, 16
    assert own.bytes_per_token_per_layer == (lat + r + di) * 2 and dense.bytes_per_token_per_layer == (lat + r) * 2
    read = L * (ctx * di * 2 + 6 * (lat + r) * 2)
    t_mem = (decode_weight_bytes(c, b, 2) + b * read) / 1e12
    core = L * 6 * (2 * h * (lat + r) + 2 * h * lat)
    index = L * ctx * 2 * hi * (di + 1)
    t_cmp = b * (2 * count_params(c).active_without_embedding / 100e12 + core / 100e12 + index / 400e12)
    assert own.step_time_s == pytest.approx(max(t_mem, t_cmp))
    assert own.bound == ("memory" if t_mem >= t_cmp else "compute")
    assert [k.kind for k in inf.kinds] == ["mla+indexer"]
    assert inf.kinds[0].parts == {"latent": lat * 2, "rope_key": r * 2, "indexer_key": di * 2}
    assert inf.kv_format == "bf16" and "nanoseek" in inf.kv_format_about
    with pytest.raises(EstimateError, match="unknown KV-cache format"):
        decode_estimate(c, g, context=10, kv_format="int4")


def test_parse_contexts():
    assert parse_contexts("4K,128K,1M") == [4096, 131072, 1048576]
    assert parse_contexts("1000, 4k,1000") == [1000, 4096]
    assert parse_contexts("0.5K") == [512]
    for bad in ("", "0", "4X", "1.5", "4K,,8K", "-4K"):
        with pytest.raises(EstimateError, match="4K,128K,1M"):
            parse_contexts(bad)


# ---------------------------------------------------------------------- the whole estimate
def test_estimate_to_dict_is_json(v3):
    est = estimate(v3, get_gpu("h800"), tokens=14.8e12, layout=Layout(dp=128, pp=16, ep=64))
    d = json.loads(json.dumps(est.to_dict()))
    assert set(d) == {"model", "config", "gpu", "params", "training", "memory", "inference", "communication",
                      "contexts", "compared"}
    assert d["params"]["total"] == 671_026_419_200 and d["training"]["gpus"] == 2048
    assert d["communication"]["chosen"]["ep"] == 64


# ---------------------------------------------------------------------- CLI
PUBLISHED = ["estimate", "--config", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--gpus", "2048",
             "--gpu-hours-per-trillion", "180K", "--price", "2", "--pp", "16", "--ep", "64"]


def test_cli_table(capsys):
    assert main(PUBLISHED) == 0
    out = capsys.readouterr().out
    for s in ("671,026,419,200", "37,552,297,472", "2,664,000", "$5,328,000", "implied by gpu_hours",
              "MLA (absorbed)", "1,152", "70,272", "H800 SXM5 80GB", "All-to-all", "dp=128 pp=16 ep=64"):
        assert s in out, s


def test_cli_json(capsys):
    assert main(PUBLISHED + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    t = d["training"]
    assert t["gpu_hours"] == pytest.approx(2_664_000) and t["cost_usd"] == pytest.approx(5_328_000)
    assert 0.35 < t["mfu"] < 0.45 and t["peak_bf16_tflops"] == 989.5
    model = next(v for v in d["inference"]["variants"] if v["is_model"])
    assert model["bytes_per_token_per_layer"] == 1152 and model["bytes_per_token"] == 70_272
    assert d["memory"]["layout"] == {"dp": 128, "pp": 16, "ep": 64, "zero": 1, "micro_batch": 1,
                                     "recompute": "none", "schedule": "1f1b", "micro_batches": 64}
    # --gpu-hours gives the same as --gpu-hours-per-trillion
    by_total = ["estimate", "--config", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--gpus", "2048",
                "--gpu-hours", "2.664M", "--json"]
    assert main(by_total) == 0
    assert json.loads(capsys.readouterr().out)["training"]["mfu"] == pytest.approx(t["mfu"])


def test_cli_presets_and_defaults(capsys, tmp_path):
    for name in ("tiny", "bench-moe", "deepseek-v2", "deepseek-v2-lite"):
        assert main(["estimate", "--config", name, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["memory"]["layout"]["dp"] == 8 and d["training"]["mfu"] == 0.4
    assert d["memory"]["layout"]["ep"] == 8                               # V2-Lite: 64 experts
    cfg = load_model_config("tiny")
    cfg.to_json(tmp_path / "config.json")
    assert main(["estimate", "--config", str(tmp_path), "--gpu", "a100", "--gpus", "2"]) == 0
    assert "250,000" in capsys.readouterr().out


def test_cli_config_errors(capsys, tmp_path):
    load_model_config("tiny").to_json(tmp_path / "ok.json")
    bad = json.loads((tmp_path / "ok.json").read_text())
    bad["hiden_size"] = bad.pop("hidden_size")
    (tmp_path / "typo.json").write_text(json.dumps(bad))
    assert main(["estimate", "--config", str(tmp_path / "typo.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'hiden_size'" in err and "typo.json" in err and "Traceback" not in err
    del bad["hiden_size"]
    (tmp_path / "missing.json").write_text(json.dumps(bad))
    assert main(["estimate", "--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "missing field(s) 'hidden_size'" in err and "missing.json" in err
    (tmp_path / "broken.json").write_text("{\"vocab_size\": 10,")
    assert main(["estimate", "--config", str(tmp_path / "broken.json")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert main(["estimate", "--config", "no-such-model"]) == 2
    assert "deepseek-v3" in capsys.readouterr().err                       # lists the presets


def test_cli_unknown_gpu_and_bad_flags(capsys, tmp_path):
    assert main(["estimate", "--gpu", "h900"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'h900'" in err and all(n in err for n in ("a100", "h100", "h800", "h20", "h200", "b200"))
    assert main(["estimate", "--mfu", "0.3", "--gpu-hours", "1M"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["estimate", "--tokens", "12X"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["estimate", "--dp", "4", "--pp", "2", "--gpus", "16"]) == 2
    assert "--gpus is 16" in capsys.readouterr().err
    spec = tmp_path / "x.toml"
    spec.write_text('name = "X9"\nbf16_tflops = 100\nhbm_gb = 200\nhbm_tb_s = 1\nnvlink_gb_s = 100\n'
                    'network_gb_s = 10\n')
    assert main(["estimate", "--config", "tiny", "--gpu-spec", str(spec), "--gpus", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu"]["name"] == "X9" and d["training"]["peak_fp8_tflops"] is None
    assert d["communication"]["chosen"]["gpu"] == "X9"


def test_cli_v32_contexts_and_compare(capsys):
    args = ["estimate", "--config", "deepseek-v3.2", "--compare", "deepseek-v3", "--contexts", "4K,128K,1M"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total"] == 671_877_944_064 and d["params"]["breakdown"]["indexer"] == 61 * 13_959_424
    assert [r["context"] for r in d["contexts"]] == [4096, 131072, 1048576]
    (cmp,) = d["compared"]
    assert cmp["model"] == "deepseek-v3" and [r["context"] for r in cmp["contexts"]] == [4096, 131072, 1048576]
    assert cmp["kv_bytes_ratio"] == [pytest.approx(1408 / 1152)] * 3
    assert cmp["core_and_indexer_flops_ratio"][0] > 0.5 and cmp["core_and_indexer_flops_ratio"][2] < 0.1
    assert cmp["model_flops_ratio"][2] < cmp["model_flops_ratio"][1] < cmp["model_flops_ratio"][0] <= 1.0
    assert d["training"]["flops_breakdown"]["indexer"] > 0
    assert main(args + ["--kv-dtype", "fp8-flashmla"]) == 0
    out = capsys.readouterr().out
    for s in ("lightning indexer (V3.2 / V4)", "851,524,864", "mla+indexer", "indexer key 132", "latent 528",
              "1,048,576 *", "ratio to deepseek-v3", "fp8-flashmla"):
        assert s in out, s
    assert main(["estimate", "--config", "deepseek-v3", "--contexts", "2K"]) == 0
    out = capsys.readouterr().out
    assert "2,048" in out and "against" not in out and "indexer (V3.2)" not in out


def test_cli_contexts_compare_and_kv_dtype_errors(capsys):
    assert set(KV_DTYPES) == set(KV_FORMATS)                  # the CLI's list (no torch import) is the registry's
    assert main(["estimate", "--contexts", "4X"]) == 2
    err = capsys.readouterr().err
    assert "--contexts" in err and "Traceback" not in err
    assert main(["estimate", "--compare", "no-such-model"]) == 2
    assert "deepseek-v3.2" in capsys.readouterr().err                     # lists the presets
    assert main(["estimate", "--kv-dtype", "int4"]) == 2
    assert "fp8-flashmla" in capsys.readouterr().err


def test_docs_example_regenerates(capsys):
    """docs/estimate.md shows the output (or its tail) of each command above it; it must match."""
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "estimate.md").read_text()
    blocks = doc.split("```")[1::2]
    pairs = [(c.strip(), o.strip("\n")) for c, o in zip(blocks, blocks[1:])
             if c.strip().startswith("nanoseek estimate --")]
    assert len(pairs) == 4
    for cmd, shown in pairs:
        assert main(cmd.split()[1:]) == 0
        out = "\n".join(line.rstrip() for line in capsys.readouterr().out.strip("\n").splitlines())
        assert out.endswith(shown) and len(shown) > 500, cmd
