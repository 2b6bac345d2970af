"""The speedrun's pre-training step settings for this machine (nanoseek/speedrun_machine.py): what
the recipe writes wins, short stages and GPUs keep the trainer's defaults, a long CPU stage compiles
(in fp32: bf16 autocast is never chosen for the user); the speedrun records the choice on the stage
and a resumed stage keeps it."""

from __future__ import annotations

import json

import pytest

import nanoseek.speedrun_machine as machine
from nanoseek.cli import main


def test_a_long_cpu_stage_compiles_in_fp32(monkeypatch):
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    for written in ({}, {"device": "cpu"}, {"eval_every": 500}):
        chosen, why = machine.pretrain_step_settings(written, 15.0)
        assert chosen == {"compile": True} and "compiled" in why


@pytest.mark.parametrize("written, minutes, cuda", [
    ({"compile": False}, 15.0, False),            # the recipe's word wins, whatever it is
    ({"dtype": "bfloat16"}, 15.0, False),
    ({"compile": True}, 15.0, False),
    ({}, machine.FAST_MINUTES - 0.1, False),      # too short to win back compiling
    ({"device": "cuda"}, 15.0, False),            # not measured on GPUs
    ({}, 15.0, True),                             # "auto" on a machine with a GPU
    ({"device": "mps"}, 15.0, False),
])
def test_written_keys_short_stages_and_gpus_keep_the_defaults(monkeypatch, written, minutes, cuda):
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: cuda)
    chosen, why = machine.pretrain_step_settings(written, minutes)
    assert chosen == {} and why


def test_the_speedrun_records_the_choice_and_a_resumed_stage_keeps_it(tmp_path, monkeypatch, capsys):
    import nanoseek.train.pretrain as pretraining
    from nanoseek.train.loop import FitResult

    seen = []

    def interrupted(cfg, resume=False, **kwargs):
        seen.append((cfg.train.compile, cfg.train.dtype))
        return FitResult(status="interrupted", step=3, tokens=1536, run_dir=cfg.train.out_dir)

    monkeypatch.setattr(pretraining, "pretrain", interrupted)
    monkeypatch.setattr(machine, "FAST_MINUTES", 0.1)             # --minutes 1: a 0.5-minute stage
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    args = ["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]
    assert main(args) == 130
    assert seen[-1] == (True, "float32")
    stage = next(s for s in json.loads((out / "run.json").read_text())["stages"] if s["name"] == "pretrain")
    assert stage["step_settings"] == {"compile": True}
    assert "the step: compiled" in capsys.readouterr().out
    monkeypatch.setattr(machine, "FAST_MINUTES", 60.0)            # the rule would now say eager: kept anyway
    assert main(args) == 130
    assert seen[-1] == (True, "float32")
    assert "(chosen when the stage started)" in capsys.readouterr().out
    # the recipe's word wins
    assert main(["speedrun", "--minutes", "1", "--out", str(tmp_path / "eager"), "--threads", "1",
                 "--set", "pretrain.train.compile=false"]) == 130
    assert seen[-1] == (False, "float32")


@pytest.mark.parametrize("bad", [["compile"], {"compile": True, "lr": 1.0}, "fast"])
def test_a_damaged_recorded_choice_is_one_line_naming_run_json(tmp_path, monkeypatch, capsys, bad):
    import nanoseek.train.pretrain as pretraining
    from nanoseek.train.loop import FitResult

    monkeypatch.setattr(pretraining, "pretrain", lambda cfg, resume=False, **kw: FitResult(
        status="interrupted", step=3, tokens=1536, run_dir=cfg.train.out_dir))
    out = tmp_path / "run"
    args = ["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]
    assert main(args) == 130
    run = json.loads((out / "run.json").read_text())
    next(s for s in run["stages"] if s["name"] == "pretrain")["step_settings"] = bad
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run.json: stages[pretrain].step_settings" in err and "Traceback" not in err
