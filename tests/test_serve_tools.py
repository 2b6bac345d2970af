"""Tool calls through the chat API, with the official ``openai`` client against a live server.

The "model" is :class:`ScriptedEngine`: it writes chosen text (DeepSeek-V3.1 tool-call blocks
included) through the real engine's per-token pipeline, so the server sees the events the engine
sends. Covered: one, parallel and n>1 calls, streamed (accumulated by the ``openai`` client's own
stream state) and not, always agreeing; the round trip (call -> tool message -> answer); each
``tool_choice``; ``parallel_tool_calls``; 400s for bad schemas, unknown named choices, tool
messages without ids and tokenizers without the tool tokens; malformed model output (bad JSON,
an open block, text between calls); and the real engine behind the same requests.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.serve.api import ServeLimits, create_app
from nanoseek.tools.format import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN,
                                   TOOL_OUTPUT_END, TOOL_SEP, TOOL_TOKENS, TOOLS_HEADER, ToolTokens)
from serve_helpers import ScriptedEngine, background_server, make_test_tokenizer, make_tool_tokenizer

MODEL = "nanoseek-test"
CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                        "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}, "strict": False}}
TOOLS = [CALC, WEATHER]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def call(name: str, args: str) -> str:
    return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}"


def block(*calls: str) -> str:
    return TOOL_CALLS_BEGIN + "".join(calls) + TOOL_CALLS_END


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tk():
    return make_tool_tokenizer()


@pytest.fixture(scope="module")
def server(tk):
    engine = ScriptedEngine(tk, lambda prompt, params, i: "plain answer", max_seq_len=2048)
    with background_server(create_app(engine, tk, MODEL, ServeLimits(max_tokens=400))) as url:
        yield engine, url


@pytest.fixture
def engine(server):
    return server[0]


@pytest.fixture
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture
def raw(server):
    with httpx.Client(base_url=server[1], timeout=20) as c:
        yield c


def streamed(client, **kw):
    """The completion as the ``openai`` client's own stream accumulation builds it (its snapshot when
    the reply was cut by the length limit: the client refuses to "parse" those)."""
    state = ChatCompletionStreamState(input_tools=kw.get("tools", openai.omit))
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        state.handle_chunk(chunk)
    try:
        return state.get_final_completion()
    except openai.LengthFinishReasonError:
        return state.current_completion_snapshot


def calls_of(choice) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]


def sse_chunks(raw, body: dict) -> list[dict]:
    with raw.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# ----------------------------------------------------------------------------- calls, streamed and not
def test_one_call(client, engine, tk):
    engine.script = lambda p, params, i: block(call("calculator", '{"expression": "347*829"}'))
    r = client.chat.completions.create(model=MODEL, messages=user("What is 347*829?"), tools=TOOLS)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None
    assert calls_of(ch) == [("calculator", '{"expression": "347*829"}')]
    assert CALL_ID.match(ch.message.tool_calls[0].id) and ch.message.tool_calls[0].type == "function"
    assert json.loads(ch.message.tool_calls[0].function.arguments) == {"expression": "347*829"}
    prompt = tk.decode(engine.prompts[-1])
    assert TOOLS_HEADER in prompt and "### calculator" in prompt and "### get_weather" in prompt   # described
    assert engine.params[-1].tools == "stop"           # client mode: the engine ends the sample with its block


@pytest.mark.parametrize("n", [1, 3])
def test_parallel_calls_streamed_equal_whole(client, engine, n):
    engine.script = lambda p, params, i: (f"Checking {i}." + block(call("calculator", f'{{"expression": "{i}+1"}}'),
                                                                   call("get_weather", '{"city": "Paris"}')))
    kw = dict(messages=user("two things"), tools=TOOLS, n=n)
    whole = client.chat.completions.create(model=MODEL, **kw)
    stream = streamed(client, **kw)
    assert len(whole.choices) == len(stream.choices) == n
    for i, (a, b) in enumerate(zip(whole.choices, sorted(stream.choices, key=lambda c: c.index))):
        want = [("calculator", f'{{"expression": "{i}+1"}}'), ("get_weather", '{"city": "Paris"}')]
        assert calls_of(a) == calls_of(b) == want
        assert a.message.content == b.message.content == f"Checking {i}."
        assert a.finish_reason == b.finish_reason == "tool_calls"
        ids = [c.id for c in a.message.tool_calls] + [c.id for c in b.message.tool_calls]
        assert all(CALL_ID.match(x) for x in ids) and len(set(ids)) == 4


def test_stream_deltas_are_openais_shape(raw, engine):
    engine.script = lambda p, params, i: block(call("calculator", '{"expression": "2*(3+4)"}'),
                                               call("get_weather", '{"city": "Oslo"}'))
    chunks = sse_chunks(raw, {"model": MODEL, "messages": user("x"), "tools": TOOLS})
    deltas = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    heads = [d[0] for d in deltas if "id" in d[0]]
    assert [h["index"] for h in heads] == [0, 1]
    for h, name in zip(heads, ["calculator", "get_weather"]):
        assert CALL_ID.match(h["id"]) and h["type"] == "function" and h["function"] == {"name": name, "arguments": ""}
    frags = [d[0] for d in deltas if "id" not in d[0]]
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in frags)
    assert len([f for f in frags if f["index"] == 0]) > 1          # arguments arrive in fragments
    assert "".join(f["function"]["arguments"] for f in frags if f["index"] == 0) == '{"expression": "2*(3+4)"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_and_content_before_the_calls(client, engine):
    engine.script = lambda p, params, i: ("I need the tool.\n</think>\n\nLet me compute."
                                          + block(call("calculator", '{"expression": "9*9"}')))
    for r in (client.chat.completions.create(model=MODEL, messages=user("9*9?"), tools=TOOLS, reasoning_effort="high"),
              streamed(client, messages=user("9*9?"), tools=TOOLS, reasoning_effort="high")):
        msg = r.choices[0].message
        assert msg.reasoning_content == "I need the tool." and msg.content == "Let me compute."
        assert calls_of(r.choices[0]) == [("calculator", '{"expression": "9*9"}')]


def test_round_trip(client, engine, tk):
    def script(prompt, params, i):
        if TOOL_OUTPUT_END in prompt:
            return "Answer: " + prompt.rsplit(TOOL_OUTPUT_BEGIN, 1)[1].split(TOOL_OUTPUT_END)[0]
        return block(call("calculator", '{"expression": "347*829"}'))
    engine.script = script
    messages = user("What is 347*829?")
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    msg = first.choices[0].message
    messages.append(msg.model_dump(exclude_none=True, exclude={"reasoning_content"}))   # content null: left out
    messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "287663"})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "Answer: 287663"
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    prompt = tk.decode(engine.prompts[-1])
    assert prompt.endswith(block(call("calculator", '{"expression": "347*829"}')) + tk.decode([tk.eos_id])
                           + TOOL_OUTPUT_BEGIN + "287663" + TOOL_OUTPUT_END)          # no new Assistant header
    # the same history with content null sent explicitly, and arguments as an object
    messages[1] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": msg.tool_calls[0].id, "type": "function",
         "function": {"name": "calculator", "arguments": {"expression": "347*829"}}}]}
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert again.choices[0].message.content == "Answer: 287663"


def test_tokenize_counts_the_chat_prompt_with_tools(raw, engine, client):
    """vLLM's /tokenize with ``tools`` and ``tool_choice``: exactly the ids the chat endpoint submits."""
    engine.script = lambda p, params, i: "ok"
    for extra in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}},
                  {}):
        client.chat.completions.create(model=MODEL, messages=user("count me"), **extra)
        r = raw.post("/tokenize", json={"model": MODEL, "messages": user("count me"), **extra})
        assert r.status_code == 200 and r.json()["tokens"] == engine.prompts[-1]
    r = raw.post("/tokenize", json={"messages": user("x"), "tools": [{"type": "function", "function": {"name": "a b"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.name"


# ----------------------------------------------------------------------------- tool_choice, parallel_tool_calls
def test_tool_choice_none_never_calls(client, engine, tk):
    engine.script = lambda p, params, i: "Let me see." + block(call("calculator", '{"expression": "1"}'))
    for r in (client.chat.completions.create(model=MODEL, messages=user("x"), tools=TOOLS, tool_choice="none"),
              streamed(client, messages=user("x"), tools=TOOLS, tool_choice="none")):
        ch = r.choices[0]
        assert ch.message.tool_calls is None and ch.finish_reason == "stop" and ch.message.content == "Let me see."
    assert TOOLS_HEADER in tk.decode(engine.prompts[-1])            # still described
    assert ToolTokens.of(tk).calls_begin in engine.params[-1].banned_token_ids


@pytest.mark.parametrize("effort", [None, "high"])
def test_tool_choice_required_forces_a_call(client, engine, tk, effort):
    engine.script = lambda p, params, i: ("get_weather" + TOOL_SEP + '{"city": "Rome"}' + TOOL_CALL_END + TOOL_CALLS_END
                                          + "and more")
    kw = dict(messages=user("hi"), tools=TOOLS, tool_choice="required",
              **({"reasoning_effort": effort} if effort else {}))
    whole = client.chat.completions.create(model=MODEL, **kw)
    for r in (whole, streamed(client, **kw)):
        assert calls_of(r.choices[0]) == [("get_weather", '{"city": "Rome"}')]
        assert r.choices[0].finish_reason == "tool_calls"
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
    t = ToolTokens.of(tk)
    assert t.calls_end in engine.params[-1].stop_token_ids     # the engine cannot see the forced block open
    assert whole.usage.completion_tokens == len(tk.encode("get_weather" + TOOL_SEP + '{"city": "Rome"}'
                                                                          + TOOL_CALL_END + TOOL_CALLS_END))
    assert engine.prompts[-1][-2:] == [t.calls_begin, t.call_begin]
    assert not tk.decode(engine.prompts[-1]).rstrip(TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN).endswith("<think>\n")


def test_tool_choice_named_forces_that_function(client, engine, tk):
    engine.script = lambda p, params, i: ' {"city": "Lima"} ' + TOOL_CALL_END + TOOL_CALLS_END
    kw = dict(messages=user("hi"), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
              n=2)
    for r in (client.chat.completions.create(model=MODEL, **kw), streamed(client, **kw)):
        for ch in r.choices:
            assert calls_of(ch) == [("get_weather", '{"city": "Lima"}')] and ch.finish_reason == "tool_calls"
    t = ToolTokens.of(tk)
    assert tk.decode(engine.prompts[-1]).endswith(TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP)
    assert engine.prompts[-1][-1] == t.sep


def test_parallel_tool_calls_false_returns_one_call(client, engine, tk):
    engine.script = lambda p, params, i: block(call("calculator", '{"expression": "1+1"}'),
                                               call("calculator", '{"expression": "2+2"}'))
    kw = dict(messages=user("x"), tools=TOOLS, parallel_tool_calls=False)
    for r in (client.chat.completions.create(model=MODEL, **kw), streamed(client, **kw)):
        assert calls_of(r.choices[0]) == [("calculator", '{"expression": "1+1"}')]
        assert r.choices[0].finish_reason == "tool_calls"
    assert ToolTokens.of(tk).call_end in engine.params[-1].stop_token_ids
    r = client.chat.completions.create(model=MODEL, messages=user("x"), tools=TOOLS, parallel_tool_calls=True)
    assert len(r.choices[0].message.tool_calls) == 2


def test_no_tools_keeps_tool_text_out_of_the_parser(client, engine):
    """Without tools the reply is plain text (control tokens skipped), as before tools existed."""
    engine.script = lambda p, params, i: "ok" + block(call("calculator", "{}"))
    r = client.chat.completions.create(model=MODEL, messages=user("x"))
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "okcalculator{}"


# ----------------------------------------------------------------------------- malformed model output
MALFORMED = [
    # (what the model writes, max_tokens, expected calls, finish_reason)
    ("bad json", block(call("calculator", '{"expression": 3*')), None,
     [("calculator", '{"expression": 3*')], "tool_calls"),
    ("unknown tool", block(call("launch_rockets", "{}")), None, [("launch_rockets", "{}")], "tool_calls"),
    ("eos after a call, block open", TOOL_CALLS_BEGIN + call("calculator", '{"expression": "1"}'), None,
     [("calculator", '{"expression": "1"}')], "tool_calls"),
    ("eos inside the arguments", TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "calculator" + TOOL_SEP + '{"expr', None,
     [("calculator", '{"expr')], "stop"),
    ("cut by max_tokens", block(call("calculator", '{"expression": "1234567890 + 1234567890"}')), 4,
     "partial", "length"),
    ("call without a separator", block(TOOL_CALL_BEGIN + "calculator" + TOOL_CALL_END,
                                       call("get_weather", '{"city": "Nice"}')), None,
     [("get_weather", '{"city": "Nice"}')], "tool_calls"),
    ("text between calls", block(call("calculator", '{"expression": "1"}') + " and then ",
                                 call("calculator", '{"expression": "2"}')), None,
     [("calculator", '{"expression": "1"}'), ("calculator", '{"expression": "2"}')], "tool_calls"),
    ("unicode split across tokens, spaces around", block(call(" get_weather ", ' {"city": "Zürich 🌧 東京"}\n')), None,
     [("get_weather", '{"city": "Zürich 🌧 東京"}')], "tool_calls"),
    ("empty block", TOOL_CALLS_BEGIN + TOOL_CALLS_END, None, [], "stop"),
    ("block never started a call", TOOL_CALLS_BEGIN + "calculator", None, [], "stop"),
]


@pytest.mark.parametrize("name,text,max_tokens,want,finish", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_output_is_returned_as_written(client, engine, tk, name, text, max_tokens, want, finish):
    engine.script = lambda p, params, i: "Hm." + text
    if max_tokens:      # counted from the start of the arguments
        max_tokens += len(tk.encode("Hm." + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "calculator" + TOOL_SEP))
    kw = dict(messages=user("x"), tools=TOOLS, **({"max_tokens": max_tokens} if max_tokens else {}))
    whole, stream = client.chat.completions.create(model=MODEL, **kw), streamed(client, **kw)
    for r in (whole, stream):
        ch = r.choices[0]
        assert ch.finish_reason == finish
        assert ch.message.content == "Hm."
        if want == "partial":     # the open call as far as it got: a prefix of what the model wrote
            [(fn, args)] = calls_of(ch)
            assert fn == "calculator" and '{"expression": "1234567890 + 1234567890"}'.startswith(args) and args
        else:
            assert calls_of(ch) == want
    assert calls_of(whole.choices[0]) == calls_of(stream.choices[0])


def test_stop_string_never_hangs_or_500s(client, engine):
    engine.script = lambda p, params, i: "a" + block(call("calculator", '{"expression": "STOP"}'))
    r = client.chat.completions.create(model=MODEL, messages=user("x"), tools=TOOLS, stop=["STOP"])
    assert r.choices[0].finish_reason in ("stop", "tool_calls")


# ----------------------------------------------------------------------------- bad requests: 400 naming the field
BAD = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool not an object", {"tools": ["calculator"]}, "tools[0]"),
    ("tool type", {"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ("no function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("bad name", {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ("parameters not object", {"tools": [CALC, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools[1].function.parameters"),
    ("properties", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": 3}}}}]}, "tools[0].function.parameters.properties"),
    ("required", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": "a"}}}]}, "tools[0].function.parameters.required"),
    ("description", {"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
     "tools[0].function.description"),
    ("duplicate", {"tools": [CALC, CALC]}, "tools[1].function.name"),
    ("unknown named choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ("named choice type", {"tools": TOOLS, "tool_choice": {"type": "tool", "function": {"name": "calculator"}}},
     "tool_choice.type"),
    ("named choice shape", {"tools": TOOLS, "tool_choice": {"type": "function", "name": "calculator"}},
     "tool_choice.function"),
    ("choice string", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("parallel not bool", {"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("tool message without id", {"messages": user("x") + [{"role": "tool", "content": "1"}]},
     "messages[1].tool_call_id"),
    ("tool_call_id on a user message", {"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
     "messages[0].tool_call_id"),
    ("tool_calls on a user message", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ("null content without calls", {"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ("call without function", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}]},
     "messages[0].tool_calls[0].function"),
    ("deprecated functions", {"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("name,fields,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_400s_naming_the_field(raw, name, fields, param):
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "\n" not in err["message"] and len(err["message"]) < 400


class _NoToolTokens(Tokenizer):
    """A tokenizer whose vocabulary lacks the tool tokens (an old nanoseek checkpoint, another family)."""

    def token_to_id(self, token):
        return None if token in TOOL_TOKENS else super().token_to_id(token)


def test_model_without_tool_tokens_refuses_tools_in_one_line():
    tk = _NoToolTokens(make_test_tokenizer()._tk)
    engine = ScriptedEngine(tk, lambda *a: "hi")
    with background_server(create_app(engine, tk, MODEL)) as url, httpx.Client(base_url=url) as c:
        for fields, param in [({"tools": TOOLS}, "tools"),
                              ({"messages": user("x") + [{"role": "assistant", "content": None, "tool_calls": [
                                  {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                                                         {"role": "tool", "tool_call_id": "c", "content": "1"}]},
                               "messages")]:
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), **fields})
            assert r.status_code == 400 and r.json()["error"]["param"] == param
            msg = r.json()["error"]["message"]
            assert "no tool-call tokens" in msg and "cannot call tools" in msg and "\n" not in msg
        ok = c.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "tools": [],
                                                  "tool_choice": "none"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi"
    assert len(engine.prompts) == 1          # the refused requests never reached the engine


def test_openai_client_error_for_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("x"),
                                       tools=[{"type": "function", "function": {"name": "a b"}}])
    assert e.value.status_code == 400 and "tools[0].function.name" in str(e.value)


# ----------------------------------------------------------------------------- the real engine
def _nested_schema(depth: int) -> str:
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + '}}' * depth


def _post_text(raw, body: str) -> httpx.Response:
    return raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("depth,status", [(20, 200), (400, 400)])
def test_deeply_nested_tool_schema_is_a_400_naming_the_field(raw, engine, depth, status):
    """A tool's parameters nested hundreds of levels (valid JSON) made the template's recursive walk
    hit RecursionError: a 500. Now nesting past MAX_JSON_DEPTH (64) is a one-line 400 naming
    tools[0].function.parameters; a deep-but-sane schema is served."""
    engine.script = lambda p, params, i: "ok"
    body = ('{"model":"' + MODEL + '","max_tokens":5,"messages":[{"role":"user","content":"x"}],'
            '"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":' + _nested_schema(depth)
            + '}}}}]}')
    r = _post_text(raw, body)
    assert r.status_code == status, r.text[:300]
    if status == 400:
        err = r.json()["error"]
        assert err["param"] == "tools[0].function.parameters" and "nested deeper than 64 levels" in err["message"]


@pytest.mark.parametrize("depth,status", [(50, 200), (600, 400)])
def test_deeply_nested_call_arguments_are_a_400_naming_the_field(raw, engine, depth, status):
    """An assistant message's tool_calls[].function.arguments sent as an object nested 600 levels
    was a RecursionError 500 in the template; now a 400 naming the message and the field."""
    engine.script = lambda p, params, i: "ok"
    deep = '{"a":' * depth + '1' + '}' * depth
    body = ('{"model":"' + MODEL + '","max_tokens":5,"tools":[{"type":"function","function":{"name":"f"}}],"messages":['
            '{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":'
            '"function","function":{"name":"f","arguments":' + deep + '}}]},'
            '{"role":"tool","tool_call_id":"c","content":"1"}]}')
    r = _post_text(raw, body)
    assert r.status_code == status, r.text[:300]
    if status == 400:
        msg = r.json()["error"]["message"]
        assert "tool_calls[0].function.arguments: nested deeper than 64 levels" in msg and "\n" not in msg


@pytest.mark.parametrize("text,content", [("", None), ("\n\n", None), ("Let me check.", "Let me check."),
                                          ("  Let me check.\n", "Let me check.")])
def test_streamed_and_whole_replies_agree_on_content_before_calls(client, engine, text, content):
    """The whole reply of a calls-only turn says content null; the stream's opening chunk used to
    send content "" (and blank text before the block was streamed but stripped from the whole reply),
    so the openai client accumulated '' or whitespace. With the request's tools the opening content is
    null and blank text before the calls is held, so both give the same content."""
    engine.script = lambda p, params, i: text + block(call("calculator", '{"expression": "1+1"}'))
    kw = dict(messages=user("1+1?"), tools=[CALC])
    whole = client.chat.completions.create(model=MODEL, **kw).choices[0]
    part = streamed(client, **kw).choices[0]
    assert whole.finish_reason == part.finish_reason == "tool_calls"
    assert calls_of(whole) == calls_of(part) == [("calculator", '{"expression": "1+1"}')]
    assert whole.message.content == part.message.content == content
    # a reply without calls keeps its text either way
    engine.script = lambda p, params, i: text + "no call"
    whole, part = client.chat.completions.create(model=MODEL, **kw).choices[0], streamed(client, **kw).choices[0]
    assert whole.message.content == part.message.content == "no call" if content is None else content + "no call"


@pytest.mark.parametrize("stream", [False, True])
def test_text_before_a_call_is_not_lost_to_a_held_stop_prefix(client, engine, stream):
    """stop=["##"] and the model writes "Let me check #" then a calls block: the "#" (a prefix of
    the stop string) was held by the stop filter at the block's start and released only with the
    last event, when the parser no longer took content: the reply lost it. A stop string never
    spans a calls block, so the held text is the content's."""
    engine.script = lambda p, params, i: "Let me check #" + block(call("calculator", '{"expression": "1"}'))
    kw = dict(messages=user("1?"), tools=[CALC], stop=["##"])
    ch = streamed(client, **kw).choices[0] if stream else client.chat.completions.create(model=MODEL, **kw).choices[0]
    assert ch.finish_reason == "tool_calls" and calls_of(ch) == [("calculator", '{"expression": "1"}')]
    assert ch.message.content == "Let me check #"


def test_control_tokens_inside_arguments_are_never_argument_text(client, engine):
    """Every control token the model samples inside a call's arguments is dropped, the tool-output
    tokens too (they used to be kept as text while EOS-like ones were dropped)."""
    args = '{"expression": ' + TOOL_OUTPUT_BEGIN + '"1+1"' + TOOL_OUTPUT_END + '}'
    engine.script = lambda p, params, i: block(call("calculator", args))
    kw = dict(messages=user("1+1?"), tools=[CALC])
    for r in (client.chat.completions.create(model=MODEL, **kw), streamed(client, **kw)):
        assert calls_of(r.choices[0]) == [("calculator", '{"expression": "1+1"}')]


def test_real_engine_serves_every_tool_choice(tk):
    """A tiny random DeepSeek-V3 behind the same requests: the engine accepts the tool settings and
    every reply is a well-formed chat completion (whatever a random model writes)."""
    from nanoseek.infer.engine import Engine
    from nanoseek.model.config import load_model_config
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_model_config("tiny").replace(vocab_size=tk.vocab_size,
                                                                    max_position_embeddings=1024)).eval()
    engine = Engine(model, tk, max_batch_size=4, max_seq_len=1024)
    engine.start()
    try:
        with background_server(create_app(engine, tk, MODEL, ServeLimits(max_tokens=8))) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for choice in ["auto", "none", "required", {"type": "function", "function": {"name": "calculator"}}]:
                for stream in (False, True):
                    kw = dict(messages=user("1+1?"), tools=TOOLS, tool_choice=choice, max_tokens=8, n=2,
                              parallel_tool_calls=choice != "auto")
                    r = streamed(client, **kw) if stream else client.chat.completions.create(model=MODEL, **kw)
                    for ch in r.choices:
                        assert ch.finish_reason in ("stop", "length", "tool_calls")
                        if choice == "none":
                            assert not ch.message.tool_calls
                        if isinstance(choice, dict) and ch.message.tool_calls:
                            assert ch.message.tool_calls[0].function.name == "calculator"
        from nanoseek.tools.toolbox import Toolbox     # server-side tools: the engine's tool loop gets the toolbox
        app = create_app(engine, tk, MODEL, ServeLimits(max_tokens=8), toolbox=Toolbox.builtin("calculator"))
        with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as raw:
            for stream in (False, True):
                body = {"model": MODEL, "messages": user("1+1?"), "max_tokens": 8, "n": 2}
                if stream:
                    assert sse_chunks(raw, body)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    r = raw.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    finally:
        engine.shutdown()


def test_nanoseek_serve_tools_flag(tmp_path):
    """``nanoseek serve --tools calculator`` from a run folder whose tokenizer has the tool tokens."""
    from nanoseek.cli import build_parser
    from nanoseek.data.tokenizer import Tokenizer as Tok
    from nanoseek.serve.cli import build_server
    from serve_helpers import make_tiny_run

    run = make_tiny_run(tmp_path / "tiny-run", make_tool_tokenizer(), max_position_embeddings=1024)
    try:
        Tok.load(run / "final").encode_chat(user("x"), add_generation_prompt=True, tools=[CALC])
    except ValueError:
        pytest.skip("nanoseek's chat template does not render tools yet (issue 20's template part)")
    args = build_parser().parse_args(["serve", "--model", str(run), "--port", "0", "--max-batch-size", "4",
                                      "--tools", "calculator", "--max-seq-len", "1024"])
    app, engine = build_server(args)
    try:
        with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as raw:
            r = raw.post("/v1/chat/completions", json={"model": "tiny-run", "messages": user("1+1?"), "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert app.state.server.toolbox is not None and "calculator" in app.state.server.toolbox
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- server-side tools (serve --tools)
def answer_with_calculator(prompt: str, params, i: int) -> str:
    """Call the calculator, then answer with what it returned."""
    if TOOL_OUTPUT_END in prompt:
        return " Answer: " + prompt.rsplit(TOOL_OUTPUT_BEGIN, 1)[1].split(TOOL_OUTPUT_END)[0]
    return f"Let me compute {i}." + block(call("calculator", f'{{"expression": "347*829+{i}"}}'))


@pytest.fixture(scope="module")
def tool_server(tk):
    from nanoseek.tools.toolbox import Toolbox

    engine = ScriptedEngine(tk, answer_with_calculator, max_seq_len=2048)
    app = create_app(engine, tk, MODEL, ServeLimits(max_tokens=400), toolbox=Toolbox.builtin("calculator"))
    with background_server(app) as url:
        yield engine, url


def test_server_runs_its_tools_for_requests_without_tools(tool_server, tk):
    engine, url = tool_server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    body = {"model": MODEL, "messages": user("What is 347*829?"), "n": 2}
    with httpx.Client(base_url=url, timeout=20) as raw:
        whole = raw.post("/v1/chat/completions", json=body).json()
        chunks = sse_chunks(raw, body)
    assert "### calculator" in tk.decode(engine.prompts[-1]) and engine.params[-1].tools == "run"
    for i, ch in enumerate(whole["choices"]):
        msg = ch["message"]
        assert ch["finish_reason"] == "stop" and "tool_calls" not in msg
        assert msg["content"] == f"Let me compute {i}. Answer: {347 * 829 + i}"
        [run] = msg["tool_runs"]
        assert run["function"] == {"name": "calculator", "arguments": f'{{"expression": "347*829+{i}"}}'}
        assert run["output"] == str(347 * 829 + i) and run["ok"] is True and CALL_ID.match(run["id"])
        # streamed: the same text, the run reported between the text before the call and the answer
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        order = ["run" if d["delta"].get("tool_run") else "text" for d in mine if d["delta"].get("tool_run")
                 or d["delta"].get("content")]
        assert order.count("run") == 1 and order[0] == "text" and order[-1] == "text"
        assert "".join(d["delta"].get("content") or "" for d in mine) == msg["content"]
        assert [d["delta"]["tool_run"]["output"] for d in mine if d["delta"].get("tool_run")] == [run["output"]]
    # the openai client takes the extra field in stride (streamed and not)
    r = client.chat.completions.create(model=MODEL, messages=user("x"))
    assert r.choices[0].message.content.endswith(str(347 * 829)) and r.choices[0].message.tool_runs[0]["ok"]
    assert streamed(client, messages=user("x")).choices[0].message.content == r.choices[0].message.content


def test_server_tools_failed_call_and_opt_outs(tool_server, tk):
    engine, url = tool_server
    with httpx.Client(base_url=url, timeout=20) as raw:
        # a call the tool rejects: the model reads the error, the API reports ok false
        engine.script = lambda p, params, i: ("Done." if TOOL_OUTPUT_END in p
                                              else block(call("calculator", '{"expr": "1"}')))
        msg = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x")}).json()["choices"][0]["message"]
        assert msg["tool_runs"][0]["ok"] is False and msg["tool_runs"][0]["output"].startswith("error:")
        assert msg["content"] == "Done."
        # tool_choice none: no tools described, none run
        engine.script = lambda p, params, i: "plain"
        r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "tool_choice": "none"})
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "plain", "reasoning_content": None}
        assert "### calculator" not in tk.decode(engine.prompts[-1]) and engine.params[-1].tools == "off"
        # a request with its own tools is client-run, whatever the server has
        engine.script = lambda p, params, i: block(call("get_weather", '{"city": "Bergen"}'))
        ch = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "tools": [WEATHER]}).json()
        ch = ch["choices"][0]
        assert ch["finish_reason"] == "tool_calls" and "tool_runs" not in ch["message"]
        assert ch["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert "### calculator" not in tk.decode(engine.prompts[-1])
    engine.script = answer_with_calculator


def test_tool_choice_none_on_a_tools_server_bans_calls(tool_server, tk):
    """``tool_choice: "none"`` on a server with ``--tools`` (and no request tools) used to ban
    nothing: the model could still open a calls block. Now <｜tool▁calls▁begin｜> is banned, nothing
    is described, nothing runs (the scripted model stops where it would have called)."""
    engine, url = tool_server
    with httpx.Client(base_url=url, timeout=20) as raw:
        r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x"), "tool_choice": "none"})
        msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Let me compute 0.", "reasoning_content": None}
    assert ToolTokens.of(tk).calls_begin in engine.params[-1].banned_token_ids and engine.params[-1].tools == "off"
    assert "### calculator" not in tk.decode(engine.prompts[-1])


def test_server_tools_need_tool_tokens_and_known_names():
    from nanoseek.cli import build_parser
    from nanoseek.errors import UserError
    from nanoseek.serve.cli import build_server
    from nanoseek.tools.toolbox import Toolbox

    tk = _NoToolTokens(make_test_tokenizer()._tk)
    with pytest.raises(ValueError, match="no tool-call tokens .*cannot call tools"):
        create_app(ScriptedEngine(tk, lambda *a: ""), tk, MODEL, toolbox=Toolbox.builtin("calculator"))
    args = build_parser().parse_args(["serve", "--model", "/nonexistent", "--tools", "calculator,abacus"])
    with pytest.raises(UserError, match="^--tools: unknown built-in tool 'abacus'"):
        build_server(args)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "calculator"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_do_not_cut_a_forced_call(client, engine, choice, stream):
    """A forced call begins in the prompt, so the engine saw its tokens as text and cut its
    arguments at a stop string (keeping the stop text in them: the parser reads the tokens). A stop
    string never matches inside a calls block, so a forced call is whole, as an auto one is."""
    head = "" if isinstance(choice, dict) else "calculator" + TOOL_SEP
    engine.script = lambda p, params, i: head + '{"expression": "STOP\\n1+1"}' + TOOL_CALL_END + TOOL_CALLS_END
    kw = dict(messages=user("1+1?"), tools=[CALC], tool_choice=choice, stop=["STOP", "\n", "e"])
    ch = streamed(client, **kw).choices[0] if stream else client.chat.completions.create(model=MODEL, **kw).choices[0]
    assert calls_of(ch) == [("calculator", '{"expression": "STOP\\n1+1"}')]
    assert ch.finish_reason == "tool_calls"
    # an auto reply's text before its block is still cut by the stop strings
    engine.script = lambda p, params, i: "one STOP two" + block(call("calculator", "{}"))
    kw = dict(messages=user("1+1?"), tools=[CALC], stop=["STOP"])
    ch = streamed(client, **kw).choices[0] if stream else client.chat.completions.create(model=MODEL, **kw).choices[0]
    assert ch.message.content.strip() == "one" and ch.finish_reason == "stop" and not ch.message.tool_calls


@pytest.mark.parametrize("script,choice", [
    (lambda p, params, i: "", "auto"),                                          # nothing at all
    (lambda p, params, i: " \n ", "auto"),                                      # blank text
    (lambda p, params, i: TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "calculator" + TOOL_CALL_END + TOOL_CALLS_END, "auto"),
    (lambda p, params, i: "just words", "required"),                            # no separator: not a call
], ids=["empty", "blank", "call-without-sep", "required-plain-text"])
def test_a_reply_with_tools_but_no_calls_has_the_same_content_streamed_and_whole(client, engine, script, choice):
    """With the request's tools the stream opens with content null; a reply that then wrote no
    call and no (visible) text said content "" whole and null streamed."""
    engine.script = script
    kw = dict(messages=user("1+1?"), tools=[CALC], tool_choice=choice)
    whole = client.chat.completions.create(model=MODEL, **kw).choices[0]
    part = streamed(client, **kw).choices[0]
    assert whole.message.content == part.message.content
    assert not whole.message.tool_calls and not part.message.tool_calls
    if script(None, None, 0).strip() == "":
        assert (whole.message.content or "").strip() == ""
