"""TensorBoard and offline W&B read the numbers a training run logs (``train/metrics.py``).

One tiny pre-training run with ``train.tensorboard = true`` and ``train.wandb_project`` set under
``WANDB_MODE=offline``; TensorBoard's own ``EventAccumulator`` reads ``RUN/tensorboard`` and the
offline W&B run file (``RUN/wandb/offline-run-*/run-*.wandb``, a LevelDB-style record log of
W&B's protobuf records) is decoded with W&B's own protobuf classes; both must hold every step's
loss exactly as ``metrics.jsonl`` does. Without an API key and not offline, W&B is one line.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.train.metrics import read_metrics, step_records

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_SILENT": "true", "NANOSEEK_NO_PROGRESS": "1", **extra}
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        if key not in extra:
            env.pop(key, None)
    return env


def _pretrain(tmp_path: Path, run: str, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--config", "tiny", "--out-dir", run,
           "--set", "train.max_steps=5", "--set", "train.log_every=1"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB log blocks of 32 KiB,
    each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:           # zero padding up to the end of the block
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def test_tensorboard_and_offline_wandb_hold_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb.proto import wandb_internal_pb2

    p = _pretrain(tmp_path, "run", _env(tmp_path, WANDB_MODE="offline"),
                  "train.tensorboard=true", "train.wandb_project=nanoseek-test")
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "run"
    losses = {s: r["loss"] for s, r in step_records(read_metrics(run)).items() if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5]

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb.keys() == losses.keys()
    assert all(abs(tb[s] - losses[s]) <= 1e-6 * abs(losses[s]) for s in losses)   # float32 in the event file

    assert not (tmp_path / "wandb").exists()           # W&B writes inside the run folder, not the cwd
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = {}
    for raw in _wandb_records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if "train/loss" in items:
                history[int(items["_step"])] = float(items["train/loss"])
    assert history == pytest.approx(losses, rel=1e-12)


def test_wandb_without_a_key_is_one_line(tmp_path):
    pytest.importorskip("wandb")
    p = _pretrain(tmp_path, "run", _env(tmp_path), "train.wandb_project=nanoseek-test")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "wandb_project" in lines[0] and "WANDB_MODE=offline" in lines[0]
