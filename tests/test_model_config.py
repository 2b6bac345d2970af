"""ModelConfig: HF config.json fields, presets, round trips, and clear errors on bad input."""

from __future__ import annotations

import json
import math

import pytest

from nanoseek.errors import ConfigError
from nanoseek.model import ModelConfig, load_model_config
from nanoseek.model.config import PRESET_DIR, list_presets
from nanoseek.model.v4.config import load_v4_config


def write_config(tmp_path, d, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d, indent=2))
    return path


def test_published_config_fields():
    c = load_model_config("deepseek-v3")
    assert (c.hidden_size, c.vocab_size, c.num_hidden_layers, c.num_attention_heads) == (7168, 129280, 61, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert c.qk_head_dim == 192
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 1, 8, 8, 4)
    assert (c.first_k_dense_replace, c.num_moe_layers, c.num_nextn_predict_layers) == (3, 58, 1)
    assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc" and c.routed_scaling_factor == 2.5
    assert c.rope_scaling["factor"] == 40 and c.rope_scaling["original_max_position_embeddings"] == 4096
    assert isinstance(c.rope_theta, float)  # int 10000 in the JSON, coerced to the field's float type
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_defaults_are_the_published_model():
    published = load_model_config("deepseek-v3")
    default = ModelConfig()
    for name in ("hidden_size", "vocab_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank",
                 "q_lora_rank", "moe_intermediate_size", "intermediate_size", "routed_scaling_factor"):
        assert getattr(default, name) == getattr(published, name), name


def test_every_preset_loads_and_builds():
    names = list_presets()
    assert {"deepseek-v3", "tiny"} <= set(names)
    for name in names:
        if json.loads((PRESET_DIR / f"{name}.json").read_text()).get("model_type") == "deepseek_v4":
            load_v4_config(name).validate()     # V4 presets have their own config class
            continue
        load_model_config(name).validate()


def test_json_round_trip(tmp_path):
    c = load_model_config("deepseek-v3")
    c.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "attention_type" not in d  # the nanoseek extension is only written when not the default
    assert ModelConfig.from_json(tmp_path) == c  # a directory means its config.json
    mha = c.replace(attention_type="mha", num_key_value_heads=8)
    mha.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == mha


def test_hf_derived_and_v5_rope_keys_accepted():
    base = ModelConfig().to_dict()
    base.pop("rope_scaling")
    base.pop("rope_theta")  # transformers >= 5 writes both inside rope_parameters only
    base.update(qk_head_dim=192, head_dim=64, torch_dtype="bfloat16", use_cache=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                                 "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1})
    c = ModelConfig.from_dict(base)
    assert c.rope_theta == 50000.0
    assert c.rope_scaling["factor"] == 8.0 and c.rope_scaling["rope_type"] == "yarn"


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    path = write_config(tmp_path, {**ModelConfig().to_dict(), "hiden_size": 64})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(path)
    msg = str(e.value)
    assert "hiden_size" in msg and str(path) in msg
    assert "hidden_size" in msg and "kv_lora_rank" in msg and "num_nextn_predict_layers" in msg


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "64", "must be int"),
    ("hidden_size", 64.5, "must be int"),
    ("num_hidden_layers", True, "must be int"),
    ("norm_topk_prob", 1, "must be bool"),
    ("scoring_func", 3, "must be str"),
    ("rope_scaling", [1, 2], "must be dict"),
    ("vocab_size", None, "must not be null"),
])
def test_wrong_type_rejected(tmp_path, key, value, expected):
    path = write_config(tmp_path, {**ModelConfig().to_dict(), key: value})
    with pytest.raises(ConfigError, match=expected) as e:
        ModelConfig.from_json(path)
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize("changes, field", [
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"n_routed_experts": 8, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, "n_group"),  # 1 per group
    ({"num_experts_per_tok": 80, "topk_group": 2}, "num_experts_per_tok"),  # 2 groups hold only 64
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, "factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "betta": 1}}, "betta"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"qk_head_dim": 191}, "qk_head_dim"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"attention_type": "gqa"}, "attention_type"),
    ({"attention_type": "mha", "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_inconsistent_config_rejected(tmp_path, changes, field):
    path = write_config(tmp_path, {**ModelConfig().to_dict(), **changes})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(path)
    msg = str(e.value)
    assert field in msg and str(path) in msg, msg


def test_malformed_json_reports_line(tmp_path):
    text = '{\n  "hidden_size": 64,\n  "vocab_size": 128\n  "num_hidden_layers": 2\n}\n'  # missing comma
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"line 4") as e:
        ModelConfig.from_json(path)
    assert str(path) in str(e.value)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="presets:.*deepseek-v3"):
        load_model_config("deepseek-v9")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_json(write_config(tmp_path, [1, 2]))


def test_replace_validates():
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig().replace(topk_group=16)


def test_softmax_scale_published():
    c = load_model_config("deepseek-v3")
    mscale = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert mscale == pytest.approx(1.3689, abs=1e-4)
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)
    assert c.softmax_scale == pytest.approx(0.13523, abs=1e-5)
    assert c.replace(rope_scaling=None).softmax_scale == pytest.approx(192 ** -0.5, rel=1e-12)


def test_dense_config_has_no_moe_layers():
    c = ModelConfig(n_routed_experts=0, num_hidden_layers=4).validate()
    assert c.num_moe_layers == 0
    c = ModelConfig(first_k_dense_replace=61).validate()
    assert c.num_moe_layers == 0


def test_more_leading_dense_layers_than_layers_means_all_dense(tmp_path):
    """transformers and DeepSeek's code accept first_k_dense_replace > num_hidden_layers (every
    layer dense); it loads as num_hidden_layers, the same model."""
    c = ModelConfig.from_dict({**ModelConfig(num_hidden_layers=2).to_dict(), "first_k_dense_replace": 3})
    assert c.first_k_dense_replace == 2 and c.num_moe_layers == 0
