"""``nanoseek estimate`` on DeepSeek-V4: its layer kinds (sliding, csa, hca) by hand on small
configs, the model-family dispatch (presets, config.json files, --compare across families), the
hyper-connection and grouped-output FLOPs, and the published V4-Pro-against-V3.2 figures."""

from __future__ import annotations

import json

import pytest

from nanoseek.cli import main
from nanoseek.estimate.attention import (
    LAYER_KINDS, decode_attention_flops, floor_sum, kind_of, kinds_in_use, kv_bytes, kv_read_bytes,
    mean_min_floor, train_attention_flops,
)
from nanoseek.estimate.cli import load_config
from nanoseek.estimate.estimate import param_report
from nanoseek.estimate.family import V4Estimand, count_params, family_for_type, family_of, layer_params
from nanoseek.estimate.flops import EstimateError, training_flops_breakdown
from nanoseek.estimate.gpus import get_gpu
from nanoseek.estimate.inference import context_costs, decode_estimate, projection_flops
from nanoseek.estimate.memory import Layout, activation_bytes_per_token, estimate_for_layout
from nanoseek.errors import UserError
from nanoseek.model.config import PRESET_DIR, ModelConfig
from nanoseek.model.params import KV_FORMATS
from nanoseek.model.v4 import params as v4_params


def _tiny(**kw) -> V4Estimand:
    """v4-tiny: 4 layers (sliding, csa, hca, csa), H 4, head_dim 32 (rope 8), window 16, m 4, m' 16,
    indexer 16 heads x 16, top-k 8, hc_mult 2, d 64."""
    cfg = V4Estimand.from_json(PRESET_DIR / "v4-tiny.json")
    return cfg.replace(**kw) if kw else cfg


def test_v4_kinds_by_hand():
    cfg = _tiny()
    assert cfg.attention_layer_kinds == ["sliding", "csa", "hca", "csa"]
    assert kinds_in_use(cfg) == {"sliding": 1, "csa": 2, "hca": 1}
    per_key = 4 * 4 * 32                                        # q.k + p.v over the shared K=V, 4 heads
    per_scored = 2 * 16 * (16 + 1)
    sliding, csa, hca = LAYER_KINDS["sliding"], LAYER_KINDS["csa"], LAYER_KINDS["hca"]
    n = 100                                                     # 25 CSA entries (> top-k 8), 6 HCA entries
    assert sliding.keys(cfg, n) == (16, 0)
    assert hca.keys(cfg, n) == (16 + 6, 0)
    assert csa.keys(cfg, n) == (16 + 8, 25)
    assert csa.keys(cfg, 7) == (7 + 1, 1) and hca.keys(cfg, 15) == (15, 0) and hca.keys(cfg, 16) == (17, 0)
    assert decode_attention_flops(cfg, n) == {
        "core": (16 + 2 * 24 + 22) * per_key, "indexer": 2 * 25 * per_scored,
        "compressor": 2 * (4 * 32 + 4 * 16) + 2 * 32}
    # bf16: a K=V entry is 32 values (24 non-RoPE + 8 RoPE) = 64 B, an indexer key 16 values = 32 B
    bf16 = KV_FORMATS["bf16"]
    assert sliding.cache_bytes(cfg, n, bf16) == 16 * 64 and sliding.cache_bytes(cfg, 5, bf16) == 5 * 64
    assert sliding.fixed_bytes(cfg, bf16) == 16 * 64 and sliding.cache_parts(cfg, bf16) == {}
    # HCA: ring + 6 entries + the 4 pending tokens' kv and gate rows (fp32)
    assert hca.cache_bytes(cfg, n, bf16) == 16 * 64 + 6 * 64 + 4 * (100 % 16) * 2 * 32
    assert hca.read_bytes(cfg, n, bf16) == 16 * 64 + 6 * 64
    assert hca.cache_parts(cfg, bf16) == {"compressed/16": 64 / 16}
    # CSA: ring + 25 entries and indexer keys + the overlap series of the last window (fp32)
    assert csa.cache_bytes(cfg, n, bf16) == 16 * 64 + 25 * (64 + 32) + 4 * 4 * (2 * 32 + 2 * 16)
    assert csa.cache_bytes(cfg, 102, bf16) == 16 * 64 + 25 * 96 + 4 * (4 * 96 + 2 * (4 * 32 + 4 * 16))
    assert csa.read_bytes(cfg, n, bf16) == 16 * 64 + 25 * 32 + 8 * 64          # every key, top-k entries
    assert csa.cache_parts(cfg, bf16) == {"compressed/4": 16, "indexer key/4": 8}
    # DeepSeek-V3.2's FlashMLA format applied to V4: FP8 non-RoPE dims + an fp32 scale, bf16 RoPE dims
    fp8 = KV_FORMATS["fp8-flashmla"]
    assert sum(csa.entry_bytes(cfg, fp8).values()) == 24 + 4 + 8 * 2
    assert csa.cache_parts(cfg, fp8) == {"compressed/4": 44 / 4, "indexer key/4": (16 + 4) / 4}
    assert kv_bytes(cfg, n, "bf16") == sum(k.cache_bytes(cfg, n, bf16) for k in (sliding, csa, hca, csa))
    assert kv_read_bytes(cfg, n, "bf16") == sum(k.read_bytes(cfg, n, bf16) for k in (sliding, csa, hca, csa))


def test_v4_training_means_by_brute_force():
    cfg = _tiny()
    for m in (1, 3, 4, 128):
        for length in (1, 3, 4, 5, 63, 64, 65, 300):
            assert floor_sum(length, m) == sum(t // m for t in range(1, length + 1))
            for k in (1, 8, 1000):
                assert mean_min_floor(k, m, length) == pytest.approx(
                    sum(min(k, t // m) for t in range(1, length + 1)) / length)
    L = 300
    brute = {"core": 0.0, "indexer": 0.0}
    for kind in cfg.attention_layer_kinds:
        for t in range(1, L + 1):
            a, s = LAYER_KINDS[kind].keys(cfg, t)
            brute["core"] += a * 4 * 4 * 32 / L
            brute["indexer"] += s * 2 * 16 * 17 / L
    got = train_attention_flops(cfg, L)
    assert got["core"] == pytest.approx(brute["core"]) and got["indexer"] == pytest.approx(brute["indexer"])


def test_v4_flops_count_hyper_connections_and_grouped_output():
    cfg = _tiny()
    d, n = 64, 2
    # mHC per layer: 2 modules x (collapse 2nd + comb 2n^2 d + post/add 2nd); the head collapses once
    assert cfg.mixing_flops_per_token(0) == 2 * (2 * n * d + 2 * n * n * d + 2 * n * d)
    assert cfg.mixing_flops_per_token() == 4 * cfg.mixing_flops_per_token(0) + 2 * n * d
    b = training_flops_breakdown(cfg, 64, include_mtp=False)
    assert b["mixing"] == 3 * cfg.mixing_flops_per_token()
    assert b["matmul"] == 6 * count_params(cfg).active_without_embedding
    # the grouped low-rank output projection: o_a (H D -> g x o_lora, block-diagonal) + o_b, 2 x params
    tot, act = layer_params(cfg, 1)
    H, D, g, r = 4, 32, 2, 16
    attn = v4_params.attention_params(cfg, "compressed_sparse_attention")
    assert act["attention"] == attn["attention"] and tot["compressor"] == attn["compressor"]
    o_params = r * H * D + g * r * d
    assert o_params == 2048 + 2048 and o_params < H * D * d                   # cheaper than a full o_proj
    assert projection_flops(cfg) == 2 * sum(sum(v for k, v in layer_params(cfg, i)[1].items()
                                                if k in ("attention", "indexer", "compressor")) for i in range(4))
    (c,) = context_costs(cfg, get_gpu("h800"), [100])
    f = decode_attention_flops(cfg, 100)
    assert c.mixing_flops == cfg.mixing_flops_per_token()
    assert c.attention_flops == c.projection_flops + f["core"] + f["indexer"] + f["compressor"]
    assert c.model_flops == pytest.approx(2 * count_params(cfg).active_without_embedding + sum(f.values())
                                          + c.mixing_flops)


def test_v4_memory_and_decode_sections():
    cfg = _tiny()
    mem = estimate_for_layout(cfg, Layout(dp=2, ep=2), seq_len=64)
    assert mem.params_per_gpu > 0 and mem.activations_bytes > 0
    e, fp32 = cfg.activation_elements(1)
    assert activation_bytes_per_token(cfg, 1) == e * 2 + fp32 * 4
    assert activation_bytes_per_token(cfg, 1) > activation_bytes_per_token(cfg, 0)   # CSA > sliding
    inf = decode_estimate(cfg, get_gpu("h800"), context=100, batch=4)
    (row,) = inf.variants                                   # no MHA / GQA / MQA rows for V4's hybrid
    with pytest.raises(EstimateError, match="GQA groups.*v4-hybrid"):
        decode_estimate(cfg, get_gpu("h800"), context=100, gqa_groups=2)
    assert row.is_model and row.bytes_per_request == kv_bytes(cfg, 100, "bf16")
    kinds = {k.kind: k for k in inf.kinds}
    assert kinds["sliding"].bytes_per_token_per_layer == 0 and kinds["sliding"].fixed_bytes_per_layer == 16 * 64
    assert kinds["csa"].bytes_per_token == 2 * 24 and kinds["hca"].layers == 1


def test_family_dispatch(tmp_path):
    flash, pro = load_config("deepseek-v4-flash"), load_config("deepseek-v4-pro")
    assert isinstance(flash, V4Estimand) and isinstance(pro, V4Estimand)
    assert isinstance(load_config("deepseek-v3.2"), ModelConfig) and family_of(flash) is family_for_type("deepseek_v4")
    assert family_of(load_config("deepseek-v3")) is family_for_type("deepseek_v3") is family_for_type("deepseek_v32")
    assert family_for_type(None) is family_for_type("deepseek_v2") is not family_for_type("deepseek_v4")
    with pytest.raises(TypeError, match="no model family"):
        family_of(object())
    # the V4 model's own counts, for every V4 config (tested there against transformers)
    for cfg in (flash, pro, _tiny()):
        assert count_params(cfg) == v4_params.count_params(cfg)
    assert count_params(pro).total == 1_572_997_179_491 and count_params(flash).total == 284_332_230_231
    # a checkpoint directory with a V4 config.json; a V4 file with a typo names the file and field
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_tiny().to_dict()))
    assert isinstance(load_config(str(d)), V4Estimand)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_tiny().to_dict(), "sliding_windw": 8}))
    with pytest.raises(UserError, match="sliding_windw"):
        load_config(str(bad))
    bad.write_text(json.dumps({**_tiny().to_dict(), "sliding_window": 0}))
    with pytest.raises(UserError, match="bad.json.*sliding_window"):
        load_config(str(bad))


def test_v4_pro_against_v32_published_claims():
    """V4-Pro at 1M tokens: about 27% of V3.2's per-token FLOPs and 10% of its KV cache (the model
    card); the estimate's ratios (whole-model forward FLOPs of one decoded token; KV bytes per token
    with both caches in the same format) must stay where docs/estimate.md says."""
    pro, v32 = load_config("deepseek-v4-pro"), load_config("deepseek-v3.2")
    gpu = get_gpu("h800")
    for fmt, kv in (("bf16", 0.1148), ("fp8-flashmla", 0.1161)):
        a = context_costs(pro, gpu, [1048576], kv_format=fmt, weight_bytes=1)[0]
        b = context_costs(v32, gpu, [1048576], kv_format=fmt, weight_bytes=1)[0]
        assert a.model_flops / b.model_flops == pytest.approx(0.261, abs=0.001)
        assert a.kv_bytes_per_token / b.kv_bytes_per_token == pytest.approx(kv, abs=0.0006)
    # V4-Pro's KV at 1M by hand (bf16): 30 CSA layers (512 + 128 values per 4 tokens), 31 HCA layers
    # (512 per 128 tokens), 61 rings of 128 x 512; compressor state: CSA overlap 4 x (1024 + 256) fp32
    n = 1048576
    kinds = kinds_in_use(pro)
    assert kinds == {"hca": 31, "csa": 30}
    by_hand = 2 * (30 * (n // 4) * 640 + 31 * (n // 128) * 512 + 61 * 128 * 512) + 30 * 4 * 4 * 1280
    assert kv_bytes(pro, n) == by_hand
    assert kind_of(pro, 61).name == "sliding"                   # its MTP block


def test_cli_v4_estimate_and_compare(capsys):
    args = ["estimate", "--config", "deepseek-v4-pro", "--compare", "deepseek-v3.2", "--compare", "deepseek-v3",
            "--contexts", "4K,1M", "--infer-dtype", "fp8"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total"] == 1_572_997_179_491 and d["config"]["model_type"] == "deepseek_v4"
    assert [c["model"] for c in d["compared"]] == ["deepseek-v3.2", "deepseek-v3"]
    assert d["compared"][0]["model_flops_ratio"][1] == pytest.approx(0.261, abs=0.001)
    assert d["training"]["flops_breakdown"]["mixing"] > 0 and d["training"]["flops_breakdown"]["compressor"] > 0
    assert main(args[:3] + ["--kv-dtype", "fp8-flashmla", "--contexts", "4K"]) == 0
    out = capsys.readouterr().out
    for s in ("KV compressors (V4)", "hyper-connections (V4)", "compressed/4", "indexer key/4", "ring of 75,776",
              "v4-hybrid (hca + csa)", "mHC mixing"):
        assert s in out, s
    assert main(["estimate", "--config", "deepseek-v3", "--compare", "deepseek-v4-flash", "--contexts", "128K"]) == 0
    assert "ratio to deepseek-v4-flash" in capsys.readouterr().out
    rep, tiny = param_report(load_config("v4-tiny")), _tiny()
    assert rep.mtp == v4_params.count_params(tiny).mtp
    # one MTP block (sliding, learned MoE) + e/h_proj, 3 norms and its mHC head; 2 of 8 experts active
    d, n, I = 64, 2, 32
    block = sum(v4_params.layer_params(tiny, 4)[0].values())
    assert rep.mtp == 2 * d * d + 3 * d + n * n * d + n + 1 + block
    assert rep.active_breakdown["mtp"] == rep.mtp - 6 * 3 * d * I


@pytest.mark.parametrize("case", ["all_kinds_hc2", "default_schedule_yarn_sigmoid_hc3", "tied_top1_bias_hc1"])
def test_v4_kinds_match_transformers_masks_and_cache(case):
    """The estimate's keys per query and cached values per layer are what transformers'
    DeepseekV4ForCausalLM does: for every query of a sequence longer than the window and with more
    compressed entries than top-k, the non-zero attention probabilities (sinks dropped) of every
    layer equal ``keys(cfg, t + 1)``; after the same prefill its cache holds the ring (window - 1
    keys between steps; the estimate counts the full window), the compressed entries and indexer
    keys, and exactly ``state_values`` of pending compressor rows."""
    import warnings

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from v4_helpers import BASE, CASES, randomise

    overrides, L = CASES[case]
    hf_cfg = transformers.DeepseekV4Config(**{**BASE, **overrides})
    hf_cfg._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    randomise(model, 0)
    probs = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: probs.__setitem__(i, out[1]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = model(torch.randint(0, BASE["vocab_size"], (1, L)), use_cache=True).past_key_values
    cfg = V4Estimand.from_dict({**BASE, **overrides})
    assert L > cfg.sliding_window
    for i, p in probs.items():
        kind = kind_of(cfg, i)
        attended = (p[0] > 0).sum(-1)                                   # [heads, queries]
        expected = torch.tensor([kind.keys(cfg, t + 1)[0] for t in range(L)])
        assert (attended == expected).all(), (case, i, kind.name)
        held = cache.layers[i]
        entries = sum(t.numel() for t in getattr(held, "compressed_kv", {}).values() if t is not None)
        state = sum(t.numel() for d in ("buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate")
                    for t in getattr(held, d, {}).values() if t is not None)
        assert state == kind.state_values(cfg, L), (case, i)
        assert held.keys.numel() == (cfg.sliding_window - 1) * cfg.head_dim
        assert kind.cache_bytes(cfg, L, KV_FORMATS["fp32"]) == 4 * (entries + state + cfg.sliding_window * cfg.head_dim)


def test_docs_generations_table_regenerates():
    """docs/estimate.md holds exactly what `python -m nanoseek.estimate.generations` prints, and its
    claims rows set each published figure beside the estimate."""
    from pathlib import Path

    from nanoseek.estimate.generations import CLAIMS, generations_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "estimate.md").read_text()
    table = generations_markdown()
    assert table in doc and "python -m nanoseek.estimate.generations" in doc
    assert len(table.splitlines()) == 2 + 3 * 4 + 1 + 2 + len(CLAIMS)
    for claim in CLAIMS:
        assert f"| {claim.text} ({claim.source}) | {claim.claimed:.0%} |" in table
    assert "| 1M | deepseek-v4-pro |" in table and "26.1% | 0.97 |" in table
