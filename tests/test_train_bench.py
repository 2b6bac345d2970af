"""The training benchmark runs end to end (on the tiny preset, so it only checks the plumbing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config", "tiny",
                           "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "1", "--curve-steps", "3",
                           "--force-bf16", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio nanoseek / transformers" in proc.stdout and "top 15 operators" in proc.stdout
    res = json.loads(out.read_text())
    sides = {(r["side"], r["dtype"]) for r in res["runs"]}
    assert ("nanoseek", "float32") in sides and ("transformers[grouped_mm]", "float32") in sides
    assert res["ratio"] > 0 and "bf16_curve" in res


@pytest.mark.slow
def test_bench_train_small_smoke(tmp_path):
    out = tmp_path / "small.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_small.py"), "--threads", "1",
                           "--warmup", "0", "--steps", "2", "--no-compile", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(the same work)" in proc.stdout and "top operators by self time" in proc.stdout
    res = json.loads(out.read_text())
    assert {"before (foreach AdamW)", "eager", "eager, no MTP"} <= set(res["sides"])
    assert any(name.startswith("transformers[") for name in res["sides"]) and res["vs_transformers"] > 0
    eager = res["sides"]["eager"]
    assert eager["tokens_per_s"] > 0 and eager["max_loss_diff"] < 1e-3      # fused vs foreach AdamW: rounding
