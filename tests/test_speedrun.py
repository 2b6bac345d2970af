"""The speedrun's orchestration: recipe parsing and errors, resume bookkeeping, and (slow) a
whole smoke run end to end."""

import json
import re
from pathlib import Path

import pytest

from nanoseek.cli import UserError, main
from nanoseek.eval.results import EvalResult
from nanoseek.speedrun import STAGES, RunState, branch_run
from nanoseek.speedrun_recipe import load_recipe


def test_shipped_recipe_loads_and_overrides_apply():
    rc = load_recipe("speedrun", ["budget.pretrain=0.5", "eval.k=2"])
    assert rc.budget.pretrain == 0.5 and rc.eval.k == 2
    assert rc.eval.external_tasks and all(t.startswith("rg:") for t in rc.eval.external_tasks)
    rc = load_recipe("speedrun", ['eval.external_tasks=["rg:leg_counting(max_animals=3)", "rg:products"]',
                                  "eval.external_problems=7"])
    assert rc.eval.external_tasks == ["rg:leg_counting(max_animals=3)", "rg:products"] and rc.eval.external_problems == 7
    assert load_recipe("speedrun", ["eval.external_tasks=[]"]).eval.external_tasks == []   # no external section
    assert sum(getattr(rc.budget, s) for s in ("pretrain", "sft", "grpo")) < 1.0  # evals and data need time too
    model = rc.model.build_config()
    assert model.num_nextn_predict_layers == 1 and model.n_routed_experts > 0


@pytest.mark.parametrize("override, message", [
    ("budget.pretrian=0.5", "unknown key 'pretrian'"),
    ("nosuch.key=1", "unknown table 'nosuch'"),                  # the trainer's --set parser names the table
    ("budget", "expected section.key=value"),
    ('data.tasks=["compare:1-2", "modular:7"]', "data.tasks: task spec 'modular:7': modular has levels"),
    ('eval.tasks="arithmetic,compar"', "eval.tasks: task spec 'compar': unknown task"),
    ('sft.data="tasks:arithmetic:x"', "sft.data: task spec 'arithmetic:x': levels must be"),
    ('grpo.prompts="word_problem:1"', "grpo.prompts: task spec 'word_problem:1'"),
    ('eval.external_tasks=["rg:chain_sums"]', "eval.external_tasks: unknown reasoning-gym dataset 'rg:chain_sums'; "
                                              "close matches: rg:chain_sum"),
    ('eval.external_tasks=["rg:chain_sum(max_term=2)"]', "unknown config key 'max_term' of chain_sum"),
    ("eval.external_problems=0", r"\[eval\] external_problems = 0: must be >= 1"),
    ('eval.external_tasks="rg:chain_sum"', r"\[eval\] external_tasks must be a list of str"),
    ('grpo.optim.schedule="constant"', "min_lr, decay_fraction would have no effect with schedule = 'constant'"),
    ('sft.optim.lr="fast"', "lr must be float, got str 'fast'"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


@pytest.mark.parametrize("override, message", [
    ("speedrun.lrr=1", r"--set 'speedrun.lrr=1': unknown key 'lrr' in \[speedrun\]. Valid keys: minutes, seed$"),
    ("budget.pretrian=0.5", r"--set 'budget.pretrian=0.5': unknown key 'pretrian' in \[budget\]"),
    ("data.taks=x", r"--set 'data.taks=x': unknown key 'taks' in \[data\]"),
    ("eval.kk=1", r"--set 'eval.kk=1': unknown key 'kk' in \[eval\]"),
    ("sft.optm.lr=1", r"--set 'sft.optm.lr=1': unknown key 'optm' in \[sft\]. Valid keys: data, .*seed, or the "
                      r"tables \[sft.optim\], \[sft.train\], \[sft.spike\]$"),
    ("grpo.optim.lrr=1", r"--set 'grpo.optim.lrr=1': unknown key 'lrr' in \[grpo.optim\]. Valid keys: lr, "),
    ("pretrain.lr=1", r"--set 'pretrain.lr=1': unknown key 'lr' in \[pretrain\]. Valid keys: the tables "
                      r"\[pretrain.optim\], \[pretrain.train\], \[pretrain.spike\], \[pretrain.data\]$"),
])
def test_a_set_typo_names_the_flag_not_the_shipped_file(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


@pytest.mark.parametrize("override, message", [
    ("budget.sft=2", r"^--set 'budget.sft=2': \[budget\] sft = 2.0: must be in \(0, 1\]"),
    ("eval.k=0", r"^--set 'eval.k=0': \[eval\] k = 0: must be >= 1"),
    ('tools.tasks=["arithmetic:9"]', r"^--set 'tools.tasks=\[\"arithmetic:9\"\]': \[tools\] tasks = .*levels"),
    ("grpo.prompts='compare:1,algebra'", r"^--set \"grpo.prompts='compare:1,algebra'\": grpo.prompts: .*unknown task 'algebra'"),
    ("sft.data='tasks:algebra'", r"^--set \"sft.data='tasks:algebra'\": sft.data: .*algebra"),
])
def test_a_bad_value_given_by_set_names_the_flag_not_the_shipped_file(override, message):
    """The value checks and the stages' data checks name ``--set '...'`` when a --set gave the value
    (the shipped recipe file holds a good one), and the file when the file did."""
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


def test_a_bad_value_in_a_recipe_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "speedrun"\n[budget]\nsft = 2\n')
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}: \[budget\] sft = 2.0"):
        load_recipe(str(bad), [])


def test_unknown_recipe_table_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[speedrun]\nminutes = 1\n[budgett]\npretrain = 0.5\n")
    with pytest.raises(UserError, match="budgett"):
        load_recipe(str(bad), [])


def test_run_state_survives_a_restart(tmp_path):
    state = RunState(tmp_path, {"minutes": 3})
    state.mark("data", "done")
    state.update("pretrain", status="running")
    state.mark("pretrain", "running")
    again = RunState(tmp_path, {"minutes": 3})          # a re-run into the same folder
    assert again.done("data") and not again.done("pretrain")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"


def test_cli_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["speedrun", "--minutes", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err


def _finished_run(path, config):
    """A speedrun folder as a finished run leaves it (stage folders with a marker file each)."""
    path.mkdir()
    stages = []
    for name in ("data", "pretrain", "sft", "grpo"):
        (path / name).mkdir()
        (path / name / "marker.txt").write_text(name)
        stages.append({"name": name, "dir": name, "status": "done", "eval": f"elsewhere/{name}/eval.json"})
    run = {"name": path.name, "status": "done", "stages": stages, "steps": {s: "done" for s in STAGES},
           "config": config}
    (path / "run.json").write_text(json.dumps(run))
    return path


def _config(*overrides):
    return load_recipe("speedrun", list(overrides)).record(30.0, 0)


def test_branch_copies_the_stages_before_redo_and_only_those(tmp_path):
    src = _finished_run(tmp_path / "src", json.loads(json.dumps({k: v for k, v in _config().items() if k[0] != "_"})))
    dst = tmp_path / "dst"
    branch_run(src, dst, "sft", _config('sft.data="tasks:modular:1"', "budget.grpo=0.3"))  # post-training may differ
    assert sorted(p.name for p in dst.iterdir()) == ["data", "pretrain", "run.json"]
    assert (dst / "pretrain" / "marker.txt").read_text() == "pretrain"
    run = json.loads((dst / "run.json").read_text())
    assert run["steps"] == {"data": "done", "pretrain": "done", "eval_base": "done"}
    assert [s["name"] for s in run["stages"]] == ["data", "pretrain"] and run["status"] == "running"
    assert run["stages"][1]["eval"] == str(dst / "pretrain" / "eval.json")
    assert run["branched_from"] == {"run": str(src), "redo": "sft"}
    state = RunState(dst, _config())                       # what the speedrun does next
    assert state.done("eval_base") and not state.done("sft")
    state.mark("sft", "done")                              # killed later; the same command resumes it
    branch_run(src, dst, "sft", _config())
    assert RunState(dst, _config()).done("sft")
    with pytest.raises(UserError, match="not empty"):      # but it is not a branch at another stage
        branch_run(src, dst, "grpo", _config())


def test_branch_refuses_what_would_make_stages_incomparable(tmp_path):
    src = _finished_run(tmp_path / "src", json.loads(json.dumps({k: v for k, v in _config().items() if k[0] != "_"})))
    with pytest.raises(UserError, match="another 'eval' than"):         # the copied base eval used k=4
        branch_run(src, tmp_path / "a", "sft", _config("eval.k=8"))
    with pytest.raises(UserError, match="another 'sft' than"):          # --redo grpo keeps the old SFT model
        branch_run(src, tmp_path / "b", "grpo", _config('sft.data="tasks:modular:1"'))
    with pytest.raises(UserError, match="another 'minutes' than"):
        branch_run(src, tmp_path / "c", "sft", {**_config(), "minutes": 3.0})
    branch_run(src, tmp_path / "d", "pretrain", _config("pretrain.optim.lr=1e-3"))  # only data is kept
    assert not (tmp_path / "a").exists() and (tmp_path / "d" / "data").is_dir()


def test_branch_errors_name_the_problem(tmp_path):
    config = json.loads(json.dumps({k: v for k, v in _config().items() if k[0] != "_"}))
    src = _finished_run(tmp_path / "src", config)
    with pytest.raises(UserError, match="no run.json"):
        branch_run(tmp_path, tmp_path / "x", "sft", _config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("")
    with pytest.raises(UserError, match="not empty"):
        branch_run(src, tmp_path / "full", "sft", _config())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text('{"steps": ')          # a run.json cut short
    with pytest.raises(UserError, match=r"broken/run.json: not valid JSON"):
        branch_run(broken, tmp_path / "z", "sft", _config())
    assert not (tmp_path / "z").exists()
    run = json.loads((src / "run.json").read_text())
    run["steps"]["eval_sft"] = "running"
    (src / "run.json").write_text(json.dumps(run))
    with pytest.raises(UserError, match=r"\['eval_sft'\] not done"):
        branch_run(src, tmp_path / "y", "grpo", _config())


def test_cli_wants_from_and_redo_together(tmp_path, capsys):
    assert main(["speedrun", "--out", str(tmp_path / "r"), "--redo", "sft"]) == 2
    assert "--from RUN and --redo STAGE go together" in capsys.readouterr().err


def test_an_interrupted_stage_stops_the_run_and_the_same_command_resumes_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM in a training stage: the trainer saves a checkpoint and returns "interrupted";
    the speedrun stops there (exit 130, the step recorded as interrupted, not done: it once went on
    to evaluate a model that was never written and recorded pre-training as done, so the same command
    skipped it and failed again), and the same command runs the stage again, resuming."""
    import nanoseek.train.pretrain as pretraining
    from nanoseek.train.loop import FitResult

    calls = []

    def interrupted(cfg, resume=False, **kwargs):
        calls.append(cfg.train.out_dir)
        return FitResult(status="interrupted", step=3, tokens=1536, run_dir=Path(cfg.train.out_dir))

    monkeypatch.setattr(pretraining, "pretrain", interrupted)
    out = tmp_path / "run"
    for attempt in (1, 2):
        assert main(["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]) == 130
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "interrupted" and run["steps"]["pretrain"] == "interrupted", run["steps"]
        assert "eval_base" not in run["steps"] and len(calls) == attempt
        assert "pretrain: interrupted; the same command resumes it" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_speedrun_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done"
    assert all(run["steps"][s] == "done" for s in ("data", "pretrain", "eval_base", "sft", "eval_sft", "grpo",
                                                     "eval_grpo"))
    for stage in ("pretrain", "sft", "grpo"):
        assert (out / stage / "final" / "config.json").exists() and (out / stage / "eval.json").exists()
        ext = EvalResult.load(out / stage / "external.json")        # the reasoning-gym held-out tasks
        assert len(ext.task_names) == 3 and all(t.startswith("rg:") for t in ext.task_names)
        assert ext.summary()["n"] == 20 + 20 + 14   # products: 14 held-out questions exist
        assert ext.config["mode"] == ("fewshot" if stage == "pretrain" else "chat")
    md = (out / "report.md").read_text()
    assert "## Held-out evaluation on external tasks" in md and "## Tool use" in md
    assert md.count("A = sft, B = grpo") == 4      # the held-out, external, with-tools and as-used paired tables
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html.split("<body", 1)[-1].replace("http://127.0.0.1", "")
    # re-running into the folder resumes: every step is already done
    assert main(["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]) == 0
    # a branch redoes GRPO from this run's SFT model, with other GRPO settings
    alt = tmp_path / "alt"
    assert main(["speedrun", "--minutes", "1", "--out", str(alt), "--threads", "1", "--from", str(out),
                 "--redo", "grpo", "--set", "grpo.temperature=0.8"]) == 0
    branched = json.loads((alt / "run.json").read_text())
    assert branched["status"] == "done" and branched["config"]["grpo"]["temperature"] == 0.8
    assert branched["resolved"]["grpo"]["temperature"] == 0.8 and run["resolved"]["grpo"]["temperature"] == 1.0
    assert (out / "grpo" / "stage.json").is_file() and json.loads((out / "grpo" / "stage.json").read_text())[
        "eval_mode"] == "chat"                                   # the speedrun's GRPO trains in the chat template
    assert (alt / "sft" / "eval.json").read_bytes() == (out / "sft" / "eval.json").read_bytes()
    assert (alt / "grpo" / "final" / "config.json").exists() and (alt / "grpo" / "eval.json").exists()


@pytest.mark.parametrize("override, message", [
    ("speedrun.minutess=1", r"unknown key 'minutess' in \[speedrun\]"),
    ("data.taskss=1", r"unknown key 'taskss' in \[data\]"),
    ("eval.kk=1", r"unknown key 'kk' in \[eval\]"),
    ("model.hidden_sizee=1", r"unknown key 'hidden_sizee' in \[model\]"),
    ("pretrain.optimm.lr=1", r"unknown key 'optimm' in \[pretrain\]"),
    ("pretrain.optim.lrr=1", r"unknown key 'lrr' in \[pretrain.optim\]"),
    ("pretrain.train.x=1", r"unknown key 'x' in \[pretrain.train\]"),
    ("pretrain.spike.x=1", r"unknown key 'x' in \[pretrain.spike\]"),
    ("pretrain.data.x=1", r"unknown key 'x' in \[pretrain.data\]"),
    ("sft.dta=1", r"unknown key 'dta' in \[sft\]"),
    ("sft.train.x=1", r"unknown key 'x' in \[sft.train\]"),
    ("grpo.spike.x=1", r"unknown key 'x' in \[grpo.spike\]"),
    ("eval.k=2.5", r"\[eval\] k must be int, got float 2.5"),
    ('data.tasks="compare"', r"\[data\] tasks must be a list of str"),
    ("budget.sft=0", r"\[budget\] sft = 0.0: must be in \(0, 1\]"),
    ("speedrun.minutes=-1", r"\[speedrun\] minutes = -1.0: must be positive"),
    ("grpo.group_size=1", r"\[grpo\] group_size = 1: must be >= 2"),               # the last stage, checked first
    ("sft.train.max_steps=0", r"\[sft\]: \[train\] max_steps = 0: must be positive"),
    ("pretrain.optim.seq_len=4096", r"seq_len = 4096: exceeds the model's max_position_embeddings"),
])
def test_every_table_and_stage_is_validated_before_anything_runs(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


def test_a_missing_key_is_named(tmp_path):
    from nanoseek.train.config import TRAIN_CONFIG_DIR

    text = (TRAIN_CONFIG_DIR / "speedrun.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("\nk = 4 ", "\n# k = 4 "))
    with pytest.raises(UserError, match=r"\[eval\] needs key 'k'"):
        load_recipe(str(bad), [])


def test_the_recipe_is_typed_with_the_stages_sections_and_defaults():
    from nanoseek.post.registry import STAGE_KINDS
    from nanoseek.train.config import OptimSection

    rc = load_recipe("speedrun", ["grpo.optim.lr=3e-4"])
    assert isinstance(rc.grpo.optim, OptimSection) and rc.grpo.optim.lr == 3e-4
    assert rc.sft.optim.schedule == STAGE_KINDS["sft"].defaults.optim.schedule == "cosine"   # the kind's, not written
    assert rc.grpo.algo.group_size == 8 and rc.eval.few_shot == 3 and rc.speedrun.seed == 0
    assert rc.pretrain.optim.seq_len == 256 and rc.model.preset == "bench-moe"
    assert "few_shot" not in rc.record(30.0, 0)["eval"]          # run.json records the tables as written


def test_settings_compare_by_value_not_by_how_they_were_written(tmp_path):
    """A run recorded with a recipe that wrote its defaults out (as the shipped one did before they
    were consolidated) has the same settings as the recipe that leaves them to the defaults."""
    from nanoseek.speedrun import check_same_settings

    config = _config()
    old = json.loads(json.dumps(config))
    old["speedrun"]["seed"], old["eval"]["few_shot"], old["grpo"]["temperature"] = 0, 3, 1.0
    old["sft"]["optim"]["warmup_steps"] = 10                     # the sft kind's default
    run = _finished_run(tmp_path / "run", old)
    check_same_settings(run, config)                             # the same settings: no error
    branch_run(run, tmp_path / "b", "grpo", config)
    with pytest.raises(UserError, match=r"eval.few_shot \(3 -> 2\)"):
        check_same_settings(run, _config("eval.few_shot=2"))


def test_run_json_records_the_resolved_recipe_and_older_folders_still_resume(tmp_path):
    """run.json keeps the recipe as written (``config``) and every setting resolved (``resolved``);
    a folder written before ``resolved`` was recorded resumes and branches, and gets it."""
    from nanoseek.speedrun import check_same_settings, resolved_record
    from nanoseek.speedrun_recipe import resolved_settings

    rc = load_recipe("speedrun", [])
    config, resolved = rc.record(30.0, 0), resolved_record(rc, 30.0, 0)
    assert resolved == resolved_settings(json.loads(json.dumps(config)))
    for table, key in (("sft", "template"), ("grpo", "group_size"), ("grpo", "prompts_per_step"), ("grpo", "beta"),
                       ("grpo", "temperature"), ("eval", "few_shot"), ("speedrun", "seed")):
        assert key in resolved[table] and key not in config.get(table, {}), (table, key)
    assert "seq_len" in resolved["sft"]["optim"] and "warmup_steps" in resolved["sft"]["optim"]
    (tmp_path / "new").mkdir()
    fresh = RunState(tmp_path / "new", config, resolved)
    written = json.loads((tmp_path / "new" / "run.json").read_text())
    assert written["resolved"] == json.loads(json.dumps(resolved)) and written["config"]["minutes"] == 30.0
    assert fresh.data["resolved"]["eval"]["few_shot"] == 3
    old = _finished_run(tmp_path / "old", json.loads(json.dumps(config)))        # no "resolved" key
    old_json = json.loads((old / "run.json").read_text())
    old_json["steps"] = {"data": "done"}
    (old / "run.json").write_text(json.dumps(old_json))
    check_same_settings(old, config)                            # resuming it: the same settings
    state = RunState(old, config, resolved)
    assert state.done("data") and json.loads((old / "run.json").read_text())["resolved"]["grpo"]["beta"] == 0.0
    src = _finished_run(tmp_path / "src", json.loads(json.dumps(config)))       # branching from one
    branch_run(src, tmp_path / "dst", "sft", config)
    assert "resolved" not in json.loads((tmp_path / "dst" / "run.json").read_text())
    RunState(tmp_path / "dst", config, resolved)
    assert json.loads((tmp_path / "dst" / "run.json").read_text())["resolved"] == written["resolved"]


def test_external_tasks_whose_prompts_do_not_fit_fail_before_pretraining(tmp_path, capsys):
    """A task whose held-out prompts exceed the model's context stops the run right after the tokenizer
    is trained (seconds, not after pre-training), in one line naming the --set that gave it."""
    from nanoseek.cli import main

    out = tmp_path / "run"
    spec = 'eval.external_tasks=["rg:chain_sum","rg:rectangle_count"]'
    rc = main(["speedrun", "--minutes", "1", "--out", str(out), "--set", spec, "--set", "data.task_docs=2000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].endswith(f"--set {spec!r}: eval.external_tasks: rg:rectangle_count: 20 held-out problems have "
                           "fewshot prompts of " + err[0].split("fewshot prompts of ")[1].split(" tokens")[0] +
                           " tokens, more than the engine's context of 1024 tokens (use a larger max_seq_len, or a "
                           "config with smaller problems)")
    assert not (out / "pretrain").exists()


def test_a_bad_task_spec_given_by_set_names_the_flag():
    with pytest.raises(UserError, match=r"^--set 'eval.external_tasks=\[\"rg:chain_summ\"\]': eval.external_tasks: "
                                        r"unknown reasoning-gym dataset 'rg:chain_summ'"):
        load_recipe("speedrun", ['eval.external_tasks=["rg:chain_summ"]'])


@pytest.mark.parametrize("item", ["arithmetic:1", "compare", "humaneval:0-3"])
def test_external_tasks_are_reasoning_gym_tasks_only(item):
    """The report's external section says its problems are written and graded by reasoning-gym."""
    with pytest.raises(UserError, match=rf"eval.external_tasks: '{item.split(':')[0]}.*' is not a reasoning-gym task"):
        load_recipe("speedrun", [f'eval.external_tasks=["rg:chain_sum", "{item}"]'])
