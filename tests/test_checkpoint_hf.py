"""HF-format checkpoints: logits parity with transformers' DeepseekV3ForCausalLM both ways,
nanoseek round trips (MTP, tied, bf16, sharded), DeepSeek's FP8 block-quantised format, and
refusals: pickle-only directories, missing or misshapen tensors, interrupted saves."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek.model import DeepseekV3ForCausalLM, ModelConfig
from nanoseek.model import checkpoint as ckpt
from nanoseek.model.checkpoint import CheckpointError, from_pretrained, save_pretrained

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def randomise_biases(model, std=0.05):
    with torch.no_grad():
        for moe in model.moe_layers() + [x.mlp for x in model.model.mtp if hasattr(x.mlp, "gate")]:
            moe.gate.e_score_correction_bias.normal_(std=std)


def ids_batch(seed=0, B=2, T=20, V=128):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ transformers parity
HF_CASES = {
    "yarn_biases": dict(rope_scaling=YARN, max_position_embeddings=64, attention_bias=True),
    "no_q_lora_top1": dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=1,
                           num_hidden_layers=2),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_nanoseek_checkpoint_loads_in_transformers(tiny_model, tmp_path, case):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**HF_CASES[case]).eval()
    randomise_biases(model)
    if model.config.attention_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
    save_pretrained(model, tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    hf_bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(hf_bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    ids = ids_batch()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_transformers_checkpoint_loads_in_nanoseek(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1,
        rope_theta=5000.0, rope_scaling=dict(YARN), tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
            layer.mlp.gate.weight.normal_(std=0.3)
    hf.save_pretrained(tmp_path / "hf")
    on_disk = set().union(*(load_file(f).keys() for f in (tmp_path / "hf").glob("*.safetensors")))
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in on_disk   # fused in memory, per expert on disk
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = from_pretrained(tmp_path / "hf")
    assert model.config.num_nextn_predict_layers == 0 and len(model.model.mtp) == 0
    assert model.config.rope_theta == 5000.0 and model.config.rope_scaling["factor"] == 4.0
    ids = ids_batch(1)
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ nanoseek round trips
def test_round_trip_keeps_everything(tiny_model, tmp_path):
    model = tiny_model(num_nextn_predict_layers=2)
    randomise_biases(model)
    save_pretrained(model, tmp_path / "ck", extra_files={"README.md": "hello\n"})
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    L = model.config.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names                 # per-expert on disk
    assert "model.layers.1.mlp.experts.gate_up_proj" not in names
    assert {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L + 1}.enorm.weight",
            f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L + 1}.shared_head.head.weight",
            f"model.layers.{L}.shared_head.norm.weight"} <= names                   # MTP as DeepSeek ships it
    assert not any(n.startswith("model.mtp") for n in names)
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.config == model.config
    assert_same_state(loaded, model)
    ids = ids_batch()
    torch.testing.assert_close(loaded(ids, labels=ids).mtp_loss, model(ids, labels=ids).mtp_loss)


def test_tied_embeddings_round_trip(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    save_pretrained(model, tmp_path / "ck")
    names = load_file(tmp_path / "ck" / "model.safetensors").keys()
    assert "lm_head.weight" not in names
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(loaded, model)


def test_bf16_checkpoint_loads_in_bf16(tiny_model, tmp_path):
    model = tiny_model()
    randomise_biases(model)
    model.to(torch.bfloat16)
    save_pretrained(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32               # router kept fp32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.weight.dtype == torch.float32
    assert_same_state(loaded, model)
    as_fp32 = from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert as_fp32.model.embed_tokens.weight.dtype == torch.float32


def test_sharded_save_and_load(tiny_model, tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ck", max_shard_bytes=20_000)
    d = tmp_path / "ck"
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    on_disk = {}
    for s in shards:
        on_disk.update(load_file(s))
    assert set(on_disk) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert_same_state(from_pretrained(d), model)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shards[1].name}, which is missing"):
        from_pretrained(d)


# ------------------------------------------------------------------ FP8 (DeepSeek's release format)
def quantize_fp8_blocks(w: torch.Tensor, block=128):
    """Per 128x128 block: scale = amax / 448; q = w / scale in e4m3; scale_inv = scale."""
    out_f, in_f = w.shape
    nb0, nb1 = -(-out_f // block), -(-in_f // block)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nb0, nb1, dtype=torch.float32)
    for i in range(nb0):
        for j in range(nb1):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = tile.abs().max().clamp_min(1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
    return q, scale_inv


def dequantize_reference(q, scale_inv, block=128):
    w = q.float().clone()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            w[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale_inv[i, j]
    return w


def test_fp8_block_quantised_checkpoint(tiny_model, tmp_path):
    model = tiny_model(hidden_size=64, intermediate_size=200, vocab_size=256, q_lora_rank=48).eval()
    save_pretrained(model, tmp_path / "ck")
    d = tmp_path / "ck"
    tensors = load_file(d / "model.safetensors")
    reference = {}
    quantised = 0
    for name in list(tensors):
        t = tensors[name]
        if (name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2
                and not name.endswith("mlp.gate.weight") and not name.endswith("embed_tokens.weight")
                and not name.endswith("shared_head.head.weight")):
            q, s = quantize_fp8_blocks(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            reference[name] = dequantize_reference(q, s)
            quantised += 1
    assert quantised > 20
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)   # 200 x 64: partial blocks
    save_file(tensors, d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))

    loaded = from_pretrained(d)
    assert loaded.config.quantization_config is None       # dequantised: no longer an FP8 model
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    hf_state = ckpt.to_hf_state_dict(loaded)
    for name, ref in reference.items():
        assert torch.equal(hf_state[name], ref), name        # exactly fp8 * scale_inv, per block
    original = ckpt.to_hf_state_dict(model)
    rel = max(((hf_state[n] - original[n]).norm() / original[n].norm()).item() for n in reference)
    assert 0 < rel < 0.05                                    # e4m3 rounding, not garbage
    for name in set(original) - set(reference):              # embedding, head, norms, router untouched
        assert torch.equal(hf_state[name], original[name]), name
    expected = DeepseekV3ForCausalLM(model.config, init_weights=False)
    expected.load_state_dict(ckpt.from_hf_state_dict({**original, **reference}, model.config))
    ids = ids_batch(V=256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, expected.eval()(ids).logits, rtol=0, atol=0)
    as_bf16 = from_pretrained(d, dtype=torch.bfloat16)
    assert as_bf16.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(as_bf16.model.layers[0].mlp.gate_proj.weight.float(),
                               reference["model.layers.0.mlp.gate_proj.weight"], rtol=1e-2, atol=1e-3)

    # a scale of the wrong shape, or an FP8 tensor without a scale, is refused by name
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*expected \(2, 1\)"):
        from_pretrained(d)
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"without a weight_scale_inv.*up_proj"):
        from_pretrained(d)


# ------------------------------------------------------------------ refusals and safety
class _Trap:
    """Unpickling this creates a marker file: proof that a loader unpickled the weights."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_only_checkpoint_refused(tiny_config, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    tiny_config().to_json(d / "config.json")
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(CheckpointError, match="only pickle weights.*safetensors only"):
        from_pretrained(d)
    assert not marker.exists()
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(d)
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_tensors(tiny_model, tmp_path):
    model = tiny_model()
    d = tmp_path / "ck"
    save_pretrained(model, d)
    tensors = load_file(d / "model.safetensors")
    t = tensors.pop("model.layers.2.self_attn.o_proj.weight")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.2\.self_attn\.o_proj\.weight'\]"):
        from_pretrained(d)
    tensors["model.layers.2.self_attn.o_proj.weight"] = t
    tensors["model.layers.2.self_attn.surprise.weight"] = t.clone()
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model\.layers\.2\.self_attn\.surprise\.weight'\]"):
        from_pretrained(d)
    del tensors["model.layers.2.self_attn.surprise.weight"]
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts \[3\] are missing"):
        from_pretrained(d)
    save_pretrained(model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), "
                                              r"config implies \((96, 32|32, 96)\)"):
        from_pretrained(d)
    cfg["bogus_field"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown field 'bogus_field'"):
        from_pretrained(d)


def test_checkpoint_without_mtp_weights_disables_mtp(tiny_model, tmp_path):
    model = tiny_model()
    d = tmp_path / "ck"
    save_pretrained(model, d)
    L = model.config.num_hidden_layers
    tensors = {k: v for k, v in load_file(d / "model.safetensors").items() if not k.startswith(f"model.layers.{L}.")}
    save_file(tensors, d / "model.safetensors")
    with pytest.warns(UserWarning, match="MTP is disabled"):
        loaded = from_pretrained(d)
    assert loaded.config.num_nextn_predict_layers == 0
    ids = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


# an interrupted sharded save keeps the previous checkpoint: tests/test_hf_files.py, for every family


def test_dequantize_fp8_block_partial_tiles():
    w = torch.randn(130, 260)
    q, s = quantize_fp8_blocks(w)
    assert s.shape == (2, 3)
    out = ckpt.dequantize_fp8_block(q, s, dtype=torch.float32)
    assert torch.equal(out, dequantize_reference(q, s))
    with pytest.raises(CheckpointError, match=r"expected \(2, 3\)"):
        ckpt.dequantize_fp8_block(q, s[:, :2])


def test_config_json_written_for_hf(tiny_model, tmp_path):
    model = tiny_model(attention_type="mha", num_key_value_heads=1, n_routed_experts=0)
    with pytest.warns(RuntimeWarning, match="no way to express attention_type 'mha'"):
        save_pretrained(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["attention_type"] == "mha"
    # dense: written with every layer before first_k_dense_replace (transformers builds MoE layers after it)
    assert cfg["first_k_dense_replace"] == model.config.num_hidden_layers != model.config.first_k_dense_replace
    assert ModelConfig.from_json(tmp_path / "ck") == model.config.replace(
        first_k_dense_replace=model.config.num_hidden_layers)
    assert_same_state(from_pretrained(tmp_path / "ck"), model)


# ------------------------------------------------------------------ DeepSeek-V2 routing, dense and shared-expert-free models
V2_SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                first_k_dense_replace=1)


def _randomise(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model.eval()


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_checkpoints_both_ways(tmp_path, topk_method):
    """transformers' DeepseekV2Config writes no scoring_func (V2 always routes by softmax): read as
    V3's sigmoid, its checkpoints loaded with logits ~2.5 off; and nanoseek wrote V2-routed models as
    deepseek_v3, which transformers routes by sigmoid with a bias (~2.5-5.8 off, silently)."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from nanoseek.model import registry

    hf = _randomise(transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        topk_method=topk_method, routed_scaling_factor=2.0, **V2_SIZES)))
    hf.save_pretrained(tmp_path / "hf")
    assert "scoring_func" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = registry.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.scoring_func == "softmax" and ours.config.num_nextn_predict_layers == 0
    ids = ids_batch(V=97)
    with torch.no_grad():
        expected = hf(ids).logits
        assert expected.abs().max() > 0.5
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)            # transformers can express it: no warning
        save_pretrained(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "deepseek_v2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=1e-4)
    assert ModelConfig.from_json(tmp_path / "ours") == ours.config


def test_dense_model_and_models_without_shared_experts_load_in_transformers_and_back(tmp_path):
    """A dense student (n_routed_experts 0 with first_k_dense_replace < layers: the distillation
    recipe's) crashed transformers, which builds MoE layers from first_k_dense_replace on; a
    transformers checkpoint with n_shared_experts 0 holds empty shared-expert matrices nanoseek refused."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    ids = ids_batch(V=97)
    cfg = ModelConfig(**{**V2_SIZES, "n_routed_experts": 0, "num_nextn_predict_layers": 0}).validate()
    dense = _randomise(DeepseekV3ForCausalLM(cfg))
    save_pretrained(dense, tmp_path / "dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)

    hf = _randomise(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(n_shared_experts=0, **V2_SIZES)))
    hf.save_pretrained(tmp_path / "noshared")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                            # (no MTP weights: said, and expected)
        ours = from_pretrained(tmp_path / "noshared").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fields,what", [
    (dict(scoring_func="sigmoid", topk_method="greedy"), "topk_method 'greedy'"),
    (dict(scoring_func="softmax", topk_method="noaux_tc"), "scoring_func 'softmax'"),
    (dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True), "norm_topk_prob"),
    (dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, rope_interleave=False), "rope_interleave"),
    (dict(moe_layer_freq=2), "moe_layer_freq 2"),
])
def test_saving_what_transformers_cannot_express_warns(tmp_path, fields, what):
    cfg = ModelConfig(**{**V2_SIZES, "num_nextn_predict_layers": 0, **fields}).validate()
    with pytest.warns(RuntimeWarning, match=what):
        save_pretrained(DeepseekV3ForCausalLM(cfg), tmp_path / "ck")
    assert ModelConfig.from_json(tmp_path / "ck") == cfg         # written as it is, read back the same


def test_misshapen_experts_and_fp8_vectors_are_one_line_naming_the_tensor(tiny_model, tmp_path):
    model = tiny_model()
    d = tmp_path / "ck"
    save_pretrained(model, d)
    tensors = load_file(d / "model.safetensors")
    good = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
    tensors["model.layers.1.mlp.experts.0.gate_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape \(3, 3\)"):
        from_pretrained(d)
    tensors["model.layers.1.mlp.experts.0.gate_proj.weight"] = good
    n = model.config.n_routed_experts
    for part in ("gate_proj", "up_proj", "down_proj"):
        tensors[f"model.layers.1.mlp.experts.{n}.{part}.weight"] = tensors[f"model.layers.1.mlp.experts.0.{part}.weight"].clone()
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"experts \[{n}\] beyond the config's n_routed_experts"):
        from_pretrained(d)
    with pytest.raises(CheckpointError, match=r"must be a matrix, got shape \(16,\)"):
        ckpt.dequantize_fp8_block(torch.zeros(16), torch.ones(1, 1))


def test_a_model_too_big_for_free_memory_is_one_line_before_it_is_allocated(tiny_model, tmp_path, monkeypatch):
    """A config.json that asks for more weights than memory holds (hidden_size 10**7: ~50 GB) got the
    process killed by the kernel with no word: generate, chat, serve and eval (load_for_inference),
    post-training's init_from and distillation's teacher check the size before reading the weights,
    both families; pre-training and post-training check a fresh model's before allocating it."""
    from nanoseek import limits
    from nanoseek.infer.loading import load_for_inference
    from nanoseek.model import registry

    save_pretrained(tiny_model(), tmp_path / "v3")
    registry.save_pretrained(registry.build_model(registry.load_config("v4-tiny")), tmp_path / "v4")
    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": 1000)
    for d in ("v3", "v4"):
        with pytest.raises(limits.LimitError, match=rf"{d}/config\.json: a model of [\d,]+ parameters needs .* only "):
            load_for_inference(tmp_path / d, require_tokenizer=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    limits.check_checkpoint_fits(tmp_path / "bad")               # left to the loader, which words it
    monkeypatch.undo()
    assert load_for_inference(tmp_path / "v3", require_tokenizer=False)[0] is not None


def test_a_fresh_model_too_big_for_free_memory_is_one_line_naming_the_model_table(tmp_path, monkeypatch):
    from nanoseek import limits
    from nanoseek.post.stage import load_model
    from nanoseek.train.pretrain import build_pretraining
    from train_helpers import dsa_config

    cfg = dsa_config(tmp_path, {"preset": "tiny"}, 16, train={"dsa_warmup_steps": 0})
    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": 1000)
    with pytest.raises(limits.LimitError, match=r"^\[model\]: a model of [\d,]+ parameters needs"):
        build_pretraining(cfg)
    with pytest.raises(limits.LimitError, match=r"^\[model\]: a model of"):
        load_model(cfg.model, "cpu")
