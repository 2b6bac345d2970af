"""nanoseek ablate --suite rl: the arms are the documented overrides, a tiny two-arm suite trains,
evaluates and judges end to end, a re-run reuses finished runs, and the paired judge calls a clear
win, a clear loss and noise correctly."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from nanoseek.ablate import rl
from nanoseek.ablate.results import ArmResult
from nanoseek.ablate.rl import ARMS, RLSeedRun, judge_arm, make_plan, run_suite, stage_config
from nanoseek.ablate.rl_report import write_rl_report
from post_helpers import saved_tiny_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "ablations" / "notes.md"

# tiny rollouts and evaluation for every arm (on top of the suite's COMMON settings)
TINY = ["grpo.prompts=\"digit7\"", "grpo.num_prompts=8", "grpo.level=null", "grpo.prompts_per_step=2",
        "grpo.group_size=2", "grpo.max_new_tokens=4", "grpo.micro_batch_size=4", "optim.seq_len=64",
        "train.save_every=0"]
EVAL = {"tasks": "digit7", "n_problems": 3, "k": 1, "max_new_tokens": 4, "temperature": 0.0}




def test_arms_are_the_documented_overrides():
    """docs/ablations.md's table of `--set` overrides (per arm) is what the suite runs, and each arm
    changes only its own keys of the resolved config."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| (GRPO|DAPO|Dr\. GRPO|GSPO|CISPO)\b.*?\| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    labels = {"grpo": "GRPO", "dapo": "DAPO", "dr_grpo": "Dr. GRPO", "gspo": "GSPO", "cispo": "CISPO"}
    assert [a.name for a in ARMS] == list(labels)
    for a in ARMS:
        documented = dict(re.findall(r"(grpo\.\w+)=([\w./]+)", rows[labels[a.name]]))
        ours = {k: (str(v).lower() if isinstance(v, bool) else "N/5" if callable(v) else str(v))
                for k, v in a.overrides.items()}
        assert ours == documented, a.name
    assert ARMS[1].settings(128)["grpo.overlong_buffer"] == 25          # the docs' N/5 for N = 128


def test_arm_configs_differ_only_in_their_keys_and_seed_sets_both_seeds(tmp_path):
    ckpt = saved_tiny_checkpoint(tmp_path / "sft")
    plan = make_plan(str(ckpt), steps=3, seeds=2, seed_base=5, overrides=TINY, eval_settings=EVAL)
    base = stage_config(rl.arm("grpo"), plan, 6, tmp_path / "x").to_dict()
    assert base["grpo"]["seed"] == base["train"]["seed"] == 6 and base["train"]["max_steps"] == 3
    assert base["grpo"]["template"] == "chat" and base["grpo"]["num_iterations"] == 2   # COMMON
    for a in ARMS[1:]:
        cfg = stage_config(a, plan, 6, tmp_path / "x").to_dict()
        changed = {f"{t}.{k}" for t in cfg for k in cfg[t] if cfg[t][k] != base[t][k]}
        assert changed == set(a.overrides), a.name


def test_tiny_two_arm_suite_runs_evaluates_judges_and_reuses(tmp_path, one_thread):
    ckpt = saved_tiny_checkpoint(tmp_path / "sft")
    plan = make_plan(str(ckpt), steps=2, seeds=1, overrides=TINY, eval_settings=EVAL, arms=["grpo", "dr_grpo"],
                     device="cpu", command="nanoseek ablate --suite rl ...")
    out = tmp_path / "ablate" / "rl"
    from nanoseek.post.grpo import train_grpo
    trained = []

    def spy(cfg, **kw):
        trained.append(cfg.train.out_dir)
        return train_grpo(cfg, **kw)

    run_suite(plan, out, train_fn=spy, log=lambda s: None)
    assert len(trained) == 2
    start = json.loads((out / "start" / "eval.json").read_text())
    assert len(start["problems"]) == 3 and start["model"]["path"] == str(ckpt)
    data = write_rl_report(plan, out)
    assert data["start"]["n"] == 3 and data["arms"]["grpo"]["vs_start"]["n"] == 3
    assert "| the start (the SFT checkpoint, no RL) |" in (out / "report.md").read_text()
    for name in ("grpo", "dr_grpo"):
        ev = json.loads((out / "runs" / name / "seed0" / "eval.json").read_text())
        assert len(ev["problems"]) == 3 and ev["config"]["tasks"] == ["digit7"]
        run = data["arms"][name]["runs"][0]
        assert len(run["scores"]) == 3 and run["config_seed"] == 0 and len(run["curve"]) == 2
        assert "reward_mean" in run["curve"][0]
    vs = data["arms"]["dr_grpo"]["vs_baseline"]
    assert vs["diff"]["n"] == 3 and vs["status"].startswith("unresolved")  # one seed at most
    assert data["verdict"]["status"] == vs["status"]
    report = (out / "report.md").read_text()
    assert "Dr. GRPO" in report and "paired" in report and (out / "rl.png").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/*") if p.is_file()}
    trained.clear()
    run_suite(plan, out, train_fn=spy, log=lambda s: None)                     # finished runs are reused
    assert trained == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def _arm(name: str, scores_by_seed: dict[int, list[float]]) -> ArmResult:
    res = ArmResult(name, name, {})
    for seed, scores in scores_by_seed.items():
        res.runs.append(RLSeedRun(seed, "", sum(scores) / len(scores), {f"t/{i}": s for i, s in enumerate(scores)},
                                  [], 0.0, seed))
    return res


@pytest.mark.parametrize("case, expected", [("win", "held"), ("loss", "did not hold"),
                                            ("noise", "unresolved: |effect| < ")])
def test_paired_judge_on_synthetic_problems(case, expected):
    rng = random.Random(0)
    n, seeds = 200, (0, 1, 2)
    base = {s: [float(rng.random() < 0.4) for _ in range(n)] for s in seeds}
    if case == "win":         # 25% of the problems flip to solved in every seed
        other = {s: [1.0 if rng.random() < 0.25 else x for x in base[s]] for s in seeds}
    elif case == "loss":
        other = {s: [0.0 if rng.random() < 0.5 else x for x in base[s]] for s in seeds}
    else:                     # an independent draw at the same rate: no real difference
        other = {s: [float(rng.random() < 0.4) for _ in range(n)] for s in seeds}
    j = judge_arm(_arm("x", other), _arm("grpo", base))
    assert j["status"] == expected or (expected.startswith("unresolved") and j["status"].startswith(expected)), j
    if expected.startswith("unresolved"):                   # an accuracy bound reads in points
        assert re.search(r"< \d+\.\d points at this power", j["status"]) and j["over_seeds"]["n"] == 3
    assert set(j["per_seed"]) == set(seeds) and j["diff"]["n"] == n
    d = j["diff"]
    assert d["low"] <= d["mean"] <= d["high"]
    one = judge_arm(_arm("x", {0: other[0]}), _arm("grpo", {0: base[0]}))      # one seed: never more than a direction
    assert one["status"].startswith("unresolved (one seed")


def test_cli_rl_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["ablate", "--suite", "rl", "--steps", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["ablate", "--suite", "rl", "--steps", "2", "--model", str(tmp_path / "none"),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    ckpt = saved_tiny_checkpoint(tmp_path / "sft")
    assert main(["ablate", "--suite", "rl", "--budget-minutes", "5", "--model", str(ckpt),
                 "--out", str(tmp_path / "c")]) == 2
    assert "--budget-minutes does not apply" in capsys.readouterr().err
    assert main(["ablate", "--suite", "rl,mtp", "--steps", "2", "--model", str(ckpt)]) == 2
    assert "runs alone" in capsys.readouterr().err
    assert main(["ablate", "--suite", "rl", "--steps", "2", "--model", str(ckpt), "--arms", "dapo",
                 "--out", str(tmp_path / "d")]) == 2
    assert "keep it among the arms" in capsys.readouterr().err
    for item, flag in (("grpo.loss_agg=dapo", "the arms"), ("train.seed=3", "--seed")):
        assert main(["ablate", "--suite", "rl", "--steps", "2", "--model", str(ckpt), "--set", item,
                     "--out", str(tmp_path / "e")]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_an_interrupted_rl_suite_resumes_without_redoing_finished_runs(tmp_path):
    """Stubbed training and evaluation: the suite stops at an interrupted run; the same plan again trains
    only that run and the ones after it, and evaluates only what has no current eval.json."""
    from types import SimpleNamespace

    ckpt = saved_tiny_checkpoint(tmp_path / "sft")
    plan = make_plan(str(ckpt), steps=2, seeds=2, overrides=TINY, eval_settings=EVAL, arms=["grpo", "gspo"])
    out = tmp_path / "rl"
    trained, evaluated, cut = [], [], [3]

    def train(cfg, **kw):
        run = Path(cfg.train.out_dir)
        trained.append((run.parent.name, run.name))
        if len(trained) == cut[0]:
            return SimpleNamespace(status="interrupted", steps=1)
        (run / "config.toml").write_text(cfg.to_toml())
        (run / "stage.json").write_text(json.dumps({"kind": "grpo", "status": "done", "steps": 2}))
        return SimpleNamespace(status="done", steps=2)

    def evaluate(run_dir, settings, **kw):
        evaluated.append((run_dir.parent.name, run_dir.name))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "eval.json").write_text(json.dumps({"config": settings}))
        return SimpleNamespace(pass1=lambda: None)

    order = [(a, f"seed{s}") for s in (0, 1) for a in ("grpo", "gspo")]
    with pytest.raises(KeyboardInterrupt):
        run_suite(plan, out, train_fn=train, eval_fn=evaluate, log=lambda s: None)
    assert evaluated[0] == ("rl", "start")                           # the SFT checkpoint itself, first
    evaluated.pop(0)
    assert trained == order[:3] and evaluated == order[:2]
    trained.clear(), evaluated.clear()
    cut[0] = 0
    (out / "runs" / "gspo" / "seed0" / "eval.json").unlink()          # an evaluation lost: redone, not retrained
    saved = out / "runs" / "grpo" / "seed0" / "config.toml"          # nanoseek reinstalled elsewhere: the header
    saved.write_text(saved.read_text().replace("(from ", "(from /elsewhere"))   # names another file, still reused
    assert "/elsewhere" in saved.read_text()
    run_suite(plan, out, train_fn=train, eval_fn=evaluate, log=lambda s: None)
    assert trained == order[2:] and evaluated == [order[1]] + order[2:]


def interrupt_gspo(cfg, **kw):
    """A picklable stand-in for the GRPO trainer in worker processes: the gspo arm is interrupted."""
    from types import SimpleNamespace

    from nanoseek.post.grpo import train_grpo

    if "/gspo/" in str(cfg.train.out_dir):
        return SimpleNamespace(status="interrupted", steps=1)
    return train_grpo(cfg, **kw)


def _eval_scores(run_dir: Path) -> dict:
    return {p["id"]: p for p in json.loads((run_dir / "eval.json").read_text())["problems"]}


def test_rl_jobs_train_and_evaluate_the_runs_of_a_sequential_suite_and_resume(tmp_path, one_thread):
    """--jobs 2: every run trained and evaluated in its own process is the run the sequential suite
    makes (same rollout curve, same per-problem scores); an interrupted run stops the batch and the
    same call resumes only what is unfinished."""
    from nanoseek.ablate.rl import load_rl_run

    ckpt = saved_tiny_checkpoint(tmp_path / "sft")
    plan = make_plan(str(ckpt), steps=2, seeds=1, overrides=TINY, eval_settings=EVAL, arms=["grpo", "gspo"],
                     device="cpu")
    run_suite(plan, tmp_path / "seq", log=lambda s: None)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_suite(plan, tmp_path / "par", train_fn=interrupt_gspo, log=logs.append, jobs=2, threads=1)
    assert "rl/gspo seed 0: interrupted" in logs and "the same command resumes" in logs[-1]
    assert not (tmp_path / "par" / "runs" / "gspo" / "seed0" / "eval.json").exists()
    logs.clear()
    done = run_suite(plan, tmp_path / "par", log=logs.append, jobs=2, threads=1)
    assert any(" at a time, each trained and evaluated" in m for m in logs) and len(done) == 2
    grpo = tmp_path / "par" / "runs" / "grpo" / "seed0"
    (grpo / "eval.json").unlink()                   # an evaluation lost: redone in a worker, not retrained
    stamp = (grpo / "stage.json").stat().st_mtime_ns
    logs.clear()
    run_suite(plan, tmp_path / "par", log=logs.append, jobs=2, threads=1)
    assert "1 jobs, 1 at a time" in logs[1] and (grpo / "stage.json").stat().st_mtime_ns == stamp
    for name in ("grpo", "gspo"):
        seq, par = (load_rl_run(tmp_path / d / "runs" / name / "seed0") for d in ("seq", "par"))
        assert par.curve == seq.curve and par.scores == seq.scores, name
        assert _eval_scores(tmp_path / "par" / "runs" / name / "seed0").keys() == \
            _eval_scores(tmp_path / "seq" / "runs" / name / "seed0").keys()
    assert _eval_scores(tmp_path / "par" / "start") == _eval_scores(tmp_path / "seq" / "start")
    logs.clear()
    run_suite(plan, tmp_path / "par", log=logs.append, jobs=2, threads=1)
    assert len(logs) == 2 and all("already trained and evaluated" in m for m in logs)


def test_reward_curves_are_smoothed_by_a_centred_moving_mean():
    from nanoseek.ablate.rl_report import smooth

    assert smooth([0.0, 0.0, 3.0, 0.0, 0.0], 3) == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_the_recorded_rl_command_runs_in_a_shell_as_given():
    """The regenerating command in the report quotes what a shell would split or strip (a --set with
    a quoted TOML string, a path with a space), so pasting it runs the same suite."""
    import argparse
    import shlex

    from nanoseek.ablate.cli import _rl_command, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = ["--suite", "rl", "--model", "my runs/sft", "--steps", "400", "--seeds", "3", "--jobs", "2",
             "--eval-tasks", "compare:1-2,arithmetic:1-2", "--set", 'grpo.prompts="compare:1-2,arithmetic:1-2"']
    args = parser.parse_args(given)
    words = shlex.split(_rl_command(args))
    assert words[:2] == ["nanoseek", "ablate"]
    again = parser.parse_args(words[2:])
    for key in ("model", "steps", "seeds", "jobs", "eval_tasks", "overrides"):
        assert getattr(again, key) == getattr(args, key), key
