"""`nanoseek watch`: one frame of the dashboard, and the incremental tail of metrics.jsonl."""

from __future__ import annotations

import json

from eval_helpers import make_synthetic_run, write_metrics
from nanoseek.cli import main
from nanoseek.eval.runs import Stage
from nanoseek.eval.watch_cli import StageTail, sparkline


def test_watch_once_shows_every_stage(tmp_path, capsys):
    root = make_synthetic_run(tmp_path, status="running")
    assert main(["watch", str(root), "--once", "--width", "220"]) == 0
    out = capsys.readouterr().out
    for text in ("synthetic", "status: running", "pretrain", "sft", "grpo", "MaxVio", "reward"):
        assert text in out
    rows = {name: line for line in out.splitlines() for name in ("pretrain", "sft", "grpo") if f"│ {name} " in line}
    assert "done" in rows["pretrain"] and " 40 " in rows["pretrain"]
    assert "1.5768" in rows["pretrain"] and "1.1000" in rows["pretrain"]     # last val loss and bpb
    assert "9.04K" in rows["pretrain"] and "5.0%" in rows["pretrain"]        # tokens/s and MFU
    assert "0.190" in rows["pretrain"]                                        # worst layer MaxVio at step 40
    assert "92%" in rows["grpo"] and "0.700" in rows["grpo"]                  # accuracy 12/13, reward
    assert "done" in rows["sft"]                                              # run.json's stage status
    assert any(c in rows["pretrain"] for c in "▁▂▃▄▅▆▇█")
    assert "grpo: step 12" in out                                             # detail panel of the last stage


def test_watch_waits_for_an_empty_run_and_rejects_a_missing_one(tmp_path, capsys):
    assert main(["watch", str(tmp_path), "--once"]) == 0
    assert "waiting for stages" in capsys.readouterr().out
    assert main(["watch", str(tmp_path / "nope"), "--once"]) == 2


def test_tail_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [{"step": s, "loss": 4.0 - s, "maxvio": [0.5, 0.25]} for s in (1, 2, 3)])
    tail = StageTail(Stage("pretrain", tmp_path))
    tail.poll()
    assert tail.last["step"] == 3 and list(tail.curves["loss"]) == [3.0, 2.0, 1.0]
    with path.open("a") as fh:
        fh.write(json.dumps({"event": "eval", "step": 3, "val_loss": 1.5}) + "\n")
        fh.write(json.dumps({"step": 4, "loss": 0.5}) + "\n" + '{"step": 5, "lo')
    tail.poll()
    assert tail.last["step"] == 4 and tail.val["val_loss"] == 1.5 and tail.counts == {"eval": 1}
    with path.open("a") as fh:
        fh.write('ss": 0.25}\n' + json.dumps({"event": "done", "step": 5}) + "\n")
    tail.poll()
    assert tail.last["step"] == 5 and list(tail.curves["loss"])[-1] == 0.25 and tail.status(0) == "done"


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([2.0, 2.0]) == "▄▄"
    assert sparkline([1.0, float("nan"), 3.0], width=5) == "▁█"
    assert sparkline([]) == ""
