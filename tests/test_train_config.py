"""Training configs: TOML -> typed sections, errors naming the key, --set overrides, round trip."""

from __future__ import annotations

import pytest

from nanoseek.errors import ConfigError
from nanoseek.train.config import (TRAIN_CONFIG_DIR, apply_overrides, config_from_dict, config_to_toml, load_config,
                                   parse_literal, read_toml, SECTIONS)

BASE = {"model": {"preset": "tiny"}, "data": {"source": "synthetic"}, "train": {"max_steps": 10}}


def write(tmp_path, text: str):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_load_defaults_sections_and_inline_model_fields(tmp_path):
    p = write(tmp_path, """
[model]
preset = "tiny"
hidden_size = 32
num_attention_heads = 2

[optim]
lr = 1            # an int where a float is expected is fine
betas = [0.9, 0.99]

[train]
max_steps = 5
dtype = "bfloat16"
""")
    cfg = load_config(p)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0     # V3 defaults
    assert cfg.train.mtp_lambda == 0.3 and cfg.train.bias_update_gamma == 0.001 and cfg.train.seq_aux_alpha == 1e-4
    mc = cfg.model.build_config()
    assert mc.hidden_size == 32 and mc.num_attention_heads == 2 and mc.vocab_size == 512   # rest from the preset
    assert cfg.train.out_dir == "runs/r"                                                    # from the file name


@pytest.mark.parametrize("text, needles", [
    ("[optim]\nlearning_rate = 1e-3\n", ["unknown key 'learning_rate'", "[optim]", "lr", "min_lr", "grad_accum"]),
    ("[trian]\nmax_steps = 3\n", ["unknown table [trian]", "[train]"]),
    ("[optim]\nlr = \"fast\"\n", ["[optim] lr must be float", "str 'fast'"]),
    ("[train]\nmax_steps = 2.5\n", ["[train] max_steps must be int"]),
    ("[spike]\nenabled = 1\n", ["[spike] enabled must be bool"]),
    ("[optim]\nbetas = [0.9, \"x\"]\n", ["betas[1]", "must be float"]),
    ("[model]\nhiden_size = 3\n", ["unknown key 'hiden_size'", "[model]", "preset", "hidden_size"]),
])
def test_errors_name_the_key_its_table_and_the_valid_keys(tmp_path, text, needles):
    p = write(tmp_path, text + "\n[train]\nmax_steps = 1\n" if "[train]" not in text else text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("raw, needle", [
    ({"train": {}}, "needs max_steps, max_tokens or max_minutes"),
    ({"optim": {"min_lr": 1.0}}, "min_lr"),
    ({"optim": {"schedule": "linear"}}, "'wsd', 'cosine' or 'constant'"),
    ({"optim": {"schedule": "constant", "min_lr": 1e-5}}, "min_lr would have no effect with schedule = 'constant'"),
    ({"optim": {"schedule": "constant", "decay_fraction": 0.3, "min_lr": 3e-4, "lr": 3e-4}},
     "decay_fraction would have no effect"),
    ({"train": {"max_steps": 3, "dtype": "fp16"}}, "dtype"),
    ({"spike": {"ratio": 0.5}}, "ratio"),
    ({"optim": {"seq_len": 5000}}, "max_position_embeddings"),
    ({"optim": {"decay_steps": 3}, "train": {"max_steps": None, "max_minutes": 1.0}}, "decay_steps"),
    ({"model": {"preset": "tiny", "n_group": 3}}, "n_group"),
    ({"model": {"preset": "no-such-preset"}}, "presets:"),
    ({"parallel": {"schedule": "zbv"}}, "[parallel] schedule = 'zbv' would have no effect with pp = 1"),
    ({"parallel": {"pp": 1, "schedule": "1f1b"}}, "[parallel] schedule = '1f1b' would have no effect with pp = 1"),
])
def test_inconsistent_values_are_errors(raw, needle):
    merged = {k: dict(v) for k, v in BASE.items()}
    for k, v in raw.items():
        merged.setdefault(k, {}).update(v)
    if raw.get("train") == {}:
        merged["train"] = {}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_dict(merged, "x.toml")


def test_a_constant_schedule_without_decay_keys_is_accepted():
    for optim in ({"schedule": "constant", "lr": 1e-3}, {"schedule": "constant", "lr": 1e-3, "min_lr": 1e-3}):
        assert config_from_dict({**BASE, "optim": optim}, "x.toml").optim.schedule == "constant"


def test_set_overrides_are_typed_and_validated_like_the_file(tmp_path):
    p = write(tmp_path, "[model]\npreset = \"tiny\"\n[train]\nmax_steps = 3\n")
    cfg = load_config(p, ["optim.lr=1e-3", "train.dtype=bfloat16", "data.dir=/tmp/some dir", "spike.enabled=false",
                          "optim.betas=[0.8, 0.9]", "model.num_hidden_layers=2", "train.max_tokens=null",
                          "model.rope_scaling.factor=2.0", "model.rope_scaling.type=yarn",
                          "model.rope_scaling.original_max_position_embeddings=512"])
    assert cfg.optim.lr == 1e-3 and cfg.train.dtype == "bfloat16" and cfg.data.dir == "/tmp/some dir"
    assert cfg.spike.enabled is False and cfg.optim.betas == [0.8, 0.9] and cfg.train.max_tokens is None
    mc = cfg.model.build_config()
    assert mc.num_hidden_layers == 2 and mc.rope_scaling["factor"] == 2.0
    with pytest.raises(ConfigError, match="unknown key 'lrr' in \\[optim\\]"):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="must be float"):
        load_config(p, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown table 'optimizer'"):
        load_config(p, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["lr=1"])


def test_parse_literal():
    assert parse_literal("3") == 3 and parse_literal("3.0") == 3.0 and parse_literal("true") is True
    assert parse_literal("[1, 2]") == [1, 2] and parse_literal('"a b"') == "a b" and parse_literal("word") == "word"
    assert parse_literal("null") is None and parse_literal("None") is None


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\npreset = \"tiny\"\nhidden_size = 32\nnum_attention_heads = 2\n"
                                      "[data]\nsource = \"synthetic\"\n[train]\nmax_minutes = 1.5\nwandb_project = 'a\"b'\n"))
    text = config_to_toml(cfg)
    again = config_from_dict(__import__("tomllib").loads(text), "again")
    assert again.to_dict() == cfg.to_dict()


def test_shipped_recipes_load_and_root_configs_point_at_them():
    from pathlib import Path
    names = ["tiny", "bench-moe"]           # the pre-training recipes (other stages ship their own there)
    assert set(names) <= {p.stem for p in TRAIN_CONFIG_DIR.glob("*.toml")}
    for name in names:
        cfg = load_config(name)
        assert cfg.train.out_dir
        cfg.model.build_config()
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in names:
        assert read_toml(root / f"{name}.toml") == read_toml(TRAIN_CONFIG_DIR / f"{name}.toml")
    bench = load_config("bench-moe").model.build_config()
    assert (bench.vocab_size, bench.hidden_size, bench.num_hidden_layers, bench.n_routed_experts,
            bench.num_experts_per_tok) == (4096, 256, 4, 16, 4)
    with pytest.raises(ConfigError, match="shipped: .*tiny"):
        load_config("no-such-recipe")


def test_apply_overrides_only_touches_known_tables():
    raw = apply_overrides({}, ["optim.lr=2"], SECTIONS)
    assert raw == {"optim": {"lr": 2}}


def test_a_set_typo_names_the_set_item_for_every_command(capsys):
    """A key that is not a field of the table's dataclass is reported against the --set item (not
    the file it would have gone into), with the valid keys; for every command that takes --set."""
    with pytest.raises(ConfigError, match=r"^--set 'optim.lrr=1': unknown key 'lrr' in \[optim\]. Valid keys: lr, min_lr, "):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set 'model.hidden_sz=8': unknown key 'hidden_sz' in \[model\]. "
                                          r"Valid keys: preset, init_from, or any model config field: .*hidden_size"):
        load_config("tiny", ["model.hidden_sz=8"])
    assert load_config("tiny", ["model.hidden_size=64"]).model.fields["hidden_size"] == 64
    from nanoseek.cli import main

    for cmd in (["pretrain", "--config", "tiny"], ["sft"], ["grpo"], ["dpo"], ["distill"]):
        assert main([*cmd, "--set", "train.max_stpes=1"]) == 2
        err = capsys.readouterr().err
        assert "--set 'train.max_stpes=1': unknown key 'max_stpes' in [train]. Valid keys: out_dir, max_steps" in err, cmd
    assert main(["grpo", "--set", "grpo.tempreature=1"]) == 2
    assert "--set 'grpo.tempreature=1': unknown key 'tempreature' in [grpo]" in capsys.readouterr().err


def test_parse_section_defaults_required_keys_and_unions():
    import dataclasses

    from nanoseek.train.config import OptimSection, parse_section

    kind = OptimSection(lr=1e-5, schedule="constant")            # e.g. a post-training kind's defaults
    got = parse_section(OptimSection, {"warmup_steps": 3, "lr": None}, "optim", "x.toml", default=kind)
    assert (got.lr, got.schedule, got.warmup_steps) == (1e-5, "constant", 3)   # null: the kind's default applies
    assert kind.warmup_steps == 100 and got.betas is not kind.betas              # the defaults are not shared

    @dataclasses.dataclass
    class Budget:
        share: float
        levels: int | dict | None = None

    with pytest.raises(ConfigError, match=r"x.toml: \[budget\] needs key 'share'"):
        parse_section(Budget, {}, "budget", "x.toml")
    assert parse_section(Budget, {"share": 1, "levels": {"a": 1}}, "budget", "x.toml").levels == {"a": 1}
    assert parse_section(Budget, {"share": 1, "levels": 2}, "budget", "x.toml").levels == 2
    with pytest.raises(ConfigError, match=r"\[budget\] levels must be int or dict, got str 'x'"):
        parse_section(Budget, {"share": 1, "levels": "x"}, "budget", "x.toml")


def test_pipeline_schedule_is_written_back_only_with_a_pipeline(tmp_path):
    """``[parallel] schedule`` is a no-effect key with pp = 1: refused when written (dropping it
    with ``--set parallel.schedule=null`` works), left out of the resolved TOML, which reads back;
    with pp > 1 it is recorded."""
    import tomllib
    p = write(tmp_path, "[model]\npreset = \"tiny\"\n[train]\nmax_steps = 3\n[parallel]\nschedule = \"dualpipev\"\n")
    with pytest.raises(ConfigError, match="--set parallel.schedule=null"):
        load_config(p)
    one = load_config(p, ["parallel.schedule=null"])
    assert "schedule" not in tomllib.loads(config_to_toml(one))["parallel"]
    assert config_from_dict(tomllib.loads(config_to_toml(one)), "again").to_dict() == one.to_dict()
    two = load_config(p, ["parallel.pp=2", "optim.grad_accum=4", "model.num_hidden_layers=4"])
    written = tomllib.loads(config_to_toml(two))
    assert written["parallel"]["schedule"] == "dualpipev"
    assert config_from_dict(written, "again").to_dict() == two.to_dict()
