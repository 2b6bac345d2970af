"""Post-training stages as configs: shipped recipes parse, errors name the key, the CLI runs them,
and DPO / distillation run end to end through the shared trainer on a tiny model."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.post.datasets import SFTExample, load_rl_prompts, write_jsonl
from nanoseek.post.distill import run_distill, verified_examples
from nanoseek.post.rollout import Scored
from nanoseek.post.dpo import train_dpo
from nanoseek.post.recipe import load_recipe, recipe_from_dict
from nanoseek.tasks.rewards import RewardResult
from nanoseek.post.sft import train_sft
from nanoseek.post.registry import load_stage_config, stage_config_from_dict
from nanoseek.errors import ConfigError
from post_helpers import saved_tiny_checkpoint


@pytest.fixture
def base(tmp_path):
    """A saved tiny checkpoint with its tokenizer."""
    return saved_tiny_checkpoint(tmp_path / "base")




@pytest.mark.parametrize("name,kind", [("sft", "sft"), ("dpo", "dpo"), ("r1-zero", "grpo"), ("distill", "distill")])
def test_shipped_stage_configs_parse(base, name, kind):
    over = [f"model.init_from={base}"] if kind != "distill" else [f"distill.teacher={base}"]  # a teacher that exists
    cfg = load_stage_config(name, kind, over)
    assert cfg.kind == kind and cfg.train.max_steps > 0
    if kind == "grpo":
        assert cfg.algo.template == "r1-zero" and not cfg.spike.enabled
    assert cfg.to_toml().count(f"[{kind}]") == 1


def test_the_architecture_doc_s_worked_example(base, tmp_path, monkeypatch):
    """docs/architecture.md: `nanoseek grpo --config r1-zero --set optim.lr=5e-5` (from a folder
    holding the base model r1-zero.toml names) resolves with lr 5e-5: r1-zero writes no min_lr
    that a changed lr would make an error, nor does any lr under the constant schedule trip one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "speedrun").mkdir(parents=True)
    (tmp_path / "runs" / "speedrun" / "pretrain").symlink_to(base, target_is_directory=True)
    cfg = load_stage_config("r1-zero", "grpo", ["optim.lr=5e-5"])
    assert cfg.optim.lr == 5e-5 and cfg.optim.schedule == "constant"
    assert load_stage_config("r1-zero", "grpo", ["optim.lr=3e-6"]).optim.lr == 3e-6   # R1's, below the kind's min_lr
    for st in load_recipe("r1", ["stages.reasoning_rl.optim.lr=5e-5", "stages.final_rl.optim.lr=2e-4"]).stages:
        assert "min_lr" not in st.raw.get("optim", {}) or st.kind != "grpo"


def test_shipped_r1_recipe_parses_every_stage(base):
    rec = load_recipe("r1", [f"recipe.init_from={base}"])
    assert [(s.name, s.kind) for s in rec.stages] == [("cold_start", "sft"), ("reasoning_rl", "grpo"),
                                                       ("rejection_sft", "distill"), ("final_rl", "grpo")]
    assert rec.stages[2].init == "base" and rec.stages[2].teacher == "previous"
    for st in rec.stages:  # each stage validates as a stage config
        raw = {**st.raw, "model": {"init_from": str(base)}}
        stage_config_from_dict(st.kind, raw, source=f"r1 [stages.{st.name}]")


def test_stage_config_errors_name_the_key(base, tmp_path):
    ok = {"model": {"init_from": str(base)}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match=r"unknown key 'bta' in \[grpo\]"):
        stage_config_from_dict("grpo", {**ok, "grpo": {"bta": 0.1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"x.toml: \[grpo\] loss_agg"):
        stage_config_from_dict("grpo", {**ok, "grpo": {"loss_agg": "sum"}}, "x.toml")
    with pytest.raises(ConfigError, match="init_from is required"):
        stage_config_from_dict("sft", {"train": {"max_steps": 1}}, "x.toml")
    with pytest.raises(ConfigError, match="no such file"):
        stage_config_from_dict("sft", {"model": {"init_from": str(tmp_path / "nope")}, "train": {"max_steps": 1}})
    with pytest.raises(ConfigError, match="architecture cannot change"):
        stage_config_from_dict("sft", {**ok, "model": {"init_from": str(base), "hidden_size": 64}})
    # GRPO's default schedule is constant: a decay written for it would be silently ignored
    with pytest.raises(ConfigError, match=r"x.toml: \[optim\] min_lr would have no effect with schedule = 'constant'"):
        stage_config_from_dict("grpo", {**ok, "optim": {"lr": 2e-4, "min_lr": 2e-5}}, "x.toml")
    stage_config_from_dict("grpo", {**ok, "optim": {"lr": 2e-4}}, "x.toml")   # the default min_lr is not the user's
    stage_config_from_dict("grpo", {**ok, "optim": {"lr": 2e-4, "min_lr": 2e-5, "schedule": "wsd"}}, "x.toml")
    with pytest.raises(ConfigError, match=r"\[sft\] .*mode.* must be str"):
        stage_config_from_dict("sft", {**ok, "sft": {"mode": 3}})
    with pytest.raises(ConfigError, match="needs max_steps"):
        stage_config_from_dict("sft", {"model": {"init_from": str(base)}, "train": {"max_steps": None}})
    with pytest.raises(ConfigError, match="needs kind"):
        recipe_from_dict({"recipe": {"init_from": "x"}, "stages": {"a": {"sft": {}}}})


def test_a_kind_s_defaults_fill_what_the_stage_does_not_write(base):
    """One default per setting: a key a stage TOML does not write (or unsets with null) takes the
    kind's registry defaults, else the trainer's."""
    from nanoseek.post.registry import STAGE_KINDS

    ok = {"model": {"init_from": str(base)}, "train": {"max_steps": 1}}
    for kind in ("sft", "dpo", "grpo"):
        cfg = stage_config_from_dict(kind, ok, "x.toml")
        assert cfg.optim == STAGE_KINDS[kind].defaults.optim and cfg.spike == STAGE_KINDS[kind].defaults.spike
        assert cfg.train.mtp_lambda == STAGE_KINDS[kind].defaults.train.mtp_lambda and cfg.train.max_steps == 1
    assert stage_config_from_dict("sft", ok).optim.lr == 1e-4 and stage_config_from_dict("grpo", ok).optim.lr == 1e-5
    unset = stage_config_from_dict("sft", {**ok, "optim": {"lr": None}}, "x.toml")
    assert unset.optim.lr == STAGE_KINDS["sft"].defaults.optim.lr                 # null: the kind's default applies
    assert load_stage_config("sft", "sft", [f"model.init_from={base}"]).optim.lr == 3e-4   # sft.toml's choice


def test_cli_print_config_and_errors(base, tmp_path, capsys):
    assert main(["grpo", "--config", "r1-zero", "--model", str(base), "--steps", "7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "[grpo]" in out and "max_steps = 7" in out and str(base) in out
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[model]\ninit_from = "{base}"\n[sft]\ndta = "x"\n[train]\nmax_steps = 1\n')
    assert main(["sft", "--config", str(bad)]) == 2
    assert "unknown key 'dta' in [sft]" in capsys.readouterr().err
    data = tmp_path / "broken.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["sft", "--config", "sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert f"{data}:1: no assistant message" in capsys.readouterr().err


def test_cli_print_config_of_a_recipe_prints_every_stage_resolved(base, tmp_path, capsys, monkeypatch):
    """`nanoseek grpo --config r1 --print-config`: each stage's resolved config under a
    `# [stages.NAME]` line, in order, with --set applied and validated; before the base model
    exists too (its init_from marked not found), and a --set error is one line."""
    monkeypatch.chdir(tmp_path)                          # r1.toml's base (runs/speedrun/pretrain) is not here
    assert main(["grpo", "--config", "r1", "--print-config", "--set", "stages.final_rl.optim.lr=7e-5",
                 "--set", "stages.cold_start.train.max_steps=9"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("# [stages.")]
    assert heads == ["# [stages.cold_start]", "# [stages.reasoning_rl]", "# [stages.rejection_sft]",
                     "# [stages.final_rl]"]
    stages = out.split("# [stages.")[1:]
    assert "max_steps = 9" in stages[0] and "Resolved nanoseek sft config" in stages[0]
    assert "runs/speedrun/pretrain (not found" in stages[0]
    assert "lr = 7e-05" in stages[3] and "Resolved nanoseek grpo config" in stages[3]
    assert "runs/r1/rejection_sft/final (written by stage rejection_sft)" in stages[3]
    assert "[distill]" in stages[2] and "runs/r1/reasoning_rl/final (written by stage reasoning_rl)" in stages[2]
    assert main(["grpo", "--config", "r1", "--print-config", "--set", "stages.final_rl.grpo.level=9"]) == 2
    assert "[stages.final_rl]: [grpo] level: " in capsys.readouterr().err
    # with the base model there, the first stage starts from it and every stage is validated as a run would
    assert main(["grpo", "--config", "r1", "--model", str(base), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f'init_from = "{base}"' in out.split("# [stages.reasoning_rl]")[0] and not (tmp_path / "runs").exists()


def test_cli_sft_runs(base, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                                {"role": "assistant", "content": "7"}]}
                                                  for i in range(6)])
    code = main(["sft", "--config", "sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--set", "optim.seq_len=64", "--set", "train.device=\"cpu\"", "--quiet"])
    assert code == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()
    record = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert record["examples"] == 6
    assert record["eval_mode"] == "chat"                  # the template its model answers in, from its section


def test_each_section_names_the_template_its_model_answers_in():
    """stage.json's eval_mode comes from the section, so eval/ never branches on stage kinds."""
    from nanoseek.post.registry import STAGE_KINDS

    for kind, entry in STAGE_KINDS.items():
        assert entry.section().eval_mode in ("chat", "chat-think", "r1-zero"), kind
    grpo = STAGE_KINDS["grpo"].section
    assert grpo().eval_mode == "r1-zero"
    assert grpo(template="chat-think").eval_mode == "chat-think"
    assert STAGE_KINDS["dpo"].section(template="chat-think").eval_mode == "chat"      # as eval has always read it


def test_dpo_stage_learns_the_preference(base, tmp_path, one_thread):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"say 7 ({i})", "chosen": "7", "rejected": "12"}
                                                   for i in range(4)])
    cfg = stage_config_from_dict("dpo", {
        "model": {"init_from": str(base)}, "dpo": {"data": str(prefs), "beta": 0.5},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 4,
                  "seq_len": 64},
        "train": {"max_steps": 8, "out_dir": str(tmp_path / "dpo"), "device": "cpu"}})
    res = train_dpo(cfg, quiet=True)
    first, last = res.history[0], res.history[-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)             # starts at log 2: policy == reference
    assert last["reward_margin"] > 1.0 and last["reward_accuracy"] == 1.0
    assert res.extra["pairs"] == 4


def test_split_leading_think_and_verified_examples():
    from nanoseek.tasks.reply import split_leading_think

    assert split_leading_think("<think>\nsteps\n</think>\n\nAnswer: 7") == ("steps", "Answer: 7")
    assert split_leading_think(" <think> a </think> <answer>7</answer>") == (" a ", "<answer>7</answer>")
    assert split_leading_think("7") == (None, "7")
    items = load_rl_prompts("digit7", 2)

    def s(text, ok):
        return Scored(text, RewardResult(reward=float(ok), format_ok=ok, correct=ok, answer=None), "stop", 3)

    ex = verified_examples(items, [[s("<think>\nlong one\n</think>\n\n7", True), s("<think>\nx\n</think>\n\n7", True),
                                    s("8", False)], [s("9", False)]], keep_per_prompt=1)
    assert len(ex) == 1                                                  # the second prompt has no verified sample
    assert ex[0].messages == [{"role": "user", "content": items[0].prompt},
                              {"role": "assistant", "content": "7", "reasoning": "x"}]   # shortest first


def test_distill_from_teacher_into_fresh_dense_student(base, tmp_path, one_thread):
    prompts = load_rl_prompts("digit7@fixed", 8, seed=0)   # the one short wording: rows of 64 tokens
    teach = [SFTExample(messages=[{"role": "user", "content": p.prompt},
                                  {"role": "assistant", "reasoning": "x", "content": "7"}]) for p in prompts]
    cfg = stage_config_from_dict("sft", {
        "model": {"init_from": str(base)}, "sft": {"mode": "pad"},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 8,
                  "seq_len": 64},
        "train": {"max_steps": 50, "out_dir": str(tmp_path / "teacher"), "device": "cpu"}})
    teacher = train_sft(cfg, examples=teach, quiet=True)
    dcfg = stage_config_from_dict("distill", {
        "model": {"preset": str(base / "config.json"), "n_routed_experts": 0, "num_nextn_predict_layers": 0},
        "distill": {"teacher": str(teacher.final_dir), "prompts": "digit7@fixed", "num_prompts": 4, "samples_per_prompt": 2,
                    "max_new_tokens": 16, "temperature": 0.0, "template": "chat", "mode": "pad"},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 4,
                  "seq_len": 64},
        "train": {"max_steps": 6, "out_dir": str(tmp_path / "student"), "device": "cpu"}})
    res = run_distill(dcfg, quiet=True)
    sampling = res.extra["sampling"]
    assert sampling["accuracy"] == 1.0 and sampling["kept"] == 4          # greedy teacher: all verified, 1 per prompt
    traces = [json.loads(x) for x in (tmp_path / "student" / "distill.jsonl").read_text().splitlines()]
    assert traces[0]["messages"][1] == {"role": "assistant", "content": "7", "reasoning": "x"}
    assert res.history[-1]["ce"] < res.history[0]["ce"]
    student_cfg = json.loads((res.final_dir / "config.json").read_text())
    assert student_cfg["n_routed_experts"] == 0                            # a dense student


@pytest.mark.slow
def test_r1_recipe_end_to_end(base, tmp_path, one_thread):
    """The shipped r1 recipe, shrunk: cold start -> GRPO -> rejection-sampling SFT of the base -> GRPO."""
    from nanoseek.post.recipe import run_recipe

    cold = write_jsonl(tmp_path / "cold.jsonl", [
        {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "reasoning": "x", "content": "Answer: 7"}]}
        for p in load_rl_prompts("digit7", 8, seed=0)])
    ov = [f"recipe.init_from={base}", f"recipe.out_dir={tmp_path / 'r1'}", f"stages.cold_start.sft.data={cold}",
          "stages.cold_start.optim.lr=1e-2", "stages.cold_start.optim.min_lr=1e-2", "stages.cold_start.train.max_steps=50",
          "stages.rejection_sft.optim.lr=1e-2", "stages.rejection_sft.optim.min_lr=1e-2",
          "stages.rejection_sft.train.max_steps=30", "stages.rejection_sft.distill.samples_per_prompt=2"]
    for st in ("cold_start", "reasoning_rl", "rejection_sft", "final_rl"):
        ov += [f"stages.{st}.train.device=cpu", f"stages.{st}.optim.seq_len=64", f"stages.{st}.optim.warmup_steps=0",
               f"stages.{st}.optim.micro_batch_size=8"]
    for st in ("reasoning_rl", "final_rl"):
        ov += [f"stages.{st}.grpo.prompts=digit7", f"stages.{st}.grpo.num_prompts=8", f"stages.{st}.grpo.group_size=4",
               f"stages.{st}.grpo.prompts_per_step=2", f"stages.{st}.grpo.max_new_tokens=16",
               f"stages.{st}.train.max_steps=2"]
    ov += ["stages.rejection_sft.distill.prompts=digit7", "stages.rejection_sft.distill.num_prompts=4",
           "stages.rejection_sft.distill.max_new_tokens=16", "stages.rejection_sft.distill.mode=pad"]
    results = run_recipe(load_recipe("r1", ov), quiet=True, progress=False)
    assert [r.status for r in results] == ["done"] * 4
    assert results[0].history[-1]["ce"] < 0.2 * results[0].history[0]["ce"]
    assert results[1].last("format_rate") > 0                             # the cold start taught the R1 format
    assert results[2].extra["sampling"]["kept"] >= 1
    assert str(base) in (results[2].run_dir / "config.toml").read_text()  # rejection SFT retrains the base
    again = run_recipe(load_recipe("r1", ov), resume=True, quiet=True)     # finished stages are skipped
    assert all(r.extra.get("skipped") for r in again)
    assert again[-1].final_dir == results[-1].final_dir


def test_rollout_sampling_settings_are_the_callers():
    """sample_and_score has no sampling defaults of its own: distill passes its section's, DPO its auto_* ones."""
    import dataclasses
    import inspect

    from nanoseek.post.distill import DistillSection
    from nanoseek.post.dpo import DPOSection
    from nanoseek.post.rollout import sample_and_score

    params = inspect.signature(sample_and_score).parameters
    for name in ("template", "max_new_tokens", "temperature", "top_p"):
        assert params[name].default is inspect.Parameter.empty, name
    d = {f.name: f.default for f in dataclasses.fields(DistillSection)}
    assert (d["max_new_tokens"], d["temperature"], d["top_p"]) == (256, 0.6, 0.95)
    assert DPOSection().auto_top_p == 0.95                      # what DPO's auto pairs were sampled with
    with pytest.raises(ValueError, match="auto_top_p"):
        DPOSection(auto_top_p=0).validate()
