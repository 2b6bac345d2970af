"""The README tour runs as written, and what broke it stays fixed.

The tour is the ```bash block under "## A tour" in README.md. :func:`tour_commands` parses it, and
each command runs in order in one temporary folder, with flags APPENDED to shrink it to seconds
(``SHRINK``: fewer steps, examples, problems, tokens; a later ``--set`` of the same key wins), never
with the README's own words changed. A command of a kind that ``SHRINK`` does not know fails the
test: a new tour line needs its shrink here, so it cannot go untested. ``nanoseek`` commands run
in-process through ``nanoseek.cli.main`` (what the ``nanoseek`` script calls), ``chat`` with its
input scripted, ``serve`` as a subprocess that answers one chat request and is stopped, ``torchrun``
as ``python -m torch.distributed.run`` (2 processes, gloo).

One stand-in: the R1 recipe's rejection-sampling stage keeps only VERIFIED samples of the RL
model, and a model trained for seconds answers nothing right, so for that command the teacher's
first sample per prompt is replaced by a gold-answer response that the real verifier then scores
(:func:`_gold_teacher`). Everything else is the real code path.

``test_tour_start`` (the normal suite) runs the tour's first commands, up to the SFT from the
pre-training run folder where the tour used to break; ``test_readme_tour`` (``slow``) runs all of
it. The rest are the reproductions of issue 17 class 8 and their relatives: a run folder resolves
to ``final/`` first, every checkpoint carries its tokenizer, keys that would have no effect are
errors, ``val_bpb`` is bits per byte (one rule with ``nanoseek eval --data``) and synthetic runs
report none.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_GRPO_SMALL = ["prompts_per_step=2", "group_size=2", "max_new_tokens=8", "num_prompts=8"]
_SPEEDRUN_SMALL = ["--minutes", "0.1", "--set", "data.task_docs=2000", "--set", "eval.min_problems=2",
                   "--set", "eval.k=1", "--set", "eval.max_new_tokens=80"]   # a tool call's reply fits


def _sets(prefix: str, items: list[str]) -> list[str]:
    return [a for it in items for a in ("--set", f"{prefix}.{it}")]


SHRINK: dict[str, list[str]] = {
    "demo": ["--tokens", "4"],
    "data prepare": ["--task-docs", "2000"],
    "pretrain": ["--set", "train.max_steps=4", "--quiet"],
    "sft": ["--steps", "2", "--set", "sft.num_examples=16", "--quiet"],
    "grpo": ["--steps", "1", *_sets("grpo", _GRPO_SMALL), "--quiet"],
    "grpo r1": [*_sets("stages.cold_start", ["train.max_steps=1", "sft.num_examples=16"]),
                *_sets("stages.reasoning_rl", ["train.max_steps=1", *(f"grpo.{x}" for x in _GRPO_SMALL)]),
                *_sets("stages.rejection_sft", ["train.max_steps=1", "distill.num_prompts=4",
                                                "distill.samples_per_prompt=2", "distill.max_new_tokens=8"]),
                *_sets("stages.final_rl", ["train.max_steps=1", *(f"grpo.{x}" for x in _GRPO_SMALL)]), "--quiet"],
    "eval": ["--n", "4", "--k", "1", "--max-new-tokens", "8"],
    "chat": ["--max-new-tokens", "8", "--seed", "0"],
    "serve": ["--max-seq-len", "256", "--log-level", "warning"],          # + --port FREE
    "estimate": [],
    "ablate": ["--steps", "2", "--seeds", "1", "--val-batches", "1", "--batch-size", "2", "--seq-len", "32"],
    "speedrun": _SPEEDRUN_SMALL,
    "speedrun --from": [*_SPEEDRUN_SMALL, "--set", "sft.num_examples=32"],
    "torchrun": ["--set", "train.max_steps=2", "--quiet"],
}


def tour_commands(readme: Path = README) -> list[str]:
    """The command lines of the README's tour block, comments stripped, in order."""
    text = readme.read_text(encoding="utf-8")
    start = text.find("\n## A tour\n")
    assert start >= 0, "README.md has no '## A tour' section"
    section = text[start + 1:]
    nxt = section.find("\n## ", 1)
    section = section if nxt < 0 else section[:nxt]
    fence = section.find("```bash\n")
    assert fence >= 0, "the tour section has no ```bash block"
    body = section[fence + len("```bash\n"):]
    body = body[:body.index("```")]
    return [" ".join(shlex.split(line, comments=True)) for line in body.splitlines()
            if shlex.split(line, comments=True)]


def kind_of(argv: list[str]) -> str:
    """The SHRINK key of a tour command."""
    if argv[0] == "torchrun":
        return "torchrun"
    assert argv[0] == "nanoseek", f"a tour command must start with nanoseek or torchrun: {argv}"
    sub = argv[1]
    if sub == "data":
        return f"data {argv[2]}"
    if sub == "grpo" and "--config" in argv and argv[argv.index("--config") + 1] == "r1":
        return "grpo r1"
    if sub == "speedrun" and "--from" in argv:
        return "speedrun --from"
    return sub


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOSEEK_NO_PROGRESS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _gold_teacher():
    """The rejection-sampling teacher's first sample per prompt becomes a gold-answer response,
    scored by the real verifier (see the module docstring)."""
    import nanoseek.post.rollout as rollout
    from nanoseek.tasks.rewards import score

    real = rollout.sample_and_score

    def gold(model, tokenizer, prompts, n, **kw):
        groups, report = real(model, tokenizer, prompts, n, **kw)
        for p, g in zip(prompts, groups):
            text = f"<think>\nthe worked steps\n</think>\n\nAnswer: {p.answer}"
            r = score(text, p.record())
            assert r.correct and r.format_ok, f"the gold response for {p.task} does not verify: {r}"
            g[0] = rollout.Scored(text=text, result=r, finish_reason="stop", tokens=8)
        return groups, report

    rollout.sample_and_score = gold
    try:
        yield
    finally:
        rollout.sample_and_score = real


def _serve_once(argv: list[str], cwd: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "nanoseek", *argv[1:], "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.stdout.read()}"
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    model_id = json.loads(r.read())["data"][0]["id"]
                    break
            except OSError:
                assert time.time() < deadline, "serve did not come up within 60 s"
                time.sleep(0.2)
        body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                           "max_tokens": 8}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"serve answered {e.code}: {e.read()[:500]!r}") from None
        assert out["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_tour_command(line: str, cwd: Path, monkeypatch) -> None:
    """Run one tour line (shrunk) in ``cwd``; fails the test when it does not succeed."""
    argv = shlex.split(line)
    kind = kind_of(argv)
    assert kind in SHRINK, f"tour command of unknown kind {kind!r}: {line!r}; add its shrink to SHRINK"
    argv = argv + SHRINK[kind]
    if kind == "serve":
        _serve_once(argv, cwd)
        return
    if kind == "torchrun":
        rest = argv[1:]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rest]
        r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line!r} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return
    with contextlib.ExitStack() as stack:
        if kind == "chat":
            monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\n/quit\n"))
        if kind == "grpo r1":
            stack.enter_context(_gold_teacher())
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv[1:])
    assert rc == 0, f"{line!r} exited {rc}: {err.getvalue()[-2000:]}"


def _run_tour(lines: list[str], tmp_path: Path, monkeypatch) -> dict[str, float]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    times = {}
    for line in lines:
        t0 = time.perf_counter()
        run_tour_command(line, tmp_path, monkeypatch)
        times[line] = time.perf_counter() - t0
    return times


# ---------------------------------------------------------------------------------- the tour
def test_tour_parses_and_every_command_has_a_shrink():
    lines = tour_commands()
    assert len(lines) >= 10 and lines[0].startswith("nanoseek demo")
    kinds = [kind_of(shlex.split(x)) for x in lines]
    assert [k for k in kinds if k not in SHRINK] == []
    # every command line (with its shrink) parses with the real CLI's parser: no wrong flag
    from nanoseek.cli import build_parser

    parser = build_parser()
    for line, kind in zip(lines, kinds):
        argv = shlex.split(line) + SHRINK[kind]
        if kind == "torchrun":
            argv = argv[argv.index("nanoseek"):]
        parser.parse_args(argv[1:])


def test_tour_start(tmp_path, monkeypatch):
    """The tour up to the SFT from the pre-training run folder (where it broke), then a chat."""
    lines = tour_commands()
    upto = next(i for i, x in enumerate(lines) if x.startswith("nanoseek sft"))
    chat = [x for x in lines if x.startswith("nanoseek chat")]
    times = _run_tour(lines[:upto + 1] + chat, tmp_path, monkeypatch)
    print("tour timings: " + ", ".join(f"{k.split(' --')[0]} {v:.1f}s" for k, v in times.items()))
    run = tmp_path / "runs" / "tiny"
    cfg = (run / "config.toml").read_text()
    assert 'source = "packed"' in cfg and 'dir = "runs/data"' in cfg
    assert (run / "final" / "tokenizer.json").is_file()
    assert all((c / "tokenizer.json").is_file() for c in (run / "checkpoints").iterdir())
    done = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert done and 0 < done[-1]["val_bpb"] < done[-1]["val_loss"] / math.log(2)   # > 1 byte per token


@pytest.mark.slow
def test_readme_tour(tmp_path, monkeypatch):
    """Every command of the README tour, in order, in one fresh folder."""
    times = _run_tour(tour_commands(), tmp_path, monkeypatch)
    print("tour timings: " + ", ".join(f"{k.split(' --')[0]} {v:.1f}s" for k, v in times.items()))
    for d in ("tiny", "sft", "r1-zero", "r1", "speedrun", "alt", "tiny-ep2"):
        assert (tmp_path / "runs" / d).is_dir(), d


# ---------------------------------------------------------------------------------- the reproductions
def _tiny(out: Path, *sets: str) -> int:
    return main(["pretrain", "--config", "tiny", "--out-dir", str(out), "--quiet", "--set", "train.max_steps=2",
                 "--set", "train.save_every=1", *(a for s in sets for a in ("--set", s))])


def test_data_dir_with_synthetic_source_is_an_error_naming_what_to_set(tmp_path, capsys):
    assert _tiny(tmp_path / "r", "data.dir=runs/data") == 2
    err = capsys.readouterr().err
    assert "[data] dir" in err and "no effect" in err and "data.source=packed" in err
    assert not (tmp_path / "r").exists()
    for key in ("data.train_split=x", "data.val_split=x"):
        assert _tiny(tmp_path / "r", key) == 2
        assert key.split("=")[0].split(".")[1] in capsys.readouterr().err


@pytest.mark.parametrize("raw, key", [
    ({"data": {"source": "packed", "val_batches": 0, "val_split": "val"}}, "val_split"),
    ({"optim": {"schedule": "cosine", "decay_fraction": 0.3}}, "decay_fraction"),
    ({"optim": {"schedule": "cosine", "decay_shape": "linear"}}, "decay_shape"),
    ({"optim": {"schedule": "wsd", "decay_steps": 5, "decay_fraction": 0.3}}, "decay_fraction"),
    ({"optim": {"schedule": "constant", "decay_steps": 5}}, "decay_steps"),
])
def test_keys_that_would_have_no_effect_are_errors(raw, key):
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import config_from_dict

    base = {"data": {"source": "synthetic"}, "train": {"max_steps": 3}}
    raw = {**base, **raw}
    with pytest.raises(ConfigError, match=rf"{key}.*would have no effect"):
        config_from_dict(raw, "t.toml")


def test_null_drops_a_key_the_recipe_file_writes(tmp_path, capsys):
    """A recipe file that writes decay_fraction (tiny.toml plus that key; the shipped file writes no
    default): switching its schedule needs the key dropped, and the error says how."""
    from nanoseek.train.config import TRAIN_CONFIG_DIR

    recipe = tmp_path / "tiny.toml"
    recipe.write_text((TRAIN_CONFIG_DIR / "tiny.toml").read_text().replace("[optim]\n", "[optim]\ndecay_fraction = 0.2\n"))

    def run(*sets):
        return main(["pretrain", "--config", str(recipe), "--out-dir", str(tmp_path / "r"), "--quiet", "--set",
                     "train.max_steps=2", "--set", "train.save_every=1", *(a for s in sets for a in ("--set", s))])

    assert run("optim.schedule=cosine") == 2
    err = capsys.readouterr().err
    assert "decay_fraction would have no effect" in err and "--set optim.decay_fraction=null" in err
    assert run("optim.decay_fraction=null", "optim.schedule=cosine") == 0


@pytest.mark.parametrize("sets", [[], ["optim.schedule=constant", "optim.decay_fraction=null", "optim.min_lr=null"],
                                  ["optim.schedule=cosine", "optim.decay_fraction=null"],
                                  ["optim.decay_steps=1", "optim.decay_fraction=null"]])
def test_recorded_config_reads_back_and_resumes(tmp_path, sets):
    """RUN/config.toml leaves no-effect keys out, so `--resume` without --config reads it back."""
    run = tmp_path / "r"
    assert _tiny(run, *sets) == 0
    import re

    assert not re.search(r"^dir =", (run / "config.toml").read_text(), re.M)   # synthetic: no data dir recorded
    assert main(["pretrain", "--out-dir", str(run), "--resume", "--quiet", "--set", "train.max_steps=3"]) == 0


def test_a_synthetic_run_has_no_tokenizer_and_the_error_says_why(tmp_path, capsys):
    assert _tiny(tmp_path / "r") == 0
    capsys.readouterr()
    assert main(["sft", "--model", str(tmp_path / "r"), "--out", str(tmp_path / "s"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "synthetic token ids" in err and "data.source=packed" in err and len(err.strip().splitlines()) == 1
    assert main(["chat", "--model", str(tmp_path / "r")]) == 2
    assert "synthetic token ids" in capsys.readouterr().err


def test_synthetic_run_reports_no_bits_per_byte(tmp_path):
    assert _tiny(tmp_path / "r", "data.val_batches=1") == 0
    evs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evs if e.get("event") == "eval"]
    assert evals and all("val_loss" in e and "val_bpb" not in e for e in evals)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Real shards (a 300-token BPE on the built-in prose), as the pretraining tests make them."""
    from train_helpers import prepare_prose_shards

    return prepare_prose_shards(tmp_path_factory.mktemp("data"))


SMALL = ["model.hidden_size=32", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
         "model.moe_intermediate_size=16", "optim.seq_len=32", "optim.micro_batch_size=2", "optim.grad_accum=1",
         "data.val_batches=2"]


@pytest.fixture(scope="module")
def packed_run(data_dir, tmp_path_factory):
    """A finished 2-step run on packed data, saved every step (final/ and step-1, step-2)."""
    run = tmp_path_factory.mktemp("run") / "r"
    assert _tiny(run, "data.source=packed", f"data.dir={data_dir}", *SMALL) == 0
    return run


def test_every_checkpoint_carries_its_tokenizer(packed_run, data_dir):
    ckpts = sorted((packed_run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]
    for d in [*ckpts, packed_run / "final"]:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (d / name).read_text() == (data_dir / "tokenizer" / name).read_text(), (d, name)


def test_run_folder_resolves_to_final_then_latest(packed_run, tmp_path):
    import shutil

    from nanoseek.eval.runs import Stage
    from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

    assert resolve_checkpoint(packed_run) == packed_run / "final"
    assert Stage("r", packed_run).checkpoint() == packed_run / "final"
    # latest pointing at an OLDER checkpoint than the newest must not win over final/ either
    (packed_run / "latest").write_text("checkpoints/step-000001\n")
    try:
        assert resolve_checkpoint(packed_run) == packed_run / "final"
        killed = tmp_path / "killed"           # a run without final/ (killed): its latest checkpoint
        shutil.copytree(packed_run, killed)
        shutil.rmtree(killed / "final")
        assert resolve_checkpoint(killed) == killed / "checkpoints" / "step-000001"
        assert resolve_checkpoint(killed / "checkpoints" / "step-000002") == killed / "checkpoints" / "step-000002"
    finally:
        (packed_run / "latest").write_text("checkpoints/step-000002\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="final"):
        resolve_checkpoint(tmp_path / "empty")


def test_sft_and_chat_start_from_a_killed_run_folder(packed_run, tmp_path, monkeypatch):
    """No final/ (the run was killed): the latest checkpoint serves, with its own tokenizer."""
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(packed_run, killed)
    shutil.rmtree(killed / "final")
    from nanoseek.infer.loading import load_for_inference

    model, tok = load_for_inference(killed, require_tokenizer=True)
    assert tok is not None and tok.vocab_size == 300
    assert main(["sft", "--model", str(killed), "--out", str(tmp_path / "sft"), "--steps", "1", "--quiet",
                 "--data", "tasks:compare", "--set", "sft.num_examples=8", "--set", "optim.seq_len=128",
                 "--set", "optim.micro_batch_size=2"]) == 0
    assert (tmp_path / "sft" / "final" / "tokenizer.json").is_file()
    assert all((c / "tokenizer.json").is_file() for c in (tmp_path / "sft" / "checkpoints").iterdir())


def test_pretraining_init_from_takes_a_run_folder(packed_run, data_dir, tmp_path):
    out = tmp_path / "cont"
    assert _tiny(out, "data.source=packed", f"data.dir={data_dir}", *SMALL[5:],
                 f"model.init_from={packed_run}") == 0
    recorded = (out / "config.toml").read_text()
    assert f'init_from = "{packed_run / "final"}"' in recorded
    assert _tiny(tmp_path / "bad", f"model.init_from={tmp_path / 'nothing'}") == 2


class _Rows:
    """A validation loader holding fixed rows (the interface PretrainTask.evaluate uses)."""

    def __init__(self, x, y):
        self.x, self.y, self.done = x, y, False

    def state_dict(self):
        return {"done": False}

    def load_state_dict(self, state):
        self.done = state["done"]

    def __next__(self):
        if self.done:
            raise StopIteration
        self.done = True
        return self.x, self.y, []


def test_val_bpb_is_bits_per_byte_by_the_eval_rule(packed_run, data_dir):
    """The trainer's val_bpb = nats / ln 2 / UTF-8 bytes over the targets that stand for text,
    computed independently here on rows with document boundaries (BOS targets count in neither
    sum), and equal to ``nanoseek eval --data``'s bits_per_byte on the same rows."""
    import torch.nn.functional as F

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.train.bpb import bits_per_byte
    from nanoseek.model.checkpoint import from_pretrained
    from nanoseek.train.bpb import token_byte_lengths
    from nanoseek.train.pretrain import PretrainTask

    tok = Tokenizer.load(data_dir / "tokenizer")
    model = from_pretrained(packed_run / "final", dtype=torch.float32).eval()
    texts = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld: 12 + 30 = 42.", "日本語 and more text."]
    docs = [tok.encode(t, add_bos=True) for t in texts] * 4
    stream = torch.tensor([i for d in docs for i in d])
    T = 16
    rows = (len(stream) - 1) // T
    idx = torch.arange(rows)[:, None] * T + torch.arange(T + 1)[None, :]
    x, y = stream[idx][:, :-1], stream[idx][:, 1:]
    assert any(int(t) in tok.special_ids for t in y.flatten())          # the rows cross documents
    task = PretrainTask(None, _Rows(x, y), 0.0, 1, token_byte_lengths(tok))
    res = task.evaluate(model)
    with torch.no_grad():
        nll = F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten(), reduction="none")
    text = [i for i, t in enumerate(y.flatten().tolist()) if t not in tok.special_ids]
    # consecutive rows are contiguous in the stream, so the targets decode as one text
    n_bytes = len(tok.decode(y.flatten().tolist(), skip_special_tokens=True).encode("utf-8"))
    expected = float(nll[text].sum()) / math.log(2) / n_bytes
    assert res["val_bpb"] == pytest.approx(expected, rel=1e-5)
    assert res["val_loss"] == pytest.approx(float(nll.mean()), rel=1e-5)   # the loss still covers every target
    ev = bits_per_byte(model, docs, tok, seq_len=T, max_tokens=rows * T, batch_size=rows)
    assert ev.bpb == pytest.approx(res["val_bpb"], rel=1e-5) and ev.bytes == n_bytes
