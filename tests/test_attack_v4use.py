"""Adversarial checks of DeepSeek-V4 / V3.2 usability (issue 21, the ``v4use`` merge): what a
demanding user or reviewer hits with configs, checkpoints and commands the main tests
(tests/test_v4_usage.py, tests/test_model_v4*.py) do not try.

Each test failed on the code it was written against (merge f542b2e) and passes once the failure
is fixed; the comment above each says what the user expects.
"""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.model import registry

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

# A CPU-sized V4 written as [model] overrides of a published preset (what a user shrinking
# deepseek-v4-flash to try it writes; every size field the preset sets is overridden).
SMALL_V4 = dict(vocab_size=128, hidden_size=64, num_attention_heads=2, head_dim=32, q_lora_rank=16,
                o_lora_rank=8, o_groups=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=8,
                max_position_embeddings=256)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ [model] overrides of V4 presets
# User expects: deepseek-v4-flash shrunk to 4 layers by [model] overrides builds (its schedule,
# given as DeepSeek's legacy compress_ratios, cut to the layer count as transformers cuts it),
# as `--set model.num_hidden_layers=4` on the deepseek-v3 preset does; not an error about the
# 43-entry layer_types the preset derived and the user never wrote.
@pytest.mark.parametrize("preset", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_published_v4_preset_shrunk_by_model_overrides_builds(preset):
    from nanoseek.train.config import ModelSection

    cfg = ModelSection(preset=preset, fields={**SMALL_V4, "num_hidden_layers": 4}).build_config()
    assert cfg.num_hidden_layers == 4 and len(cfg.layer_types) == 4 and len(cfg.mlp_layer_types) == 4
    model = registry.build_model(cfg)
    assert len(model.model.layers) == 4


# User expects: a V4 config.json that transformers loads (layer_types / mlp_layer_types longer
# than num_hidden_layers: transformers keeps the first num_hidden_layers entries) loads in
# nanoseek as the same model, e.g. the v4-tiny preset with `--set model.num_hidden_layers=2`.
def test_v4_config_with_longer_schedules_loads_like_transformers():
    from transformers import DeepseekV4Config as HFConfig

    d = registry.load_config("v4-tiny").to_dict()
    d["num_hidden_layers"] = 2
    hf = HFConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    ours = registry.config_from_dict(d)
    assert ours.layer_types == hf.layer_types == [SWA, CSA]
    assert ours.mlp_layer_types == hf.mlp_layer_types


# User expects: `--set model.rope_theta=...` (or compress_rope_theta) on a V4 preset changes the
# RoPE base the model uses, as it does on every V3 preset, or is refused in one line; today the
# preset's resolved rope_parameters win and the override is silently ignored (a different model
# than the run's config.toml says).
@pytest.mark.parametrize("field,branch", [("rope_theta", "main"), ("compress_rope_theta", "compress")])
def test_v4_rope_theta_override_is_not_silently_ignored(field, branch):
    base = registry.load_config("v4-tiny")
    try:
        cfg = registry.with_fields(base, {field: 12345.0}, "[model] (v4-tiny)")
    except ConfigError as e:
        assert field in str(e)
        return
    assert getattr(cfg, field) == 12345.0
    assert cfg.rope_parameters[branch]["rope_theta"] == 12345.0, cfg.rope_parameters


# User expects: `--set model.partial_rotary_factor=0.5` on a V4 preset builds a model with a
# 16-dim RoPE; today it is refused with an error about rope_parameters, a field the user never
# wrote (the preset's resolved copy still says 0.25).
def test_v4_partial_rotary_factor_override_builds():
    cfg = registry.with_fields(registry.load_config("v4-tiny"), {"partial_rotary_factor": 0.5}, "[model] (v4-tiny)")
    assert cfg.qk_rope_head_dim == 16
    assert cfg.rope_parameters["main"]["partial_rotary_factor"] == 0.5


# ------------------------------------------------------------------ registry dispatch
# User expects: a config.json whose model_type no family reads ('deepseek_v5', 'llama', none
# at all on a V4 config) is one ConfigError naming model_type and the supported values, unless
# its architectures name a DeepSeek model (a fine-tune's own model_type over DeepSeek-V3's
# architecture, as Kimi K2's kimi_k2): then that family reads it; before the fix a V3-shaped one
# loaded silently as DeepSeek-V3 whatever it said and a V4-shaped one blamed 'swiglu_limit'.
@pytest.mark.parametrize("base,model_type", [("tiny", "deepseek_v5"), ("tiny", "llama"),
                                             ("v4-tiny", "deepseek_v5"), ("v4-tiny", None)])
@pytest.mark.parametrize("architectures", [None, ["LlamaForCausalLM"], "own"])
def test_unknown_or_missing_model_type_is_named(base, model_type, architectures):
    d = registry.load_config(base).to_dict()
    own = d.pop("architectures")
    d.pop("model_type", None)
    if model_type is not None:
        d["model_type"] = model_type
    if architectures is not None:
        d["architectures"] = own if architectures == "own" else architectures
    if architectures == "own":
        cfg = registry.config_from_dict(d, source="config.json")
        assert registry.family_of(cfg) is registry.family_of(registry.load_config(base))
        return
    with pytest.raises(ConfigError, match="model_type"):
        registry.config_from_dict(d, source="config.json")


# ------------------------------------------------------------------ init_from across families
def _save_random(preset: str, path):
    cfg = registry.load_config(preset)
    torch.manual_seed(0)
    return registry.save_pretrained(registry.build_model(cfg).eval(), path)


# User expects: `nanoseek pretrain --config v4-tiny --set model.init_from=<a V3 run>` is refused in
# one line (a V3 checkpoint cannot start a V4 model), and so is the reverse; today the preset is
# silently dropped and the run trains the init_from's family while its config.toml says v4-tiny.
@pytest.mark.parametrize("config,ckpt_preset", [("v4-tiny", "tiny"), ("tiny", "v4-tiny")])
def test_init_from_a_checkpoint_of_another_family_is_refused(config, ckpt_preset, tmp_path, capsys):
    ckpt = _save_random(ckpt_preset, tmp_path / "ckpt")
    # (a preset the recipe writes; without one, as in `sft --model CKPT`, the checkpoint is the model)
    rc = main(["pretrain", "--config", config, "--out-dir", str(tmp_path / "run"), "--set", f"model.init_from={ckpt}",
               "--set", f"model.preset={config}",
               "--set", "train.max_steps=1", "--set", "optim.seq_len=16", "--set", "optim.micro_batch_size=1",
               "--set", "data.val_batches=0", "--no-progress", "--quiet"])
    if rc == 0:
        trained = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"]
        wanted = registry.load_config(config).to_dict().get("model_type", "deepseek_v3")
        pytest.fail(f"--config {config} with init_from a {ckpt_preset} checkpoint trained a {trained} model "
                    f"(the preset asks for {wanted})")
    err = one_line_error(capsys)
    assert "model_type" in err or "deepseek_v" in err, err


# ------------------------------------------------------------------ commands on a V4 run folder
# User expects: `nanoseek estimate --config RUN` takes a run folder as every other command
# (`generate --model RUN`, `eval --model RUN`, `export RUN`) does, resolving RUN/final; today it
# reads RUN/config.json and says "no such file".
def test_estimate_takes_a_v4_run_folder(tmp_path, capsys):
    _save_random("v4-tiny", tmp_path / "run" / "final")
    assert main(["estimate", "--config", str(tmp_path / "run"), "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["model_type"] == "deepseek_v4"


# ------------------------------------------------------------------ resume
def _pretrain(run, *extra) -> int:
    return main(["pretrain", "--out-dir", str(run), "--set", "optim.seq_len=16", "--set", "optim.micro_batch_size=1",
                 "--set", "optim.grad_accum=1", "--set", "data.val_batches=0", "--no-progress", "--quiet", *extra])


# User expects: resuming a run with a model field changed (a typo, or hc_mult=3 on a 2-stream
# V4 run) is refused in one line naming the field, and the run folder stays as it was, so a plain
# `--resume` afterwards continues the run; today the failed attempt has already rewritten
# RUN/config.toml with the new field, every later `--resume` fails the same way (while its message
# says the checkpoint "is intact: resume from it with --resume-from ...", which fails too), and
# the run is stuck until config.toml is edited by hand.
@pytest.mark.parametrize("config,change", [("v4-tiny", "model.hc_mult=3"), ("tiny", "model.kv_lora_rank=16")])
def test_refused_resume_with_a_changed_model_leaves_the_run_resumable(config, change, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(run, "--config", config, "--set", "train.max_steps=2", "--set", "train.save_every=1") == 0
    before = tomllib.loads((run / "config.toml").read_text())
    capsys.readouterr()
    assert _pretrain(run, "--resume-from", str(run / "checkpoints" / "step-000001"), "--set", change) == 2
    err = one_line_error(capsys)
    assert tomllib.loads((run / "config.toml").read_text()) == before, "the refused resume rewrote RUN/config.toml"
    assert _pretrain(run, "--resume-from", str(run / "checkpoints" / "step-000001")) == 0, capsys.readouterr().err
    assert change.split(".")[1].split("=")[0] in err, err


# ------------------------------------------------------------------ speedrun
# User expects (issue 21): `nanoseek speedrun` runs with a V4 model by a documented switch; the
# shipped recipe's [model] table names V3 fields, so `--set model.preset=v4-tiny` is refused
# ("unknown field 'kv_lora_rank'") and no V4 speedrun recipe ships.
def test_speedrun_has_a_v4_switch():
    from nanoseek.errors import UserError
    from nanoseek.speedrun_recipe import load_recipe

    tried = []
    for name, overrides in (("speedrun-v4", ()), ("speedrun", ("model.preset=v4-tiny",))):
        try:
            rc = load_recipe(name, overrides)
        except UserError as e:
            tried.append(f"{name} {list(overrides)}: {str(e)[:120]}")
            continue
        assert registry.family_of(rc.model.build_config()) is registry.V4
        return
    pytest.fail("no V4 speedrun: " + " | ".join(tried))


# ------------------------------------------------------------------ expert widths
# User expects: a V4 (or V3) config whose hidden_size or moe_intermediate_size is not a multiple
# of 4 (hidden 30, experts 10 wide), which the config parser accepts, trains and generates in fp32
# (nanoseek has a per-expert loop for where torch._grouped_mm cannot run), or is refused in one
# line naming the field; today every fp32 forward dies with "RuntimeError: strides should be
# multiple of 16 bytes" from torch._grouped_mm (grouped_mm_supported probes 8-wide matrices only,
# so it says yes for shapes the kernel refuses). (transformers' default grouped_mm experts hit
# the same wall; its eager experts run these shapes.)
@pytest.mark.parametrize("preset", ["v4-tiny", "tiny"])
@pytest.mark.parametrize("sizes", [dict(hidden_size=30), dict(moe_intermediate_size=10)])
def test_expert_widths_that_are_not_16_byte_aligned_run_or_are_refused(preset, sizes, monkeypatch):
    from nanoseek.model import moe

    try:
        cfg = registry.load_config(preset).replace(vocab_size=64, **sizes)
    except ConfigError as e:
        assert next(iter(sizes)) in str(e)
        return
    torch.manual_seed(0)
    model = registry.build_model(cfg)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    try:
        logits = model(ids).logits
        logits.sum().backward()                                   # training runs too
    except RuntimeError as e:
        pytest.fail(f"{preset} with {sizes}: {e}")
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda *a: False)   # the per-expert loop
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), model(ids).logits, rtol=0, atol=1e-5)


# User expects: the V4 speedrun is the speedrun with another [model] and nothing else, so its
# result compares with the V3 one; an `extends` chain that loops is one line.
def test_speedrun_v4_recipe_is_the_speedrun_with_a_v4_model(tmp_path):
    from nanoseek.errors import UserError
    from nanoseek.speedrun_recipe import load_recipe

    v3, v4 = load_recipe("speedrun"), load_recipe("speedrun-v4")
    drop = lambda r: {k: v for k, v in r.resolved().items() if k != "model"}
    assert drop(v3) == drop(v4)
    assert registry.family_of(v4.model.build_config()) is registry.V4
    assert v4.model.build_config().num_hidden_layers == 3
    loop = tmp_path / "a.toml"
    loop.write_text(f'extends = "{loop}"\n')
    with pytest.raises(UserError, match="extends itself"):
        load_recipe(str(loop))
    child = tmp_path / "b.toml"
    child.write_text('extends = "speedrun"\n[budget]\ngrpo = 0.2\n')
    rc = load_recipe(str(child))
    assert rc.budget.grpo == 0.2 and rc.budget.sft == v3.budget.sft and rc.model == v3.model
