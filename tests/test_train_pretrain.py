"""`nanoseek pretrain` end to end: real token shards, bits per byte, MFU, the run folder and the CLI."""

from __future__ import annotations

import importlib
import json
import math
import tomllib

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.corpus import plain_text_documents
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.train.bpb import token_byte_lengths
from nanoseek.errors import ConfigError
from nanoseek.model.config import ModelConfig
from nanoseek.train.config import config_from_dict
from nanoseek.train.metrics import (MetricsLogger, ProgressDisplay, events, measure_matmul_peak, model_flops_per_token,
                                    progress_enabled, read_metrics, step_records)
from nanoseek.train.pretrain import pretrain

from train_helpers import prepare_prose_shards

SMALL = ["--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2", "--set", "model.q_lora_rank=16",
         "--set", "model.kv_lora_rank=16", "--set", "model.moe_intermediate_size=16", "--set", "optim.seq_len=16",
         "--set", "optim.micro_batch_size=2", "--set", "optim.grad_accum=1", "--set", "data.val_batches=1",
         "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Real shards from `nanoseek data prepare` (a 300-token BPE trained on the built-in prose)."""
    return prepare_prose_shards(tmp_path_factory.mktemp("data"))


def test_token_bytes_count_utf8_exactly(data_dir):
    tok = Tokenizer.load(data_dir / "tokenizer")
    tb = token_byte_lengths(tok)
    for text in ["héllo wörld 日本語 🙂 12345\n\ttabs", plain_text_documents()[0].text]:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert int(tb[tok.bos_id]) == 0


def test_pretrain_on_real_shards_writes_the_run_folder(data_dir, tmp_path):
    raw = {"model": {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "q_lora_rank": 16,
                     "kv_lora_rank": 16, "moe_intermediate_size": 16},
           "data": {"source": "packed", "dir": str(data_dir), "val_batches": 2},
           "optim": {"micro_batch_size": 2, "seq_len": 32, "warmup_steps": 1},
           "train": {"max_steps": 3, "eval_every": 2, "save_every": 2, "out_dir": str(tmp_path / "run")}}
    res = pretrain(config_from_dict(raw, "t"), progress=False, quiet=True)
    run = tmp_path / "run"
    assert res.status == "done" and res.step == 3 and res.tokens == 3 * 2 * 32
    # the model's vocab follows the tokenizer's, and it is recorded in the resolved config
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["model"]["vocab_size"] == 300 and resolved["data"]["dir"] == str(data_dir)
    final = json.loads((run / "final" / "config.json").read_text())
    assert final["vocab_size"] == 300
    assert (run / "final" / "tokenizer.json").read_text() == (data_dir / "tokenizer" / "tokenizer.json").read_text()
    assert (run / "final" / "tokenizer_config.json").exists()
    recs = read_metrics(run)
    steps = step_records(recs)
    assert sorted(steps) == [1, 2, 3]
    r = steps[3]
    for key in ("loss", "ce", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio", "bias_range"):
        assert key in r, key
    assert len(r["maxvio"]) == len(r["bias_range"]) == 2                     # tiny: 3 layers, the first dense
    assert r["loss"] == pytest.approx(r["ce"] + 0.3 * r["mtp_loss"] + r["aux_loss"], rel=1e-5)
    assert r["bias_range"][0] > 0                                             # the aux-loss-free bias moved
    fpt = model_flops_per_token(ModelConfig.from_json(run / "final" / "config.json"), 32)
    # validation: loss and bits per byte; bpb = nats / ln 2 / UTF-8 bytes of the target tokens
    evs = events(recs, "eval")
    assert [e["step"] for e in evs] == [2, 3]
    # MFU of step 3 uses the best peak seen so far (start-up and the step-2 re-measurement)
    peak = evs[0]["peak_flops"]
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / peak, rel=1e-6) and 0 < r["mfu"] < 1
    assert evs[1]["peak_flops"] >= peak > 1e6                                 # the peak never goes down
    e = evs[-1]
    from nanoseek.data.loader import PackedLoader
    tok = Tokenizer.load(data_dir / "tokenizer")
    val = PackedLoader(data_dir, "val", 2, 32, shuffle=False, infinite=False)
    n_bytes = sum(len(tok.decode(y.flatten().tolist(), skip_special_tokens=True).encode()) for _, y, _ in
                  (next(val) for _ in range(2)))
    assert e["val_tokens"] == 2 * 2 * 32
    assert e["val_bpb"] == pytest.approx(e["val_loss"] * e["val_tokens"] / math.log(2) / n_bytes, rel=0.02)
    assert 0 < e["val_loss"] < math.log(300) + 1


def test_cli_runs_refuses_to_clobber_resumes_and_reports_bad_keys(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["pretrain", "--config", "tiny", "--out-dir", out, "--set", "train.max_steps=2", *SMALL]) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert main(["pretrain", "--config", "tiny", "--out-dir", out, *SMALL]) == 2
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err
    # continue from the folder's own config.toml, asking for one more step
    assert main(["pretrain", "--out-dir", out, "--resume", "--set", "train.max_steps=3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "changed settings: train.max_steps" in text and "done: step 3" in text
    assert (tmp_path / "cli" / "config.previous.toml").exists()
    assert [e["event"] for e in events(read_metrics(out)) if e["event"] in ("start", "resume", "done")] == \
        ["start", "done", "resume", "done"]
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(tmp_path / "x"), "--set", "optim.lrate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrate' in [optim]" in err and "min_lr" in err
    assert main(["pretrain", "--out-dir", str(tmp_path / "nothing"), "--resume"]) == 2


def test_metrics_logger_peak_and_progress(tmp_path, capsys, monkeypatch):
    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "loss": torch.tensor(2.5), "maxvio": [0.1, 0.2], "x": float("nan")})
    log.event("eval", step=1, val_loss=2.0)
    log.log({"step": 1, "loss": 2.25})                   # a re-done step (after a resume) wins
    log.close()
    recs = read_metrics(tmp_path)
    assert recs[0] == {"step": 1, "loss": 2.5, "maxvio": [0.1, 0.2], "x": "nan"}
    assert step_records(recs) == {1: {"step": 1, "loss": 2.25}} and events(recs, "eval")[0]["val_loss"] == 2.0
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, tensorboard=True)
    state = torch.get_rng_state()
    assert measure_matmul_peak("cpu", "float32", n=128, seconds=0.01) > 1e6
    assert torch.equal(torch.get_rng_state(), state)          # the peak measurement leaves the RNG alone
    with ProgressDisplay("run", log_every=2, enabled=False) as bar:
        for s in (1, 2):
            bar.update(s, s / 4, 3.0, 1000.0)
    out = capsys.readouterr().out
    assert "step 2  loss 3.0000  1,000 tok/s" in out and "step 1 " not in out and "50.0%" in out
    with ProgressDisplay("run", enabled=True) as bar:         # rich, rendering to a non-terminal
        bar.update(1, 0.5, 3.0, 10.0)
    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    assert progress_enabled() is False


@pytest.mark.parametrize("name", ["null", "none", "'quoted'", "2024-01-01", "123", "true", "nl\nx", "a\"b"])
def test_out_dir_is_the_folder_named_literally(tmp_path, monkeypatch, name):
    """--out-dir was appended to the overrides unquoted and read as TOML: "null" trained into the
    config's own folder, "'quoted'" into ./quoted, a date or a number was refused blaming the
    shipped config, "" was ignored. The folder is now exactly the string given."""
    from nanoseek.train.config import parse_literal, toml_string

    monkeypatch.chdir(tmp_path)
    assert parse_literal(toml_string(name)) == name
    assert main(["pretrain", "--config", "tiny", "--out-dir", name, "--set", "train.max_steps=1", *SMALL]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name / "final").is_dir()


def test_an_empty_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "tiny", "--out-dir", "", "--set", "train.max_steps=1", *SMALL]) == 2
    assert "--out-dir: an empty path" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_the_same_command_again_is_refused_without_claiming_other_settings(tmp_path, capsys):
    """On packed data the run records the tokenizer's vocab_size in its config.toml; the identical
    command again was told "it was made with other settings: model.vocab_size"."""
    data = tmp_path / "data"
    assert main(["data", "prepare", "--default-corpus", "--task-docs", "200", "--vocab-size", "300",
                 "--out", str(data)]) == 0
    cmd = ["pretrain", "--config", "tiny", "--out-dir", str(tmp_path / "r"), "--set", "data.source=packed",
           "--set", f"data.dir={data}", "--set", "train.max_steps=1", *SMALL]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "other settings" not in err
    assert main([*cmd, "--set", "optim.lr=0.5"]) == 2
    assert "other settings: optim.lr" in capsys.readouterr().err
