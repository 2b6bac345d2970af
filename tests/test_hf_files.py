"""The HF checkpoint files every model family shares (nanoseek/model/hf_files.py), checked for each
family through the model registry: an interrupted sharded save leaves the previous checkpoint
whole, a save keeps the folder's other files and drops stale shards, a cut shard of a run's step
folder is one line naming the older intact step, a V3 folder never loads as V4 (or back) and
reading any family's config imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.model import hf_files, registry
from nanoseek.model.v4.config import DeepseekV4Config

from conftest import make_tiny_model
from v4_helpers import BASE, CASES


def _v3(seed: int):
    return make_tiny_model(seed=seed)


def _v4(seed: int):
    torch.manual_seed(seed)
    cfg = DeepseekV4Config.from_dict({**BASE, **CASES["all_kinds_hc2"][0], "num_nextn_predict_layers": 1})
    return registry.build_model(cfg)


FAMILIES = {"v3": _v3, "v4": _v4}


def _same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_interrupted_sharded_save_keeps_the_previous_checkpoint(family, tmp_path, monkeypatch):
    old, new = FAMILIES[family](0), FAMILIES[family](1)
    d = tmp_path / "ck"
    registry.save_pretrained(old, d, max_shard_bytes=20_000)
    (d / "tokenizer.json").write_text("{}")                     # a file the save does not write
    before = sorted(p.name for p in d.iterdir())
    assert len([n for n in before if n.startswith("model-")]) > 2
    real_save, calls = hf_files.save_file, {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(hf_files, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        registry.save_pretrained(new, d, max_shard_bytes=20_000)
    assert calls["n"] == 2                                      # it failed mid-save, after writing a shard
    assert sorted(p.name for p in d.iterdir()) == before        # nothing half-written, no stale temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _same(registry.from_pretrained(d), old)
    monkeypatch.setattr(hf_files, "save_file", real_save)
    registry.save_pretrained(new, d)                            # one file now: the old shards and index go
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    _same(registry.from_pretrained(d), new)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_shard_names_the_older_intact_step(family, tmp_path):
    run = tmp_path / "run" / "checkpoints"
    model = FAMILIES[family](0)
    for step in (2, 4):
        registry.save_pretrained(model, run / f"step-{step:06d}")
    f = run / "step-000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(hf_files.CheckpointError) as e:
        registry.from_pretrained(run / "step-000004")
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors: not a readable safetensors file" in msg
    assert f"the older checkpoint {run / 'step-000002'} is intact" in msg
    (run / "step-000002" / "config.json").write_text("{")        # no intact one left: said so
    with pytest.raises(hf_files.CheckpointError, match="no older intact checkpoint"):
        registry.from_pretrained(run / "step-000004")


def test_one_family_never_loads_as_the_other(tmp_path):
    registry.save_pretrained(_v4(0), tmp_path / "v4")
    registry.save_pretrained(_v3(0), tmp_path / "v3")
    from nanoseek.model import checkpoint as v3_checkpoint
    from nanoseek.model.v4 import checkpoint as v4_checkpoint

    with pytest.raises(hf_files.CheckpointError, match="deepseek_v4.*not supported here"):
        v3_checkpoint.from_pretrained(tmp_path / "v4")
    with pytest.raises(hf_files.CheckpointError, match="model_type 'deepseek_v3' is not 'deepseek_v4'"):
        v4_checkpoint.from_pretrained(tmp_path / "v3")


def test_reading_any_familys_config_imports_no_torch(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps(_v4(0).config.to_dict()))
    code = ("import sys\nfrom nanoseek.model import registry\n"
            f"for c in ('tiny', 'v32-tiny', 'v4-tiny', 'deepseek-v4-pro', {str(tmp_path / 'ck')!r}):\n"
            "    registry.load_config(c)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
