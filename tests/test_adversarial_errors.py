"""One-line errors everywhere: every user mistake exits 2 with one line naming the file, flag or field.

The CLI runs in-process (``nanoseek.cli.main``) with pytest's capsys. Classes covered:

* damaged checkpoints: a truncated / empty / missing / padded ``model.safetensors``, a broken
  ``config.json`` or index, for inference; for training, a deleted or truncated optimizer state
  (``trainer_state.safetensors`` / ``.json``), a deleted checkpoint, a foreign trainer state; each
  error says which older checkpoint is intact and how to resume (``--resume-from``), which works;
* resuming against different data;
* every numeric flag of every subcommand (found by walking the parsers) refuses -1, nan and
  text; every numeric field of the training and model configs refuses out-of-range values;
  seeds are checked against what torch accepts (0..2**64-1);
* memory-sized values (``--max-seq-len 100000000``, a huge micro-batch, a huge model) are refused
  before anything is allocated, naming the flag or key;
* ``--output`` naming a folder, non-UTF-8 input files and stdin (file and byte offset named),
  ``demo --config nosuch``, ``--batch-size 0``, ``--shard-tokens 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import typing

import pytest

from conftest import make_tiny_model
from nanoseek import limits
from nanoseek.cli import UserError, build_parser, main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model.checkpoint import CheckpointError, save_pretrained

CORPUS = ["Hello world! What is 2 + 2? The answer is 4. Numbers 0123456789.", "héllo wörld 🙂 chat."] * 10
RUN_SETS = ["--set", "train.max_steps=4", "--set", "train.save_every=2", "--set", "train.eval_every=0",
            "--set", "data.val_batches=1"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of ``nanoseek ARGV`` run in-process."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An HF checkpoint directory with its tokenizer."""
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    d = tmp_path_factory.mktemp("hf") / "model"
    save_pretrained(make_tiny_model(seed=0, vocab_size=tok.vocab_size).eval(), d)
    tok.save(d)
    return d


@pytest.fixture
def damaged(hf_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    return d


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step tiny pre-training run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(run), "--quiet", "--no-progress", *RUN_SETS]) == 0
    assert (run / "checkpoints" / "step-000002").is_dir() and (run / "checkpoints" / "step-000004").is_dir()
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ---------------------------------------------------------------------------- damaged model weights
def _truncate(path, n):
    data = path.read_bytes()
    path.write_bytes(data[:n] if n >= 0 else data[:len(data) + n])


DAMAGE = {
    "truncated": lambda d: _truncate(d / "model.safetensors", 100),
    "cut_tail": lambda d: _truncate(d / "model.safetensors", -100),
    "empty": lambda d: (d / "model.safetensors").write_bytes(b""),
    "missing": lambda d: (d / "model.safetensors").unlink(),
    "padded": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b"\0" * 64),
    "garbage_header": lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b'{"a": 1}'),
    "config_json": lambda d: (d / "config.json").write_text("{"),
    "config_not_utf8": lambda d: (d / "config.json").write_bytes(b'{"vocab_size": \xff}'),
    "bad_index": lambda d: (d / "model.safetensors.index.json").write_text("[1, 2"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(damaged, capsys, kind):
    DAMAGE[kind](damaged)
    rc, err = run_cli(capsys, "generate", "--model", damaged, "--prompt", "x", "--max-new-tokens", "1")
    line = one_line(err)
    assert rc == 2 and str(damaged) in line, line


def test_checkpoint_errors_are_user_errors():
    from nanoseek.errors import ConfigError
    from nanoseek.train.checkpoint import CheckpointError as TrainCheckpointError
    from nanoseek.train.loop import TrainingDiverged

    for cls in (CheckpointError, TrainCheckpointError, ConfigError, TrainingDiverged, limits.LimitError):
        assert issubclass(cls, UserError), cls


# ---------------------------------------------------------------------------- damaged training checkpoints
STATE_DAMAGE = {
    "optimizer_state_deleted": lambda c: (c / "trainer_state.safetensors").unlink(),
    "optimizer_state_truncated": lambda c: _truncate(c / "trainer_state.safetensors", 50),
    "optimizer_state_empty": lambda c: (c / "trainer_state.safetensors").write_bytes(b""),
    "state_json_truncated": lambda c: _truncate(c / "trainer_state.json", 50),
    "state_json_deleted": lambda c: (c / "trainer_state.json").unlink(),
    "state_json_foreign": lambda c: (c / "trainer_state.json").write_text("{}"),
    "state_json_not_object": lambda c: (c / "trainer_state.json").write_text("[1]"),
    "weights_truncated": lambda c: _truncate(c / "model.safetensors", 100),
    "weights_deleted": lambda c: (c / "model.safetensors").unlink(),
    "checkpoint_deleted": lambda c: shutil.rmtree(c),
}


@pytest.mark.parametrize("kind", list(STATE_DAMAGE))
def test_damaged_training_checkpoint_names_the_intact_one(run_copy, capsys, kind):
    STATE_DAMAGE[kind](run_copy / "checkpoints" / "step-000004")
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--out-dir", run_copy, "--resume", "--quiet",
                      "--no-progress", *RUN_SETS)
    line = one_line(err)
    older = run_copy / "checkpoints" / "step-000002"
    assert rc == 2 and "step-000004" in line and f"{older} is intact" in line and f"--resume-from {older}" in line


def test_loading_a_damaged_step_for_inference_names_the_intact_one(run_copy):
    from nanoseek.model.checkpoint import from_pretrained

    _truncate(run_copy / "checkpoints" / "step-000004" / "model.safetensors", -10)
    older = run_copy / "checkpoints" / "step-000002"
    with pytest.raises(CheckpointError, match=f"{older} is intact: load it with --model {older}"):
        from_pretrained(run_copy / "checkpoints" / "step-000004")


def test_the_named_checkpoint_resumes(run_copy, capsys):
    _truncate(run_copy / "checkpoints" / "step-000004" / "trainer_state.safetensors", 50)
    older = run_copy / "checkpoints" / "step-000002"
    rc = main(["pretrain", "--config", "tiny", "--out-dir", str(run_copy), "--resume-from", str(older), "--quiet",
               "--no-progress", *RUN_SETS[:2], "--set", "train.max_steps=5", *RUN_SETS[2:]])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((run_copy / "checkpoints" / "step-000005" / "trainer_state.json").read_text())["step"] == 5


def test_no_intact_checkpoint_says_so(run_copy, capsys):
    for step in ("step-000002", "step-000004"):
        _truncate(run_copy / "checkpoints" / step / "model.safetensors", 100)
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--out-dir", run_copy, "--resume", "--quiet", *RUN_SETS)
    assert rc == 2 and "no older intact checkpoint" in one_line(err)


def test_resume_from_a_missing_checkpoint(run_copy, capsys):
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--out-dir", run_copy, "--resume-from",
                      run_copy / "checkpoints" / "step-000099", *RUN_SETS)
    assert rc == 2 and "--resume-from" in one_line(err)


def test_resuming_against_different_data(run_copy, capsys):
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--out-dir", run_copy, "--resume", "--quiet",
                      *RUN_SETS, "--set", "train.seed=7")
    line = one_line(err)
    assert rc == 2 and "other data" in line and "step-000004" in line


# ---------------------------------------------------------------------------- every numeric flag
def _numeric_actions(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_actions(sub, prefix + (name,))
        elif action.option_strings and action.type is not None and action.type not in (str,) \
                and getattr(action.type, "__name__", "") in ("int", "float"):
            yield prefix, action


NUMERIC = list(_numeric_actions(build_parser()))


def test_no_numeric_flag_is_a_bare_int_or_float():
    bare = [f"{' '.join(p)} {a.option_strings[-1]}" for p, a in NUMERIC if a.type in (int, float)]
    assert not bare, f"numeric flags without a checked range (use nanoseek.limits types): {bare}"
    assert len(NUMERIC) > 60


@pytest.mark.parametrize("value", ["-1", "nan", "abc", "inf"])
def test_every_numeric_flag_refuses_out_of_range_values(capsys, value):
    failures = []
    for prefix, action in NUMERIC:
        flag = action.option_strings[-1]
        if value in ("nan", "inf") and action.type.__name__ == "int":
            value_here = "1.5"       # an int flag: a float is the analogous mistake
        else:
            value_here = value
        rc = main([*prefix, f"{flag}={value_here}"])
        err = capsys.readouterr().err
        if rc != 2 or flag not in err or len(err.strip().splitlines()) != 1:
            failures.append((" ".join(prefix), flag, value_here, rc, err[:120]))
    assert not failures, failures


def test_zero_sizes_are_refused(capsys):
    for argv, flag in ((["generate", "--model", "x", "--batch-size", "0"], "--batch-size"),
                       (["eval", "--model", "x", "--batch-size", "0"], "--batch-size"),
                       (["ablate", "--batch-size", "0"], "--batch-size"),
                       (["data", "prepare", "--shard-tokens", "0"], "--shard-tokens")):
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and flag in one_line(err)


def test_seeds_cover_exactly_what_torch_accepts(capsys):
    import torch

    saved = torch.random.get_rng_state()
    try:
        torch.manual_seed(limits.SEED_MAX)              # the top of the range is valid for torch
        with pytest.raises((RuntimeError, ValueError)):
            torch.manual_seed(limits.SEED_MAX + 1)
    finally:
        torch.random.set_rng_state(saved)
    parser = build_parser()
    assert parser.parse_args(["generate", "--model", "x", "--seed", str(limits.SEED_MAX)]).seed == limits.SEED_MAX
    for bad in ("-1", str(limits.SEED_MAX + 1), "99999999999999999999999"):
        rc, err = run_cli(capsys, "generate", "--model", "x", "--seed", bad)
        assert rc == 2 and "--seed" in one_line(err)
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--set", "train.seed=-1")
    assert rc == 2 and "seed" in one_line(err)


@pytest.mark.parametrize("args", [["generate", "--model", "x", "--prompt", "hi"], ["eval", "--model", "x"],
                                  ["serve", "--model", "x"]], ids=["generate", "eval", "serve"])
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "foo", "cpu:x"])
def test_a_device_this_machine_lacks_is_one_line(capsys, args, device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    rc, err = run_cli(capsys, *args, "--device", device)
    assert rc == 2 and "--device" in one_line(err) and "Traceback" not in err


def test_a_train_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--set", "train.device=cuda", "--set",
                      "train.max_steps=1", "--out-dir", str(tmp_path / "r"), "--no-progress")
    assert rc == 2 and "[train] device = 'cuda'" in one_line(err)


def test_argparse_errors_are_one_line(capsys):
    rc, err = run_cli(capsys, "generate")
    assert rc == 2 and "--model" in one_line(err)
    rc, err = run_cli(capsys, "generate", "--model", "x", "--no-such-flag")
    assert rc == 2 and "--no-such-flag" in one_line(err)


# ---------------------------------------------------------------------------- config ranges
def _config_cases():
    from nanoseek.train.config import SECTIONS

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            if int in kinds:
                yield section, f.name, "-1"
                yield section, f.name, "99999999999999999999999"     # past int64 (a seed: past 2**64 - 1)
            if float in kinds:
                yield section, f.name, "nan"
                yield section, f.name, "-inf"


CONFIG_CASES = list(_config_cases())


def test_every_numeric_train_config_key_has_a_range():
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import load_config

    assert len(CONFIG_CASES) > 30
    failures = []
    for section, key, value in CONFIG_CASES:
        try:
            load_config("tiny", [f"{section}.{key}={value}"])
            failures.append((section, key, value, "accepted"))
        except ConfigError as e:
            if key not in str(e):
                failures.append((section, key, value, str(e)))
    assert not failures, failures


def test_every_numeric_model_config_field_has_a_range(tiny_config):
    from nanoseek.errors import ConfigError
    from nanoseek.model.config import ModelConfig

    base = tiny_config().to_dict()
    failures = []
    for f in dataclasses.fields(ModelConfig):
        v = base.get(f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for bad in ((-1, 2**40) if isinstance(v, int) else (float("nan"), float("inf"), -1.0)):
            try:
                ModelConfig.from_dict({**base, f.name: bad})
                failures.append((f.name, bad))
            except ConfigError as e:
                assert f.name in str(e)
    assert not failures, failures


def test_a_huge_layer_count_is_refused_without_looping_over_it(tiny_config):
    import time

    from nanoseek.errors import ConfigError
    from nanoseek.model.config import ModelConfig

    t0 = time.perf_counter()
    for name in ("num_hidden_layers", "n_routed_experts", "num_nextn_predict_layers"):
        with pytest.raises(ConfigError, match=name):
            ModelConfig.from_dict({**tiny_config().to_dict(), name: 2**31 - 1})
    assert time.perf_counter() - t0 < 1


# ---------------------------------------------------------------------------- memory-sized values
@pytest.fixture
def little_memory(monkeypatch):
    """Pretend 1 GiB is free, so the checks are exercised the same on any machine; and make the
    allocating steps fail loudly, so a missing check can never start a 256 GB allocation."""
    import nanoseek.infer.engine
    import nanoseek.train.pretrain

    def must_not_run(*args, **kwargs):
        raise AssertionError("the memory check should have refused this before allocating")

    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": 1 << 30)
    monkeypatch.setattr(nanoseek.infer.engine, "Engine", must_not_run)
    monkeypatch.setattr(nanoseek.train.pretrain, "pretrain", must_not_run)


def test_huge_max_seq_len_is_refused_before_allocating(hf_dir, capsys, little_memory):
    rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--prompt", "x", "--max-seq-len", "100000000")
    line = one_line(err)
    assert rc == 2 and "--max-seq-len" in line and "GiB" in line


def test_huge_training_batch_and_model_are_refused(capsys, little_memory):
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--set", "optim.micro_batch_size=100000")
    assert rc == 2 and "micro_batch_size" in one_line(err)
    rc, err = run_cli(capsys, "pretrain", "--config", "tiny", "--set", "model.vocab_size=100000000")
    assert rc == 2 and "[model]" in one_line(err)


def test_demo_with_a_model_too_big_for_memory(capsys, tmp_path, little_memory, monkeypatch):
    import nanoseek.model.transformer

    def must_not_build(*args, **kwargs):
        raise AssertionError("the memory check should have refused this model before building it")

    monkeypatch.setattr(nanoseek.model.transformer, "DeepseekV3ForCausalLM", must_not_build)
    rc, err = run_cli(capsys, "demo", "--config", "deepseek-v3", "--out", tmp_path / "d")   # 671B parameters
    assert rc == 2 and "--config" in one_line(err) and "parameters" in err
    assert not (tmp_path / "d").exists()


def test_memory_is_read_from_the_system():
    free = limits.available_memory_bytes()
    assert free is None or free > 0
    with pytest.raises(limits.LimitError, match="--x"):
        limits.check_fits(1 << 62, "a test allocation", "--x")


# ---------------------------------------------------------------------------- files and text
def test_output_pointing_at_a_folder(hf_dir, tmp_path, capsys):
    rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--prompt", "x", "--output", tmp_path)
    assert rc == 2 and "--output" in one_line(err)


def test_non_utf8_input_file_names_file_and_offset(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nab\xffcd\n")
    rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--input", bad)
    line = one_line(err)
    assert rc == 2 and str(bad) in line and "byte offset 12" in line


def test_non_utf8_stdin_names_stdin_and_offset(hf_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xffcd\n"), encoding="utf-8"))
    rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--input", "-")
    line = one_line(err)
    assert rc == 2 and "<stdin>" in line and "byte offset 2" in line


def test_non_utf8_command_line_text_names_the_flag(hf_dir, capsys):
    bad = b"ab\xffc".decode("utf-8", "surrogateescape")          # what Python makes of such an argv
    for argv, flag in ((["--prompt", bad], "--prompt"), (["--prompt", "x", "--chat", "--system", bad], "--system"),
                       (["--prompt", "x", "--stop", bad], "--stop")):
        rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--max-new-tokens", "1", *argv)
        line = one_line(err)
        assert rc == 2 and flag in line and "byte offset 2" in line, line


def test_non_utf8_chat_data_names_file_line_and_offset(tmp_path):
    from nanoseek.post.datasets import DataError, iter_jsonl

    bad = tmp_path / "chat.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"chat.jsonl:2: not UTF-8 .* byte offset 16"):
        list(iter_jsonl(bad))


def test_non_utf8_or_folder_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[train]\nmax_steps = \xff\n")
    rc, err = run_cli(capsys, "pretrain", "--config", bad)
    assert rc == 2 and str(bad) in one_line(err) and "byte offset 20" in err
    (tmp_path / "dir.toml").mkdir()
    rc, err = run_cli(capsys, "pretrain", "--config", tmp_path / "dir.toml")
    assert rc == 2 and "dir.toml" in one_line(err)


def test_demo_with_an_unknown_config(capsys, tmp_path):
    rc, err = run_cli(capsys, "demo", "--config", "nosuch", "--out", tmp_path / "d")
    assert rc == 2 and "nosuch" in one_line(err)


def test_input_that_is_a_folder_or_missing(hf_dir, tmp_path, capsys):
    for path in (tmp_path, tmp_path / "missing.txt"):
        rc, err = run_cli(capsys, "generate", "--model", hf_dir, "--input", path)
        assert rc == 2 and "--input" in one_line(err)
