"""DeepSeek-V4 sizes: the analytic count equals the instantiated module (small configs) and, for
the published V4-Flash and V4-Pro configs (shipped presets), transformers' own model built on the
meta device; the published totals (284B / 13B, 1.6T / 49B) are pinned. The V4 presets load."""

from __future__ import annotations

import warnings

import pytest
import torch

from nanoseek.model.v4.config import DeepseekV4Config, load_v4_config
from nanoseek.model.v4.params import count_params, layer_params
from nanoseek.model.v4.transformer import DeepseekV4ForCausalLM
from v4_helpers import BASE, CASES

# total, activated per token (input embedding included), MTP: transformers' meta-device model agrees
PUBLISHED = {
    "deepseek-v4-flash": (284_332_230_231, 13_799_622_231, 6_610_048_635),
    "deepseek-v4-pro": (1_572_997_179_491, 49_779_058_787, 25_840_145_595),
}
CLAIMED = {"deepseek-v4-flash": (284e9, 13e9), "deepseek-v4-pro": (1.6e12, 49e9)}


@pytest.mark.parametrize("case", CASES)
def test_count_equals_module(case):
    cfg = DeepseekV4Config.from_dict({**BASE, **CASES[case][0], "num_nextn_predict_layers": 1})
    model = DeepseekV4ForCausalLM(cfg, init_weights=False)
    pc = count_params(cfg)
    assert pc.total == model.num_parameters()
    assert pc.mtp == sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.mtp."))
    for i, layer in enumerate(model.model.layers):
        assert sum(layer_params(cfg, i)[0].values()) == sum(p.numel() for p in layer.parameters()), i


def _transformers_meta(cfg: DeepseekV4Config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV4Config(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return transformers.DeepseekV4ForCausalLM(hf_cfg)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_counts_equal_transformers_meta_model(name):
    cfg = load_v4_config(name)
    hf = _transformers_meta(cfg)
    total = sum(p.numel() for p in hf.parameters())
    idle_experts = 0
    for layer in hf.model.layers:
        ex = layer.mlp.experts
        per_expert = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // ex.gate_up_proj.shape[0]
        idle_experts += (ex.gate_up_proj.shape[0] - cfg.num_experts_per_tok) * per_expert
    active = total - idle_experts
    pc = count_params(cfg)
    assert (pc.total, pc.active) == (total, active)
    with torch.device("meta"):
        ours = DeepseekV4ForCausalLM(cfg, init_weights=False)
    assert ours.num_parameters() == total
    assert pc.mtp == sum(p.numel() for n, p in ours.named_parameters() if n.startswith("model.mtp."))
    assert (pc.total, pc.active, pc.mtp) == PUBLISHED[name]
    claimed_total, claimed_active = CLAIMED[name]
    # the claims' "activated" matches the count without the input embedding (13.27B, 48.85B)
    assert abs(pc.total / claimed_total - 1) < 0.02 and abs(pc.active_without_embedding / claimed_active - 1) < 0.03


def test_presets_load():
    flash, pro, tiny = (load_v4_config(n) for n in ("deepseek-v4-flash", "deepseek-v4-pro", "v4-tiny"))
    assert flash.layer_types[:3] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention"]
    assert pro.layer_types[:3] == ["heavily_compressed_attention"] * 2 + ["compressed_sparse_attention"]
    assert flash.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"] and len(pro.layer_types) == 61
    assert flash.rope_parameters["compress"]["rope_type"] == "yarn" and flash.qk_rope_head_dim == 64
    DeepseekV4ForCausalLM(tiny)
