"""The speedrun's pre-training step settings for this machine (nanoseek/speedrun_machine.py): what
the recipe writes wins, short stages and GPUs keep the trainer's defaults, a long CPU stage compiles
and adds bf16 autocast only where bf16 matmuls are native; the speedrun records the choice on the
stage and a resumed stage keeps it."""

from __future__ import annotations

import json

import pytest

import nanoseek.speedrun_machine as machine
import nanoseek.train.metrics as metrics
from nanoseek.cli import main


def _peaks(monkeypatch, fp32: float, bf16: float) -> list[str]:
    calls: list[str] = []

    def peak(device="cpu", dtype="float32", **kw):
        calls.append(dtype)
        return {"float32": fp32, "bfloat16": bf16}[dtype]

    monkeypatch.setattr(metrics, "measure_matmul_peak", peak)
    return calls


@pytest.mark.parametrize("fp32, bf16, want", [
    (100.0, 800.0, {"compile": True, "dtype": "bfloat16"}),      # AMX-like: native
    (100.0, 50.0, {"compile": True, "dtype": "bfloat16"}),       # exactly half: native
    (100.0, 5.0, {"compile": True}),                              # emulated: fp32, compiled
])
def test_a_long_cpu_stage_compiles_and_uses_bf16_only_where_native(monkeypatch, fp32, bf16, want):
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    _peaks(monkeypatch, fp32, bf16)
    chosen, why = machine.pretrain_step_settings({}, 15.0)
    assert chosen == want
    assert ("bf16 autocast" in why) == ("dtype" in want)


@pytest.mark.parametrize("written, minutes, cuda", [
    ({"compile": False}, 15.0, False),            # the recipe's word wins, whatever it is
    ({"dtype": "float32"}, 15.0, False),
    ({"compile": True}, 15.0, False),
    ({}, machine.FAST_MINUTES - 0.1, False),      # too short to win back compiling
    ({"device": "cuda"}, 15.0, False),            # not measured on GPUs
    ({}, 15.0, True),                             # "auto" on a machine with a GPU
    ({"device": "mps"}, 15.0, False),
])
def test_written_keys_short_stages_and_gpus_keep_the_defaults(monkeypatch, written, minutes, cuda):
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: cuda)
    calls = _peaks(monkeypatch, 100.0, 800.0)
    chosen, why = machine.pretrain_step_settings(written, minutes)
    assert chosen == {} and why
    assert calls == []                            # nothing measured when nothing is to decide


def test_the_speedrun_records_the_choice_and_a_resumed_stage_keeps_it(tmp_path, monkeypatch, capsys):
    import nanoseek.train.pretrain as pretraining
    from nanoseek.train.loop import FitResult

    seen = []

    def interrupted(cfg, resume=False, **kwargs):
        seen.append((cfg.train.compile, cfg.train.dtype, resume))
        return FitResult(status="interrupted", step=3, tokens=1536, run_dir=cfg.train.out_dir)

    monkeypatch.setattr(pretraining, "pretrain", interrupted)
    monkeypatch.setattr(machine, "FAST_MINUTES", 0.1)             # --minutes 1: a 0.5-minute stage
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    _peaks(monkeypatch, 100.0, 800.0)
    out = tmp_path / "run"
    args = ["speedrun", "--minutes", "1", "--out", str(out), "--threads", "1"]
    assert main(args) == 130
    assert seen[-1][:2] == (True, "bfloat16")
    stage = next(s for s in json.loads((out / "run.json").read_text())["stages"] if s["name"] == "pretrain")
    assert stage["step_settings"] == {"compile": True, "dtype": "bfloat16"}
    assert "the step: compiled, bf16 autocast" in capsys.readouterr().out
    _peaks(monkeypatch, 100.0, 5.0)                               # the machine now says emulated: kept anyway
    assert main(args) == 130
    assert seen[-1][:2] == (True, "bfloat16")
    assert "(chosen when the stage started)" in capsys.readouterr().out
    # the recipe's word wins
    assert main(["speedrun", "--minutes", "1", "--out", str(tmp_path / "eager"), "--threads", "1",
                 "--set", "pretrain.train.compile=false"]) == 130
    assert seen[-1][:2] == (False, "float32")
