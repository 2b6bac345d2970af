"""The engine's tool loop (``SamplingParams.tools``, ``nanoseek/infer/tool_loop.py``) on a tiny random model.

A random model never writes a tool call, so the tests *script* the model: ``Engine._ban`` (the one
place every path passes its logits through before choosing) is patched to add a large bias to the
scripted next token of each sample, computed from the sample's own model-written tokens. Where a
test checks the cache, the script ends after the tool output and the real model decodes on, its
greedy tokens compared with full forwards over the whole sequence (prompt, calls, outputs).
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import make_tiny_model, reference_greedy, script_engine
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.tools.format import TOOL_TOKENS, ToolCall, render_calls
from nanoseek.tools.toolbox import Toolbox, ToolLimits

TOK = ByteTokenizer()
VOCAB = 272
EOS = TOK.eos_id
TT = {t: TOK.token_to_id(t) for t in TOOL_TOKENS}
CALLS_END = TT[TOOL_TOKENS[4]]


def script_ids(*parts: str) -> list[int]:
    """Model-written text (control strings as their ids)."""
    return TOK.encode("".join(parts))


def call_block(name: str, args: str) -> str:
    return render_calls([ToolCall(name, args)])


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=0, vocab_size=VOCAB, max_position_embeddings=512).eval()


def scripted(monkeypatch, scripts: dict[int, list[int]], then_free: bool = False):
    """:func:`conftest.script_engine` with the byte tokenizer's EOS."""
    script_engine(monkeypatch, scripts, EOS, then_free)


def test_a_call_runs_and_the_sample_goes_on_after_its_output(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    script = script_ids("Let me compute.", call_block("calculator", '{"expression": "6*7"}'), "Answer: 42")
    scripted(monkeypatch, {len(prompt): script})
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=150, temperature=0, tools="run"),
                        toolbox=Toolbox.builtin("calculator"))[0][0]
    assert c.finish_reason == "stop"
    assert [r.output for r in c.tool_results] == ["42"] and c.tool_results[0].ok
    assert [(t.name, t.arguments) for t in c.tool_calls] == [("calculator", '{"expression": "6*7"}')]
    appended = [EOS, TT[TOOL_TOKENS[5]], *TOK.encode_text("42"), TT[TOOL_TOKENS[6]]]
    assert c.token_ids == script[:script.index(CALLS_END) + 1] + appended + script[script.index(CALLS_END) + 1:] + [EOS]
    assert c.model_mask == [1] * (script.index(CALLS_END) + 1) + [0] * len(appended) + [1] * (len(script) - script.index(CALLS_END))
    assert len(c.logprobs) == len(c.token_ids) and all(lp == 0.0 for lp, m in zip(c.logprobs, c.model_mask) if not m)
    assert c.text == "Let me compute.Answer: 42" and c.final_text == "Answer: 42"


def test_stop_mode_ends_the_sample_at_the_block_with_its_calls(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    blk = render_calls([ToolCall("a", '{"x": 1}'), ToolCall("b", "{}")])
    scripted(monkeypatch, {len(prompt): script_ids("pre", blk, "never")})
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=100, temperature=0, tools="stop"))[0][0]
    assert c.finish_reason == "tool_calls" and c.text == "pre"
    assert [(t.name, t.arguments) for t in c.tool_calls] == [("a", '{"x": 1}'), ("b", "{}")]
    assert c.token_ids[-1] == CALLS_END and c.tool_results == []


def test_with_tools_off_the_block_is_ordinary_tokens(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    script = script_ids("x", call_block("a", "{}"), "y")
    scripted(monkeypatch, {len(prompt): script})
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=100, temperature=0))[0][0]
    assert c.finish_reason == "stop" and c.token_ids == script + [EOS] and c.tool_calls == []
    assert c.text == "xa{}y" and c.model_mask == [1] * len(c.token_ids)   # control tokens skipped, names kept


@pytest.mark.parametrize("block, expect", [
    (call_block("nope", "{}"), "error: unknown tool 'nope'"),
    (call_block("calculator", "{not json"), "error: arguments of 'calculator' are not valid JSON"),
    (call_block("calculator", '{"expr": "1"}'), "error: missing required argument 'expression'"),
    (call_block("calculator", '{"expression": "1/0"}'), "error: division by zero"),
    (TOOL_TOKENS[0] + TOOL_TOKENS[1] + "calculator" + TOOL_TOKENS[3] + TOOL_TOKENS[4], "error: malformed tool call"),
    (TOOL_TOKENS[0] + "junk" + TOOL_TOKENS[4], "error: malformed tool call"),
])
def test_a_malformed_call_is_an_error_the_model_reads(model, monkeypatch, block, expect):
    prompt = TOK.encode("q", add_bos=True)
    scripted(monkeypatch, {len(prompt): script_ids(block, "ok")})
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=256)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=200, temperature=0, tools="run"),
                        toolbox=Toolbox.builtin("calculator"))[0][0]
    assert c.finish_reason == "stop" and len(c.tool_results) == 1
    assert c.tool_results[0].output.startswith(expect) and not c.tool_results[0].ok
    assert TOK.decode(c.token_ids).count(expect) == 1 and c.final_text == "ok"


def test_call_limit_outputs_and_room(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    blk = call_block("calculator", '{"expression": "1+1"}')
    scripted(monkeypatch, {len(prompt): script_ids(blk, blk, blk, "done")})
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=256)
    box = Toolbox.builtin("calculator", limits=ToolLimits(max_calls=2))
    c = engine.generate([prompt], SamplingParams(max_new_tokens=250, temperature=0, tools="run"), toolbox=box)[0][0]
    assert [r.ok for r in c.tool_results] == [True, True, False]
    assert "limit" in c.tool_results[2].output and c.final_text == "done"
    # outputs that do not fit max_new_tokens end the sample ("length"), never overflow the row
    long = Toolbox(limits=ToolLimits(max_output_chars=10_000)).register(lambda: "z" * 500, name="big")
    other = TOK.encode("qq", add_bos=True)
    scripted(monkeypatch, {len(other): script_ids(call_block("big", "{}"), "after")})
    c = engine.generate([other], SamplingParams(max_new_tokens=100, temperature=0, tools="run"), toolbox=long)[0][0]
    assert c.finish_reason == "length"
    assert c.completion_tokens == len(c.token_ids) == len(c.model_mask) <= 100   # nothing the model never read
    assert [r.output for r in c.tool_results] == ["z" * 500] and c.tool_calls[0].name == "big"   # what ran


def test_other_rows_keep_decoding_while_a_tool_runs(model, monkeypatch):
    p_tool, p_plain = TOK.encode("q", add_bos=True), TOK.encode("qq", add_bos=True)
    seen: dict[str, int] = {}
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256)

    def slow() -> str:
        seen["start"] = engine.stats.decode_steps
        time.sleep(0.6)
        seen["end"] = engine.stats.decode_steps
        return "slept"

    scripted(monkeypatch, {len(p_tool): script_ids(call_block("slow", "{}"), "A"),
                           len(p_plain): script_ids("b" * 60)})
    box = Toolbox(limits=ToolLimits(timeout_s=5)).register(slow)
    handles = [engine.submit(p, SamplingParams(max_new_tokens=120, temperature=0, tools="run"), toolbox=box)
               for p in (p_tool, p_plain)]
    try:
        tool_c, plain_c = [h.result(timeout=60)[0] for h in handles]
    finally:
        engine.shutdown()
    assert tool_c.tool_results[0].output == "slept" and tool_c.final_text == "A"
    assert plain_c.text == "b" * 60
    assert seen["end"] - seen["start"] >= 20       # the plain row decoded on while the tool slept


def test_a_hanging_tool_times_out_and_the_sample_finishes(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    stop = threading.Event()
    box = Toolbox(limits=ToolLimits(timeout_s=0.3)).register(lambda: stop.wait(30) and "late", name="hang")
    scripted(monkeypatch, {len(prompt): script_ids(call_block("hang", "{}"), "x")})
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=256)
    t0 = time.perf_counter()
    c = engine.generate([prompt], SamplingParams(max_new_tokens=100, temperature=0, tools="run"), toolbox=box)[0][0]
    stop.set()
    assert time.perf_counter() - t0 < 10
    assert "timed out" in c.tool_results[0].output and c.final_text == "x"


@pytest.mark.parametrize("use_mtp", [False, True])
def test_the_row_cache_after_the_outputs_equals_a_full_forward(monkeypatch, use_mtp):
    """After the tool loop appends the outputs, the real model decodes on: its greedy tokens are the
    argmax of full forwards over prompt + everything so far (the extend wrote the cache right)."""
    model = make_tiny_model(seed=3, vocab_size=VOCAB, max_position_embeddings=512,
                            num_nextn_predict_layers=1 if use_mtp else 0).eval()
    prompts = [TOK.encode("q", add_bos=True), TOK.encode("a longer prompt here", add_bos=True)]
    scripts = {len(prompts[0]): script_ids("c", call_block("calculator", '{"expression": "12*12"}')),
               len(prompts[1]): script_ids(call_block("calculator", '{"expression": "2**10"}'),
                                           call_block("calculator", '{"expression": "3"}'))}
    scripted(monkeypatch, scripts, then_free=True)
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256, use_mtp=use_mtp)
    params = SamplingParams(max_new_tokens=120, temperature=0, tools="run", ignore_eos=True)
    out = engine.generate(prompts, params, toolbox=Toolbox.builtin("calculator"))
    for prompt, (c,) in zip(prompts, out):
        last_appended = max(i for i, m in enumerate(c.model_mask) if m == 0)
        free = c.token_ids[last_appended + 1:]
        assert len(free) >= 10
        assert free[:10] == reference_greedy(model, prompt + c.token_ids[:last_appended + 1], 10)
    assert [r.output for r in out[1][0].tool_results] == ["1024", "3"]


def test_tools_need_tool_tokens_and_a_toolbox(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="needs a toolbox"):
        engine.generate([[TOK.bos_id]], SamplingParams(tools="run"))
    with pytest.raises(ValueError, match="SamplingParams.tools"):
        engine.generate([[TOK.bos_id]], SamplingParams(tools="maybe"))

    class NoTools(ByteTokenizer):
        def token_to_id(self, token):
            return None if token in TOOL_TOKENS else super().token_to_id(token)

    bare = Engine(model, NoTools(), max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="no tool-call tokens"):
        bare.generate([[TOK.bos_id]], SamplingParams(tools="stop"))


def test_banned_tokens_are_never_sampled(model):
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    free = engine.generate([[TOK.bos_id]], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0][0]
    banned = sorted(set(free.token_ids))
    c = engine.generate([[TOK.bos_id]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=0, ignore_eos=True,
                                                       banned_token_ids=banned, n=3))[0]
    assert all(not set(x.token_ids) & set(banned) for x in c)


def test_stream_reports_each_tool_result_and_a_cancel_during_a_tool_frees_the_row(model, monkeypatch):
    prompt = TOK.encode("q", add_bos=True)
    scripted(monkeypatch, {len(prompt): script_ids("a", call_block("calculator", '{"expression": "2+3"}'), "b")})
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=256)
    events = list(engine.stream(prompt, SamplingParams(max_new_tokens=100, temperature=0, tools="run"),
                                toolbox=Toolbox.builtin("calculator")))
    results = [e.tool_result for e in events if e.tool_result is not None]
    assert [r.output for r in results] == ["5"]
    assert "".join(e.text_delta for e in events) == "ab" and events[-1].finished
    # a request cancelled while its tool runs finishes at once; its row is free for the next one
    release = threading.Event()
    box = Toolbox(limits=ToolLimits(timeout_s=20)).register(lambda: release.wait(20) and "x", name="slow")
    other = TOK.encode("qq", add_bos=True)
    scripted(monkeypatch, {len(other): script_ids(call_block("slow", "{}"), "z")})
    try:
        h = engine.submit(other, SamplingParams(max_new_tokens=100, temperature=0, tools="run", n=2), toolbox=box)
        deadline = time.time() + 20
        while not any(s.future is not None for s in engine._active) and time.time() < deadline:
            time.sleep(0.01)
        h.cancel()
        comps = h.result(timeout=10)
        assert [c.finish_reason for c in comps] == ["cancelled", "cancelled"]
        again = engine.submit(TOK.encode("qqq", add_bos=True), SamplingParams(max_new_tokens=3, temperature=0))
        assert again.result(timeout=20)[0].completion_tokens == 3
    finally:
        release.set()
        engine.shutdown()


def test_a_stop_string_never_matches_across_a_tool_call(model, monkeypatch):
    """The text on either side of a calls block is separate: stop=["\\n\\n"] with "...\\n" before the
    block and "\\n..." after the tool output must not stop the sample right after the output (the
    stop filter held the "\\n" written before the block and matched it with the one after it, so
    final_text was empty and the answer lost). A stop string completed in one text still stops."""
    prompt = TOK.encode("q", add_bos=True)
    blk = call_block("calculator", '{"expression": "6*7"}')
    scripted(monkeypatch, {len(prompt): script_ids("Let me compute.\n", blk, "\nAnswer: 42\n\nmore")})
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=256)
    box = Toolbox.builtin("calculator")
    cases = {("\n\n",): ("\nAnswer: 42", "stop_string"), ("\n\nmo", "\n\n"): ("\nAnswer: 42", "stop_string"),
             (".\n\n",): ("\nAnswer: 42\n\nmore", "eos"), ("42\n",): ("\nAnswer: ", "stop_string")}
    for stop, (final, why) in cases.items():
        c = engine.generate([prompt], SamplingParams(max_new_tokens=150, temperature=0, tools="run", stop=list(stop)),
                            toolbox=box)[0][0]
        assert [r.output for r in c.tool_results] == ["42"], stop
        assert (c.final_text, c.stop_reason) == (final, why), (stop, c.text)
        assert c.text == "Let me compute.\n" + final     # the model's own text: held text released at the block


def test_a_bad_toolbox_fails_only_its_own_request(model, monkeypatch):
    """A toolbox that is not one (a dict of functions) is a ValueError line at submit; a Toolbox
    whose run() raises (run_block never does with a sound one) makes that sample read an "error:
    the tool runner failed" output and go on, and a plain request decoding beside it finishes
    untouched (the exception used to escape the scheduler and fail every request in the engine)."""
    class Broken(Toolbox):
        def run(self, call):
            raise RuntimeError("boom")

    p_tool, p_plain = TOK.encode("q", add_bos=True), TOK.encode("qq", add_bos=True)
    scripted(monkeypatch, {len(p_tool): script_ids("x" * 20, call_block("calculator", '{"expression": "1"}'), "A"),
                           len(p_plain): script_ids("b" * 80)})
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=256)
    try:
        run = SamplingParams(max_new_tokens=200, temperature=0, tools="run")
        for bad in ({"calculator": lambda expression: "1"}, object(), Toolbox.builtin):
            with pytest.raises(ValueError, match="toolbox: expected a nanoseek.tools.Toolbox"):
                engine.submit(p_tool, run, toolbox=bad)
        plain = engine.submit(p_plain, SamplingParams(max_new_tokens=100, temperature=0))
        broken = engine.submit(p_tool, run, toolbox=Broken.builtin("calculator"))
        c = broken.result(timeout=60)[0]
        assert [r.ok for r in c.tool_results] == [False] and c.tool_calls[0].name == "calculator"
        assert c.tool_results[0].output.startswith("error: the tool runner failed (RuntimeError: boom")
        assert c.final_text == "A" and c.finish_reason == "stop", (c.text, c.finish_reason, c.stop_reason)
        assert plain.result(timeout=60)[0].text == "b" * 80
    finally:
        engine.shutdown()


def test_generate_each_batches_requests_with_and_without_tools_as_alone(model, monkeypatch):
    """Requests with their own settings (a tool-running one, sampled ones without tools) in one batch:
    each request's completions equal generating it alone, and GRPO's mixed rollouts
    (:func:`nanoseek.post.rollout.sample_mixed`) take that one call where the engine has it."""
    from nanoseek.post.rollout import sample_mixed

    tool_prompt = TOK.encode("q", add_bos=True)
    script = script_ids("Let me compute.", call_block("calculator", '{"expression": "6*7"}'), "Answer: 42")
    scripted(monkeypatch, {len(tool_prompt): script})
    box = Toolbox.builtin("calculator")
    plain = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=7)
    run = SamplingParams(max_new_tokens=150, temperature=0, n=2, seed=7, tools="run")
    requests = [(TOK.encode("a longer question", add_bos=True), plain, None), (tool_prompt, run, box),
                (TOK.encode("another one, longer still", add_bos=True), plain, None)]
    engine = Engine(model, TOK, max_batch_size=8, max_seq_len=256)
    together = engine.generate_each(requests)
    alone = [engine.generate([p], sp, **({"toolbox": tb} if tb is not None else {}))[0] for p, sp, tb in requests]

    def fields(groups):
        return [[(c.token_ids, c.model_mask, [r.output for r in c.tool_results or []]) for c in g] for g in groups]

    assert fields(together) == fields(alone)
    assert [len(g) for g in together] == [3, 2, 3] and together[1][0].tool_results[0].output == "42"

    class PerKind:            # an engine without generate_each: sample_mixed calls it once per kind
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def generate(self, prompts, params, toolbox=None):
            self.calls += 1
            return self.inner.generate(prompts, params, **({"toolbox": toolbox} if toolbox is not None else {}))

    ids, with_tools = [p for p, _, _ in requests], [False, True, False]
    one = sample_mixed(engine, ids, with_tools, plain, run, "chat", toolbox=box, tokenizer=TOK)
    per_kind = PerKind(engine)
    two = sample_mixed(per_kind, ids, with_tools, plain, run, "chat", toolbox=box, tokenizer=TOK)
    assert per_kind.calls == 2 and fields(one.groups) == fields(two.groups) == fields(together)
    assert one.texts == two.texts
