"""The GRPO benchmark runs end to end (a tiny step, so it only checks the plumbing: phases timed on
both sides, the prompt ids of the two sides checked equal, the ratio printed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--threads", "1", "--prompts", "2", "--group", "2", "--max-new", "4", "--micro-batch", "2",
        "--warmup", "1", "--steps", "1", "--pool", "8"]


def run(*extra: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), *TINY, *extra],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_grpo_nanoseek_side():
    out = run("--nanoseek-only")
    for phase in ("rollout", "scoring", "prep", "update", "step"):
        assert any(line.startswith(phase) for line in out.splitlines()), out


@pytest.mark.slow
def test_bench_grpo_against_trl():
    pytest.importorskip("trl")
    out = run()
    assert "GRPO step: nanoseek" in out and "x\n" in out, out
