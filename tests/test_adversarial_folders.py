"""Adversarial tests: output folders are sacred (issue 17, classes 1 and 2).

Class 1, nothing lost: no command removes or overwrites a file it did not write; a non-empty
folder that is not the command's own run is refused with one line naming the folder and the
flag; a replace (``--overwrite``, saving over ``final/``) checks every input first and swaps
the finished result in, so a failure leaves the old result intact.
Class 2, nothing forged: a run folder is locked for the life of the process (a second writer is
refused, a killed holder releases it), and a finished run re-run with other settings is refused
with the differing keys named, so run.json / report.md never misstate how a model was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanoseek.atomic import ReplaceRefused, replace_dir
from nanoseek.cli import main
from nanoseek.model.checkpoint import CheckpointError, from_pretrained, save_pretrained
from nanoseek.outdir import LOCK_NAME, OutputDirError, claim, read_owner

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2", "--set", "model.q_lora_rank=16",
         "--set", "model.kv_lora_rank=16", "--set", "model.moe_intermediate_size=16", "--set", "optim.seq_len=16",
         "--set", "optim.micro_batch_size=2", "--set", "optim.grad_accum=1", "--set", "data.val_batches=1",
         "--set", "train.max_steps=2", "--no-progress", "--quiet"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def precious(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "precious"
    d.mkdir()
    for name in names or ("thesis.txt",):
        (d / name).write_text(f"the user's {name}\n")
    return d


def hold_lock_in_subprocess(folder: Path, command: str = "pretrain") -> subprocess.Popen:
    """Another process claiming ``folder`` (it holds the lock until killed)."""
    code = textwrap.dedent(f"""
        import sys, time
        from nanoseek.outdir import claim
        with claim({str(folder)!r}, {command!r}, flag="--out-dir"):
            print("held", flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------- class 1: demo / model saves
def test_demo_into_a_users_folder_refuses_and_leaves_it_untouched(tmp_path, capsys):
    d = precious(tmp_path)
    before = snapshot(d)
    assert main(["demo", "--out", str(d), "--tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "--overwrite" in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert snapshot(d) == before and sorted(os.listdir(d)) == ["thesis.txt"]     # not even a lock file
    # --overwrite writes the model beside the user's file, never deleting it
    assert main(["demo", "--out", str(d), "--tokens", "2", "--overwrite"]) == 0
    assert (d / "thesis.txt").read_text() == "the user's thesis.txt\n"
    assert sorted(os.listdir(d)) == [LOCK_NAME, "config.json", "model.safetensors", "thesis.txt"]


def test_demo_rewrites_its_own_folder_but_not_another_commands_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--tokens", "2"]) == 0
    assert main(["demo", "--out", str(out), "--tokens", "2"]) == 0                # its own run: fine
    assert read_owner(out)["command"] == "demo"
    # a model folder another command wrote (no demo marker) needs --overwrite
    other = tmp_path / "final"
    torch.manual_seed(0)
    from conftest import make_tiny_model
    save_pretrained(make_tiny_model(), other)
    before = snapshot(other)
    capsys.readouterr()
    assert main(["demo", "--out", str(other), "--tokens", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err and snapshot(other) == before
    assert main(["demo", "--out", str(other), "--tokens", "2", "--overwrite"]) == 0
    assert snapshot(other) != before


def test_save_pretrained_never_deletes_files_it_did_not_write(tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model()
    target = precious(tmp_path, "thesis.txt", "README.md")
    save_pretrained(model, target)                      # written beside the user's files, which stay
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors", "thesis.txt"]
    assert (target / "thesis.txt").read_text() == "the user's thesis.txt\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]           # no temporary left behind
    # stale shards of an older save go (they would corrupt loading)
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt, max_shard_bytes=20_000)
    assert (ckpt / "model.safetensors.index.json").exists()
    save_pretrained(model, ckpt)
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors"]
    from_pretrained(ckpt)


def test_replace_dir_keeps_foreign_files_drops_stale_ones_and_keeps_the_lock(tmp_path):
    dst, src = tmp_path / "dst", tmp_path / "src"
    dst.mkdir(), src.mkdir()
    (dst / "a.bin").write_text("old")
    (dst / "b.bin").write_text("stale")
    (dst / "notes.txt").write_text("mine")
    (dst / "sub").mkdir()
    (dst / "sub" / "deep.txt").write_text("mine too")
    (src / "a.bin").write_text("new")
    (src / "notes.txt").mkdir()                         # a clash: refused before anything moves
    with pytest.raises(ReplaceRefused, match="sub"):
        replace_dir(src, dst, lambda n: n == "sub")
    (src / "notes.txt").rmdir()
    with claim(dst, "test", flag="--out", overwrite=True):
        replace_dir(src, dst, lambda n: n.endswith(".bin"))
        assert (dst / "a.bin").read_text() == "new" and not (dst / "b.bin").exists()
        assert (dst / "notes.txt").read_text() == "mine" and (dst / "sub" / "deep.txt").read_text() == "mine too"
        with pytest.raises(OutputDirError, match="in use"):        # the swapped-in folder is locked too
            _claim_elsewhere(dst)
    assert not src.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def _claim_elsewhere(folder: Path) -> None:
    """Claim ``folder`` from another process; raise OutputDirError with its message if refused."""
    code = f"from nanoseek.outdir import claim\nwith claim({str(folder)!r}, 'test', flag='--out'): pass"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder.parent,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise OutputDirError(r.stderr.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- class 1: training runs
def test_pretrain_into_a_users_folder_keeps_their_config_and_latest(tmp_path, capsys):
    d = precious(tmp_path, "config.toml", "latest", "notes.md")
    before = snapshot(d)
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(d), *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "--out-dir" in err and len(err.strip().splitlines()) == 1
    assert snapshot(d) == before and LOCK_NAME not in os.listdir(d)


def test_a_users_file_in_final_is_kept_and_a_clash_refused_at_the_final_save(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(out), *SMALL]) == 0
    (out / "final" / "notes.txt").write_text("keep me")
    os.chmod(out / "final", 0o750)
    assert main(["pretrain", "--out-dir", str(out), "--resume", *SMALL, "--set", "train.max_steps=3"]) == 0
    assert (out / "final" / "notes.txt").read_text() == "keep me"                 # the new save kept it
    assert (os.stat(out / "final").st_mode & 0o777) == 0o750
    # a folder that appears in final/ under a name the save writes: refused, the weights are kept
    out = tmp_path / "run2"

    class DropAFile:
        def after_step(self, trainer, applied):
            (out / "final" / "config.json").mkdir(parents=True, exist_ok=True)
            (out / "final" / "notes.txt").write_text("keep me")
            return {}

    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import pretrain
    cfg = load_config("tiny", [a for a in SMALL[1::2] if "=" in a] + [f"train.out_dir={out}"])
    with pytest.raises(CheckpointError, match=r"config\.json.*trained weights are safe in .*step-000002"):
        pretrain(cfg, progress=False, quiet=True, hooks=[DropAFile()])
    assert (out / "final" / "notes.txt").read_text() == "keep me"
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_speedrun_into_a_non_empty_folder_keeps_its_report(tmp_path, capsys):
    d = precious(tmp_path, "report.md", "run.txt")
    before = snapshot(d)
    assert main(["speedrun", "--minutes", "1", "--out", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert snapshot(d) == before


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "distill"])
def test_post_training_stage_refuses_a_users_folder(tmp_path, capsys, kind):
    from conftest import make_tiny_model

    model = save_pretrained(make_tiny_model(max_position_embeddings=1024), tmp_path / "model")
    d = precious(tmp_path, "notes.md")
    teacher = ["--set", f"distill.teacher={model}"] if kind == "distill" else []   # (checked when the config is read)
    assert main([kind, "--model", str(model), *teacher, "--out", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "--out" in err
    assert sorted(os.listdir(d)) == ["notes.md"]


def test_ablate_and_tokenizer_refuse_a_users_folder(tmp_path, capsys):
    d = precious(tmp_path)
    before = snapshot(d)
    assert main(["ablate", "--suite", "mtp", "--steps", "1", "--out", str(d), "--data", str(tmp_path / "nodata")]) == 2
    assert str(d) in capsys.readouterr().err
    tok = ["tokenizer", "train", "--default-corpus", "--task-docs", "50", "--vocab-size", "280", "--out", str(d)]
    assert main(tok) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(d) == before and sorted(os.listdir(d)) == ["thesis.txt"]
    assert main([*tok, "--overwrite"]) == 0                     # written beside the user's file
    assert (d / "thesis.txt").read_text() == "the user's thesis.txt\n"


def test_tokenizer_train_does_not_overwrite_a_prepared_datas_tokenizer(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "prepare", "--default-corpus", "--task-docs", "200", "--vocab-size", "280",
                 "--out", str(data)]) == 0
    before = snapshot(data)
    for extra in ([], ["--overwrite"]):                 # its shards were made with it: never replaced
        assert main(["tokenizer", "train", "--default-corpus", "--task-docs", "50", "--vocab-size", "290",
                     "--out", str(data / "tokenizer"), *extra]) == 2
        assert "shards were made with it" in capsys.readouterr().err and snapshot(data) == before
    out = tmp_path / "tok"
    for _ in range(2):                                  # its own folder is rewritten
        assert main(["tokenizer", "train", "--default-corpus", "--task-docs", "50", "--vocab-size", "290",
                     "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == [LOCK_NAME, "tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------- class 1: data prepare
@pytest.fixture()
def good_data(tmp_path):
    good = tmp_path / "good"
    assert main(["data", "prepare", "--default-corpus", "--task-docs", "200", "--vocab-size", "280",
                 "--out", str(good)]) == 0
    return good


def test_prepare_overwrite_with_a_mistyped_input_keeps_the_good_shards(good_data, tmp_path, capsys):
    before = snapshot(good_data)
    capsys.readouterr()
    for bad in (str(tmp_path / "corpsu.jsonl"), str(tmp_path / "corpus_dir"), "runs_typo/", str(tmp_path / "empty")):
        if bad.endswith("empty"):
            Path(bad).mkdir()                           # a folder with no inputs in it
        assert main(["data", "prepare", "--input", bad, "--out", str(good_data), "--overwrite"]) == 2, bad
        err = capsys.readouterr().err
        assert bad.rstrip("/") in err and len(err.strip().splitlines()) == 1
        assert snapshot(good_data) == before


def test_prepare_overwrite_that_fails_midway_keeps_the_old_data(good_data, tmp_path, capsys):
    from nanoseek.data.prepare import Document, PrepareConfig, prepare
    from nanoseek.data.tokenizer import Tokenizer

    before = snapshot(good_data)
    strict = tmp_path / "filters.toml"                  # every document filtered out
    strict.write_text("[filters]\nmin_chars = 100000\n")
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "a short document about nothing in particular."}) + "\n")
    assert main(["data", "prepare", "--input", str(src), "--filters-config", str(strict), "--out", str(good_data),
                 "--overwrite", "--tokenizer", str(good_data / "tokenizer")]) == 2
    assert "no training documents left" in capsys.readouterr().err
    assert snapshot(good_data) == before

    def documents():                                    # the input breaks after some documents
        for i in range(50):
            yield Document(f"document number {i} says something different from the others, at length.", f"x:{i}")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        prepare(documents(), good_data, Tokenizer.load(good_data / "tokenizer"), PrepareConfig(overwrite=True))
    assert snapshot(good_data) == before
    assert sorted(p.name for p in good_data.iterdir() if p.name.startswith(".")) == [LOCK_NAME]


def test_prepare_into_a_users_folder_needs_overwrite_and_keeps_their_files(tmp_path, capsys):
    d = precious(tmp_path, "notes.md", "train_corpus.jsonl")
    (d / "train_corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                                                  for i in range(40)))
    before = snapshot(d)
    argv = ["data", "prepare", "--input", str(d / "train_corpus.jsonl"), "--vocab-size", "280", "--out", str(d),
            "--no-dedup"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and snapshot(d) == before
    assert main([*argv, "--overwrite"]) == 0
    after = snapshot(d)
    assert all(after[k] == v for k, v in before.items()) and "manifest.json" in after
    assert main(argv) == 2                              # prepared data now: replacing it needs --overwrite
    assert "already holds prepared data" in capsys.readouterr().err


def test_a_command_that_fails_before_writing_leaves_no_folder_or_lock_behind(tmp_path, capsys):
    new = tmp_path / "new"
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(new), *SMALL, "--set", "data.source=packed",
                 "--set", f"data.dir={tmp_path / 'nodata'}"]) == 2
    assert "nodata" in capsys.readouterr().err and not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError):
        with claim(empty, "pretrain", flag="--out-dir"):
            raise RuntimeError("failed before writing")
    assert os.listdir(empty) == []
    with claim(empty, "pretrain", flag="--out-dir"):          # a lock file removed by a failed holder
        pass                                                  # is simply made again
    assert os.listdir(empty) == [LOCK_NAME]


def test_data_corpus_does_not_overwrite_an_existing_file(tmp_path, capsys):
    f = tmp_path / "corpus.jsonl"
    f.write_text("the user's corpus\n")
    assert main(["data", "corpus", "--task-docs", "20", "--out", str(f)]) == 2
    assert "--overwrite" in capsys.readouterr().err and f.read_text() == "the user's corpus\n"
    assert main(["data", "corpus", "--task-docs", "20", "--out", str(tmp_path)]) == 2
    assert main(["data", "corpus", "--task-docs", "20", "--out", str(f), "--overwrite"]) == 0
    assert f.read_text() != "the user's corpus\n" and sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_a_subfolder_under_a_model_files_name_is_not_deleted(tmp_path):
    from conftest import make_tiny_model

    target = tmp_path / "ckpt"
    (target / "config.json").mkdir(parents=True)        # a folder, not the file a save writes
    (target / "config.json" / "mine.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        save_pretrained(make_tiny_model(), target)
    assert (target / "config.json" / "mine.txt").read_text() == "mine"


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(blocker / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"{blocker / 'run'}: cannot lock the folder" in err and "--out-dir" in err
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(blocker), *SMALL]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and blocker.read_text() == "x"


# ----------------------------------------------------------------------------- class 2: locks
def test_claim_is_exclusive_across_processes_and_released_when_the_holder_dies(tmp_path, capsys):
    out = tmp_path / "same"
    holder = hold_lock_in_subprocess(out)
    try:
        assert main(["pretrain", "--config", "tiny", "--out-dir", str(out), *SMALL]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another process (nanoseek pretrain, pid {holder.pid}" in err
        assert len(err.strip().splitlines()) == 1 and "checkpoints" not in os.listdir(out)
    finally:
        holder.send_signal(signal.SIGKILL)              # a crash: the kernel drops the lock
        holder.wait()
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(out), *SMALL]) == 0
    assert read_owner(out)["command"] == "pretrain" and read_owner(out)["pid"] == os.getpid()


def test_a_refused_claim_never_removes_the_folder_its_holder_just_made(tmp_path, monkeypatch):
    """The race behind two pretrains started together both failing: the loser saw the folder missing,
    the winner made and locked it (its owner record not yet written), the loser's lock was refused
    and it removed the empty folder it thought it had made, so the winner could not write into it.
    Forced here: another process holds the lock of a new, empty folder that counts as missing."""
    import nanoseek.outdir as outdir

    out = tmp_path / "new"
    out.mkdir()
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(out)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(outdir, "_missing_dirs", lambda path: [Path(path)])
        monkeypatch.setattr(outdir, "check_claimable", lambda *a, **k: False)   # as when it was still missing
        real_lock = outdir._lock                    # ...and the early "in use" probe found nothing to probe
        monkeypatch.setattr(outdir, "_lock", lambda path, flag, shared=False: os.open(os.devnull, os.O_RDONLY)
                            if shared else real_lock(path, flag))
        with pytest.raises(outdir.OutputDirError, match="in use by another process"):
            with outdir.claim(out, "pretrain", flag="--out-dir"):
                pass
        assert out.is_dir()                         # still there for the process that holds it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_pretrains_started_together_do_not_both_succeed(tmp_path):
    out = tmp_path / "same"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--config", "tiny", "--out-dir", str(out), *SMALL]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    assert "in use by another process" in loser or "already holds checkpoints: pass --resume" in loser


def test_claims_nest_in_one_process_and_other_commands_folders_are_refused(tmp_path):
    out = tmp_path / "run"
    with claim(out, "speedrun", flag="--out"):
        with claim(out, "speedrun", flag="--out"):           # the same process again: a no-op
            pass
        (out / "pretrain").mkdir()
        (out / "pretrain" / "laid-out-by-the-parent.json").write_text("{}")
        with claim(out / "pretrain", "pretrain", flag="--out-dir"):   # inside a folder it holds
            pass
    (out / "x").write_text("x")
    with pytest.raises(OutputDirError,
                       match=r"belongs to nanoseek speedrun \(pretrain, x\), not to nanoseek sft: choose another --out"):
        with claim(out, "sft", flag="--out"):
            pass
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        with claim(out / "x", "sft", flag="--out"):
            pass


def test_a_folder_inside_a_live_run_of_another_process_is_refused(tmp_path, capsys):
    run = tmp_path / "speedrun"
    holder = hold_lock_in_subprocess(run, "speedrun")
    try:
        assert main(["pretrain", "--config", "tiny", "--out-dir", str(run / "pretrain"), *SMALL]) == 2
        err = capsys.readouterr().err
        assert f"is inside {run}, which is in use by another process (nanoseek speedrun, pid {holder.pid})" in err
        assert not (run / "pretrain").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ----------------------------------------------------------------------------- class 2: re-runs
def test_pretrain_rerun_with_other_settings_names_the_keys(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["pretrain", "--config", "tiny", "--out-dir", out, *SMALL]) == 0
    config_before = (Path(out) / "config.toml").read_text()
    capsys.readouterr()
    assert main(["pretrain", "--config", "tiny", "--out-dir", out, *SMALL, "--set", "optim.lr=0.5",
                 "--set", "train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "train.seed" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert (Path(out) / "config.toml").read_text() == config_before


def test_speedrun_rerun_with_other_settings_is_refused_and_run_json_unchanged(tmp_path, capsys):
    from nanoseek.speedrun import RunState
    from nanoseek.speedrun_recipe import load_recipe

    out = tmp_path / "sr"
    rc = load_recipe("speedrun", [])
    config = rc.record(1.0, rc.speedrun.seed)
    out.mkdir()
    state = RunState(out, config)
    for step in ("data", "pretrain", "eval_base", "sft", "eval_sft", "grpo", "eval_grpo"):
        state.mark(step, "done")
    (out / "report.md").write_text("made with the recorded settings\n")
    before = snapshot(out)
    assert main(["speedrun", "--minutes", "1", "--out", str(out), "--set", "budget.pretrain=0.2"]) == 2
    err = capsys.readouterr().err
    assert "budget.pretrain" in err and "--from" in err and len(err.strip().splitlines()) == 1
    assert main(["speedrun", "--minutes", "2", "--out", str(out)]) == 2
    assert "minutes (1.0 -> 2.0)" in capsys.readouterr().err
    assert snapshot(out) == before
    from nanoseek.speedrun import check_same_settings
    check_same_settings(out, config)                    # the same settings resume it


def test_post_training_stage_rerun_refuses_other_settings_and_resume_records_them(tmp_path, capsys):
    from post_helpers import tiny_model, tiny_tokenizer

    from nanoseek.errors import ConfigError
    from nanoseek.post.datasets import SFTExample
    from nanoseek.post.sft import train_sft
    from nanoseek.post.registry import stage_config_from_dict

    tk = tiny_tokenizer()
    base = save_pretrained(tiny_model(tk.vocab_size), tmp_path / "base")
    tk.save(base)
    examples = [SFTExample(messages=[{"role": "user", "content": "7?"}, {"role": "assistant", "content": "7"}])] * 4

    def cfg(lr: float, steps: int):
        return stage_config_from_dict("sft", {
            "model": {"init_from": str(base)}, "sft": {"mode": "pad"},
            "optim": {"lr": lr, "min_lr": lr, "warmup_steps": 0, "micro_batch_size": 2, "seq_len": 32},
            "train": {"max_steps": steps, "out_dir": str(tmp_path / "sft"), "device": "cpu"}})

    assert train_sft(cfg(1e-3, 1), examples=examples, quiet=True).status == "done"
    before = snapshot(tmp_path / "sft")
    with pytest.raises(ConfigError, match=r"already holds checkpoints: pass --resume.*optim\.lr"):
        train_sft(cfg(5e-3, 1), examples=examples, quiet=True)
    assert snapshot(tmp_path / "sft") == before
    res = train_sft(cfg(1e-3, 2), examples=examples, resume=True)
    assert res.status == "done" and res.steps == 2
    assert "changed settings: train.max_steps" in capsys.readouterr().out
    assert "max_steps = 1" in (tmp_path / "sft" / "config.previous.toml").read_text()


# ----------------------------------------------------------------------------- round 2: the reviewer's attacks
def test_a_users_run_json_is_not_a_speedrun_and_a_malformed_one_is_one_line(tmp_path, capsys):
    d = precious(tmp_path, "thesis.txt")
    (d / "run.json").write_text('{"notes": "my results"}\n')
    before = snapshot(d)
    assert main(["speedrun", "--out", str(d), "--minutes", "0.2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not made by nanoseek speedrun" in err
    assert snapshot(d) == before and LOCK_NAME not in os.listdir(d)
    # a speedrun's own folder (its marker) whose run.json is broken: one line, folder unchanged
    own = tmp_path / "own"
    own.mkdir()
    (own / LOCK_NAME).write_text(json.dumps({"command": "speedrun", "pid": 1}) + "\n")
    for bad in ("[1, 2]", "{not json", '{"steps": [], "stages": {}, "config": 1, "status": "done"}'):
        (own / "run.json").write_text(bad)
        assert main(["speedrun", "--out", str(own), "--minutes", "0.2"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "run.json" in err and "Traceback" not in err
        assert (own / "run.json").read_text() == bad and read_owner(own) == {"command": "speedrun", "pid": 1}


def test_files_named_like_a_run_are_not_a_run(tmp_path, capsys):
    # a config.toml that is no nanoseek config, next to a checkpoints/step-* folder: not a pretrain run
    d = precious(tmp_path, "config.toml")
    (d / "checkpoints" / "step-000001").mkdir(parents=True)
    before = snapshot(d)
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(d), *SMALL]) == 2
    assert "not made by nanoseek pretrain" in capsys.readouterr().err and snapshot(d) == before
    # a stage.json that is not a stage record, or another stage's: not this stage's run
    from nanoseek.post.registry import is_any_stage_run
    from nanoseek.post.stage import is_stage_run
    from nanoseek.train.pretrain import is_pretrain_run

    (d / "stage.json").write_text('{"kind": "dpo", "status": "done", "steps": 3}')
    assert is_stage_run(d, "dpo") and not is_stage_run(d, "sft") and not is_pretrain_run(d)
    assert is_any_stage_run(d)
    for bad in ('{"kind": "dpo"}', "[]", "{", '{"kind": "pretrain", "status": "done", "steps": 3}'):
        (d / "stage.json").write_text(bad)
        assert not is_any_stage_run(d)


def test_tokenizer_train_does_not_take_a_downloaded_tokenizer_without_overwrite(tmp_path, capsys):
    tok = tmp_path / "mytok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"mine": 1}')
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "README.md").write_text("model card")
    before = snapshot(tok)
    argv = ["tokenizer", "train", "--default-corpus", "--task-docs", "50", "--vocab-size", "280", "--out", str(tok)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tok) == before and LOCK_NAME not in os.listdir(tok)
    assert main([*argv, "--overwrite"]) == 0                   # asked for: its files replaced, the card stays
    assert (tok / "tokenizer.json").read_text() != '{"mine": 1}' and (tok / "README.md").read_text() == "model card"
    assert main(argv) == 0                                       # now its own (the marker)


def test_a_model_save_replaces_only_the_files_it_writes_and_keeps_modes(tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        d = tmp_path / "d"
        assert main(["demo", "--out", str(d), "--tokens", "2"]) == 0
        assert (os.stat(d).st_mode & 0o777, os.stat(d / "model.safetensors").st_mode & 0o777) == (0o755, 0o644)
        (d / "tokenizer.json").write_text("mine")
        (d / "generation_config.json").write_text("{}")
        os.chmod(d, 0o750)
        os.chmod(d / "config.json", 0o600)
        assert main(["demo", "--out", str(d), "--tokens", "2"]) == 0
        assert (d / "tokenizer.json").read_text() == "mine" and (d / "generation_config.json").read_text() == "{}"
        assert os.stat(d).st_mode & 0o777 == 0o750 and os.stat(d / "config.json").st_mode & 0o777 == 0o600
        # --overwrite into a downloaded HF model folder: its weights and config replaced, its tokenizer kept
        hf = tmp_path / "hf"
        hf.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            (hf / name).write_text(f"hf {name}")
        capsys.readouterr()
        assert main(["demo", "--out", str(hf), "--tokens", "2"]) == 2
        assert "--overwrite replaces config.json, model.safetensors here; other files are kept" in capsys.readouterr().err
        assert main(["demo", "--out", str(hf), "--tokens", "2", "--overwrite"]) == 0
        assert (hf / "tokenizer.json").read_text() == "hf tokenizer.json"
        assert (hf / "tokenizer_config.json").read_text() == "hf tokenizer_config.json"
        assert (hf / "config.json").read_text() != "hf config.json"
    finally:
        os.umask(mask)


def test_a_refused_or_failed_command_leaves_no_marker_and_never_takes_another_commands_run(tmp_path, capsys):
    run = tmp_path / "tiny"
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(run), *SMALL]) == 0
    (run / LOCK_NAME).unlink()                                  # a run made before markers
    before = snapshot(run)
    assert main(["sft", "--model", str(run), "--out", str(run), "--set", "train.max_steps=2"]) == 2
    assert "not made by nanoseek sft" in capsys.readouterr().err
    assert snapshot(run) == before and LOCK_NAME not in os.listdir(run)
    assert main(["pretrain", "--out-dir", str(run), "--resume", *SMALL, "--set", "train.max_steps=3"]) == 0
    # a web app's manifest.json is not prepared data: refused, and --overwrite never replaces it
    web = precious(tmp_path, "index.html")
    (web / "manifest.json").write_text('{"name": "PWA"}')
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    before = snapshot(web)
    argv = ["data", "prepare", "--input", str(src), "--vocab-size", "280", "--out", str(web), "--no-dedup"]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, *extra]) == 2
        assert "manifest.json is not a nanoseek data manifest" in capsys.readouterr().err
    assert snapshot(web) == before and sorted(os.listdir(web)) == ["index.html", "manifest.json"]
    # a claim (with --overwrite) that fails before writing: the previous marker is put back as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    (other / LOCK_NAME).write_text('{"command": "demo"}\n')
    with pytest.raises(RuntimeError):
        with claim(other, "pretrain", flag="--out-dir", overwrite=True):
            assert read_owner(other)["command"] == "pretrain"
            raise RuntimeError("failed before writing")
    assert (other / LOCK_NAME).read_text() == '{"command": "demo"}\n' and sorted(os.listdir(other)) == [LOCK_NAME,
                                                                                                        "x.txt"]
    with pytest.raises(RuntimeError):                           # one that wrote something keeps its marker
        with claim(other, "pretrain", flag="--out-dir", overwrite=True):
            (other / "config.toml").write_text("written")
            raise RuntimeError("failed after writing")
    assert read_owner(other)["command"] == "pretrain"


def test_deleting_the_marker_does_not_release_the_lock(tmp_path):
    # held by another process: the marker removed, a claim here is still refused
    out = tmp_path / "run"
    holder = hold_lock_in_subprocess(out)
    try:
        (out / LOCK_NAME).unlink()
        with pytest.raises(OutputDirError, match="in use by another process"):
            with claim(out, "pretrain", flag="--out-dir"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # held by this process: the marker removed, another process is refused, also inside it
    mine = tmp_path / "mine"
    with claim(mine, "pretrain", flag="--out-dir"):
        (mine / "config.toml").write_text("x")
        (mine / LOCK_NAME).unlink()
        with pytest.raises(OutputDirError, match="in use by another process"):
            _claim_elsewhere(mine)
        (mine / "stage").mkdir()
        with pytest.raises(OutputDirError, match="which is in use by another process"):
            _claim_elsewhere(mine / "stage")


def test_a_refused_path_through_a_missing_folder_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = precious(tmp_path)
    for argv in (["demo", "--out", "nonexist/../precious", "--tokens", "2"],
                 ["pretrain", "--config", "tiny", "--out-dir", "nonexist/../precious", *SMALL]):
        assert main(argv) == 2
        assert "nonexist" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == ["precious"] and sorted(os.listdir(d)) == ["thesis.txt"]


def test_a_kill_between_the_fallback_renames_is_recovered_by_the_next_claim(tmp_path):
    from nanoseek import atomic

    base = tmp_path / "run"
    (base / "final").mkdir(parents=True)
    (base / "final" / "config.json").write_text("old model")
    (base / "new").mkdir()
    (base / "new" / "config.json").write_text("new model")
    child = textwrap.dedent(f"""
        import os
        from nanoseek import atomic
        real = os.replace
        def dying(a, b):
            real(a, b)
            os._exit(137)                 # killed: the old folder aside, the new one not yet in place
        atomic._exchange = lambda a, b: False
        atomic.os.replace = dying
        atomic.replace_dir({str(base / 'new')!r}, {str(base / 'final')!r})
    """)
    subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert not (base / "final").exists() and any(n.startswith(".final.old-") for n in os.listdir(base))
    with claim(base, "pretrain", flag="--out-dir", overwrite=True):
        assert (base / "final" / "config.json").read_text() == "old model"
    # the claimed folder itself hidden by such a kill: its claim puts it back first
    os.rename(base, tmp_path / ".run.old-999999999-1")
    with claim(base, "pretrain", flag="--out-dir"):
        assert (base / "final" / "config.json").read_text() == "old model"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".run.old-")]
    # where renameat2 works, the swap is one exchange: no second rename to be killed before
    dst, src = tmp_path / "dst", tmp_path / "src"
    dst.mkdir(), src.mkdir()
    (dst / "a").write_text("old")
    (src / "a").write_text("new")
    if atomic._exchange(src, dst):
        assert (dst / "a").read_text() == "new" and (src / "a").read_text() == "old"


def test_a_folder_that_cannot_be_written_is_one_line_and_left_as_found(tmp_path, monkeypatch):
    import nanoseek.atomic

    def read_only(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(nanoseek.atomic, "write_atomic", read_only)   # a read-only folder (tests may run as root)
    d = precious(tmp_path)
    new = tmp_path / "a" / "b"
    for folder in (d, new):
        with pytest.raises(OutputDirError, match="cannot write into the folder.*--out"):
            with claim(folder, "demo", flag="--out", overwrite=True):
                pass
    assert sorted(os.listdir(d)) == ["thesis.txt"] and sorted(os.listdir(tmp_path)) == ["precious"]


# ----------------------------------------------------------------------------- class: links, FIFOs, devices
def _stage_cfg(base: Path, out: Path, steps: int):
    from nanoseek.post.registry import stage_config_from_dict

    return stage_config_from_dict("sft", {
        "model": {"init_from": str(base)}, "sft": {"mode": "pad"},
        "optim": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "micro_batch_size": 2, "seq_len": 32},
        "train": {"max_steps": steps, "out_dir": str(out), "device": "cpu"}})


def test_resuming_a_stage_never_writes_through_links_out_of_the_run_folder(tmp_path):
    from post_helpers import tiny_model, tiny_tokenizer

    from nanoseek.atomic import RecordError
    from nanoseek.post.datasets import SFTExample
    from nanoseek.post.sft import train_sft

    tk = tiny_tokenizer()
    base = save_pretrained(tiny_model(tk.vocab_size), tmp_path / "base")
    tk.save(base)
    ex = [SFTExample(messages=[{"role": "user", "content": "7?"}, {"role": "assistant", "content": "7"}])] * 4
    run = tmp_path / "sft"
    assert train_sft(_stage_cfg(base, run, 1), examples=ex, quiet=True).status == "done"
    outside = tmp_path / "outside"
    outside.mkdir()
    names = ("tokenizer.json", "tokenizer_config.json", "config.previous.toml", "stage.json")
    for name in names:
        (outside / name).write_text(f"the user's {name}\n")
        (run / name).unlink(missing_ok=True)
        os.symlink(outside / name, run / name)
    before = snapshot(outside)
    assert train_sft(_stage_cfg(base, run, 2), examples=ex, resume=True, quiet=True).status == "done"
    assert snapshot(outside) == before                    # replaced the links, never wrote through them
    for name in names:
        assert not (run / name).is_symlink() and (run / name).is_file()
    assert json.loads((run / "stage.json").read_text())["steps"] == 2
    # an append-only log that is a link is refused (one line naming it), never appended through
    (outside / "metrics.jsonl").write_text("the user's log\n")
    (run / "metrics.jsonl").unlink()
    os.symlink(outside / "metrics.jsonl", run / "metrics.jsonl")
    before = snapshot(outside)
    with pytest.raises(RecordError, match="metrics.jsonl: is a symbolic link"):
        train_sft(_stage_cfg(base, run, 3), examples=ex, resume=True, quiet=True)
    assert snapshot(outside) == before


def test_append_logs_refuse_links_fifos_and_devices(tmp_path):
    from nanoseek.atomic import RecordError, open_append

    (tmp_path / "target").write_text("keep\n")
    os.symlink(tmp_path / "target", tmp_path / "link.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.symlink("/dev/null", tmp_path / "dev.jsonl")
    for name in ("link.jsonl", "fifo.jsonl", "dev.jsonl"):
        with pytest.raises(RecordError, match=name):
            open_append(tmp_path / name)
    assert (tmp_path / "target").read_text() == "keep\n"
    with open_append(tmp_path / "new.jsonl") as fh:
        fh.write("{}\n")
    with open_append(tmp_path / "new.jsonl") as fh:
        fh.write("{}\n")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n{}\n"


def test_a_malformed_metrics_line_is_one_line_naming_file_and_line(tmp_path):
    from nanoseek.cli import UserError
    from nanoseek.train.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics record") as e:
        read_metrics(tmp_path)
    assert "\n" not in str(e.value)


def test_overwrite_refusal_names_exactly_the_files_it_would_replace(tmp_path, capsys):
    web = tmp_path / "web"
    web.mkdir()
    (web / "config.json").write_text('{"my": 1}\n')
    (web / "index.html").write_text("keep\n")
    assert main(["demo", "--out", str(web), "--tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite replaces config.json here; other files are kept" in err and len(err.splitlines()) == 1
    (web / "config.json").unlink()
    assert main(["demo", "--out", str(web), "--tokens", "2"]) == 2
    assert "--overwrite replaces none of the files here" in capsys.readouterr().err


class _Alarm(Exception):
    pass


def _within(seconds: int, fn):
    """``fn()``, failing the test instead of hanging if it takes over ``seconds``."""
    def ring(*_):
        raise _Alarm(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _plant(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:                                             # a 2 GiB sparse file: huge, but costs no disk
        with open(path, "wb") as fh:
            fh.truncate(2 << 30)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_fifo_device_or_huge_marker_is_a_prompt_one_line_refusal(tmp_path, capsys, kind):
    d = tmp_path / "out"
    d.mkdir()
    _plant(d / LOCK_NAME, kind)
    assert _within(20, lambda: main(["demo", "--out", str(d), "--tokens", "2"])) == 2
    err = capsys.readouterr().err.strip()
    assert LOCK_NAME in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(d)) == [LOCK_NAME] and read_owner(d) is None


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
@pytest.mark.parametrize("record", ["run.json", "stage.json", "plan.json", "manifest.json", "config.toml"])
def test_a_fifo_device_or_huge_legacy_record_is_not_a_claim(tmp_path, kind, record):
    from nanoseek.ablate.runner import is_suite_dir
    from nanoseek.data.prepare import is_data_manifest
    from nanoseek.post.stage import is_stage_run
    from nanoseek.speedrun import is_speedrun_run
    from nanoseek.train.pretrain import is_pretrain_run

    own, command = {"run.json": (is_speedrun_run, "speedrun"), "stage.json": (lambda p: is_stage_run(p, "sft"), "sft"),
                    "plan.json": (is_suite_dir, "ablate"), "manifest.json": (lambda p: is_data_manifest(p / "manifest.json"),
                                                                            "data prepare"),
                    "config.toml": (is_pretrain_run, "pretrain")}[record]
    d = tmp_path / "out"
    d.mkdir()
    (d / "checkpoints" / "step-1").mkdir(parents=True)    # the rest of a legacy pretrain run
    _plant(d / record, kind)
    with pytest.raises(OutputDirError, match=record) as e:
        _within(20, lambda: claim(d, command, flag="--out", own=own).__enter__())
    assert "\n" not in str(e.value) and LOCK_NAME not in os.listdir(d)
