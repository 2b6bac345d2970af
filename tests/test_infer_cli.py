"""`nanoseek generate`, `nanoseek chat` and the engine with the real BPE tokenizer, on a tiny checkpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.loading import LoadError, load_for_inference
from nanoseek.train.checkpoint import resolve_checkpoint
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.checkpoint import save_pretrained

CORPUS = ["Hello world! What is 2 + 2? The answer is 4. Thinking step by step about numbers 0123456789.",
          "héllo wörld 🙂 — chat with a tiny model: reasoning first, then the answer."] * 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder: runs/x/checkpoints/step-000001 (HF checkpoint) + runs/x/tokenizer.json."""
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    model = make_tiny_model(seed=0, vocab_size=tok.vocab_size).eval()
    run = tmp_path_factory.mktemp("run")
    step = run / "checkpoints" / "step-000001"
    save_pretrained(model, step)
    (step / "trainer_state.json").write_text("{}")      # what makes a training checkpoint complete
    (run / "latest").write_text("checkpoints/step-000001\n")
    tok.save(run)
    return run, model, tok


def test_loading_finds_checkpoint_and_tokenizer(checkpoint, tmp_path):
    run, model, tok = checkpoint
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000001"
    m, t = load_for_inference(run)
    assert t.vocab_size == tok.vocab_size
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)
    with pytest.raises(LoadError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(LoadError, match="no such"):
        resolve_checkpoint(tmp_path / "missing")


def test_engine_with_the_real_tokenizer_streams_consistent_text(checkpoint):
    _, model, tok = checkpoint
    engine = Engine(model, tok, max_batch_size=4, max_seq_len=128)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], True, thinking=True))
    params = SamplingParams(max_new_tokens=24, temperature=1.0, n=2, seed=3, ignore_eos=True)
    raw = SamplingParams(max_new_tokens=24, temperature=1.0, n=2, seed=3, ignore_eos=True, skip_special_tokens=False)
    for c in engine.generate([ids], raw)[0]:
        assert c.text == tok.decode(c.token_ids)                          # every token's text, control ones too
    events = list(engine.stream(ids, params))
    for c in engine.generate([ids], params)[0]:
        evs = [e for e in events if e.index == c.index]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)   # vLLM's default: no control tokens
        # the prompt opened <think>: everything before a </think> is reasoning
        assert c.reasoning is not None
        assert "".join(e.reasoning_delta for e in evs) == c.reasoning
        assert "".join(e.text_delta for e in evs) == c.answer


def test_generate_cli_writes_jsonl(checkpoint, tmp_path, capsys):
    run, model, tok = checkpoint
    inp = tmp_path / "prompts.txt"
    inp.write_text('Hello\n\n{"messages": [{"role": "user", "content": "2 + 2?"}]}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(run), "--input", str(inp), "--prompt", "What is",
               "--n", "2", "--max-new-tokens", "5", "--temperature", "0", "--output", str(out), "--token-ids"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines[:2]] == ["What is", "Hello"]
    assert lines[2]["prompt"] == [{"role": "user", "content": "2 + 2?"}]
    for rec in lines:
        assert len(rec["completions"]) == 2 and rec["prompt_tokens"] > 0
        a, b = rec["completions"]
        assert a["token_ids"] == b["token_ids"] and 1 <= a["tokens"] <= 5       # greedy: identical samples
        assert {"text", "reasoning", "answer", "finish_reason"} <= set(a)
    # the same greedy tokens as the engine directly, with BOS + text for a plain prompt
    direct = Engine(model, tok, max_batch_size=2, max_seq_len=64).generate(
        [tok.encode("What is", add_bos=True)], SamplingParams(max_new_tokens=5, temperature=0))[0][0]
    assert lines[0]["completions"][0]["token_ids"] == direct.token_ids
    assert "tokens/s" in capsys.readouterr().err


def test_generate_cli_user_errors(checkpoint, tmp_path, capsys):
    run, _, _ = checkpoint
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["generate", "--model", str(run), "--prompt", "x", "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err       # checked by the flag's type, at parse time
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["generate", "--model", str(run), "--input", str(bad)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_generate_cli_reads_stdin_in_a_subprocess(checkpoint):
    run, _, _ = checkpoint
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--model", str(run), "--chat", "--think",
                           "--max-new-tokens", "3", "--seed", "1"],
                          input="first question\nsecond question\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["first question", "second question"]
    assert all(r["completions"][0]["reasoning"] is not None for r in records)   # --think opened the block


def test_chat_loop_streams_collapses_reasoning_and_keeps_history(checkpoint):
    from rich.console import Console

    from nanoseek.infer.chat_cli import chat_loop

    _, model, tok = checkpoint
    engine = Engine(model, tok, max_batch_size=4, max_seq_len=256)
    seen_prompts = []
    real_stream = engine.stream

    def spy(ids, params, **kw):
        seen_prompts.append(tok.decode(ids))
        return real_stream(ids, params, **kw)

    engine.stream = spy
    script = iter(["hello there", "/samples 3", "and again", "/reset", "fresh start", "/samples 99", "/bogus", "/quit",
                   "never read"])
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=False)
    turns = chat_loop(engine, tok, lambda _prompt: next(script), console,
                      SamplingParams(max_new_tokens=8, temperature=1.0, seed=0, ignore_eos=True), think=True)
    out = buf.getvalue()
    assert turns == 3
    assert out.count("thought for") >= 1 + 3 + 1          # one per sample of each turn (reasoning never closed)
    assert "[sample 3]" in out and "(3 samples per turn)" in out and "(conversation reset)" in out
    assert "usage: /samples N" in out and "unknown command /bogus" in out
    assert "hello there" in seen_prompts[1] and "and again" in seen_prompts[1]     # history kept
    assert "hello there" not in seen_prompts[2]                                   # ...and reset
    assert next(script) == "never read"                                           # /quit stopped reading


def test_chat_cli_run_reads_stdin_until_eof(checkpoint, monkeypatch, capsys):
    run, _, _ = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/samples 2\nagain\n"))
    assert main(["chat", "--model", str(run), "--max-new-tokens", "4", "--seed", "0", "--think"]) == 0
    out = capsys.readouterr().out
    assert out.count("thought for") == 3 and "[sample 2]" in out


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A run whose context holds the tools' description (~600 tokens with this small vocabulary)."""
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    model = make_tiny_model(seed=0, vocab_size=tok.vocab_size, max_position_embeddings=1024).eval()
    run = tmp_path_factory.mktemp("longrun")
    save_pretrained(model, run / "final")
    tok.save(run / "final")
    return run / "final", model, tok


def test_generate_tools_flag_describes_the_tools_and_reports_the_loop(long_checkpoint, capsys):
    run, _, tok = long_checkpoint
    args = ["generate", "--model", str(run), "--chat", "--prompt", "What is 6*7?", "--max-new-tokens", "4", "--seed", "0"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--tools", "calculator", "--token-ids"]) == 0
    with_tools = json.loads(capsys.readouterr().out)
    assert with_tools["prompt_tokens"] > plain["prompt_tokens"] + 100        # the V3.1 description in the system turn
    c = with_tools["completions"][0]
    assert c["tool_calls"] == [] and "final_text" in c and len(c["model_mask"]) == len(c["token_ids"])
    assert main(args + ["--tools", "calculator,abacus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "abacus" in err[0] and "--tools" in err[0]


def test_tools_flag_on_a_tokenizer_without_tool_tokens_is_one_line(tmp_path, capsys):
    """A checkpoint trained before the tool tokens existed refuses --tools with one line."""
    from test_tool_template import old_nanoseek_vocabulary

    old = old_nanoseek_vocabulary(tmp_path / "old")
    save_pretrained(make_tiny_model(seed=0, vocab_size=300).eval(), old)
    for cmd in (["generate", "--prompt", "hi"], ["chat"]):
        assert main([*cmd, "--model", str(old), "--tools", "calculator", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no tool-call tokens" in err[0], err


def test_chat_loop_shows_each_call_and_keeps_it_in_the_history():
    """chat with a toolbox: the scripted model calls the calculator, the call and its output are shown
    where it was made, and the next turn re-sends the assistant tool_calls and the tool message."""
    from rich.console import Console

    from nanoseek.infer.chat_cli import chat_loop
    from nanoseek.tools.format import ToolCall, render_calls
    from nanoseek.tools.toolbox import Toolbox
    from serve_helpers import ScriptedEngine, make_tool_tokenizer

    tk = make_tool_tokenizer()

    def script(text, params, i):
        if text.endswith("<｜tool▁output▁end｜>"):
            return "Answer: " + text.rsplit("<｜tool▁output▁begin｜>", 1)[1].split("<")[0]
        return "Let me use it." + render_calls([ToolCall("calculator", '{"expression": "6*7"}'),
                                                ToolCall("calculator", '{"expression": "1/0"}')])

    engine = ScriptedEngine(tk, script, max_seq_len=4096)
    prompts = []
    real = engine.stream
    engine.stream = lambda ids, params, **kw: (prompts.append(tk.decode(ids)), real(ids, params, **kw))[1]
    lines = iter(["what is 6*7?", "thanks", "/quit"])
    buf = io.StringIO()
    turns = chat_loop(engine, tk, lambda _p: next(lines), Console(file=buf, width=200),
                      SamplingParams(max_new_tokens=200, temperature=0, tools="run"), toolbox=Toolbox.builtin("calculator"))
    out = buf.getvalue()
    assert turns == 2
    assert '[calculator({"expression": "6*7"}) -> 42]' in out and "-> error: division by zero] (failed)" in out
    assert out.index("Let me use it.") < out.index("-> 42]") < out.index("Answer:")
    second = prompts[1]
    assert "## Tools" in second and '<｜tool▁call▁begin｜>calculator<｜tool▁sep｜>{"expression": "6*7"}' in second
    assert "<｜tool▁output▁begin｜>42<｜tool▁output▁end｜>" in second and "thanks" in second


def test_generate_tools_follow_how_the_model_was_trained(long_checkpoint, capsys):
    """Without --describe-tools a command prompts the tools as the model's stage record says it was
    trained (stage.json describe_tools, next to final/); the flag overrides it; no record: full."""
    run, _, tok = long_checkpoint
    args = ["generate", "--model", str(run), "--chat", "--prompt", "What is 6*7?", "--max-new-tokens", "2", "--seed",
            "0", "--tools", "calculator", "--token-ids"]

    def prompt_tokens(*extra):
        assert main(args + list(extra)) == 0
        return json.loads(capsys.readouterr().out)["prompt_tokens"]

    full = prompt_tokens()
    assert prompt_tokens("--describe-tools", "full") == full
    record = run.parent / "stage.json"
    try:
        record.write_text(json.dumps({"kind": "grpo", "status": "done", "tools": "calculator", "describe_tools": "names"}))
        named = prompt_tokens()
        assert named < full - 100 and named == prompt_tokens("--describe-tools", "names")
        assert prompt_tokens("--describe-tools", "full") == full
        assert prompt_tokens("--no-describe-tools") < named
    finally:
        record.unlink()
