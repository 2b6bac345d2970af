"""The OpenAI-compatible API over raw HTTP: responses, streaming, limits, bad input, disconnects, batching.

Most tests run a real uvicorn server (background thread, 127.0.0.1, free port) over the
deterministic :class:`FakeEngine`, whose answer is the last user message reversed after a
``<think>`` block, so every field of a response can be predicted. The tests at the end serve a
tiny random DeepSeek-V3 model with the real engine, through ``nanoseek serve``'s own loading code.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from nanoseek.serve.api import ServeLimits, create_app
from serve_helpers import WORDS, FakeEngine, background_server, make_test_tokenizer

MODEL = "nanoseek-test"
CONTEXT = 256
LIMITS = ServeLimits(max_body_bytes=20_000, max_tokens=200, max_n=4, max_prompts=4, default_max_tokens=100)


@pytest.fixture(scope="module")
def tokenizer():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def served(tokenizer):
    engine = FakeEngine(tokenizer, max_batch_size=16, max_seq_len=CONTEXT, step_delay=0.002).start()
    with background_server(create_app(engine, tokenizer, MODEL, LIMITS)) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client, engine
    engine.shutdown()


@pytest.fixture
def client(served):
    return served[0]


@pytest.fixture
def engine(served):
    return served[1]


def chat(content: str = "hello", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def sse(response: httpx.Response) -> list:
    """The JSON payloads of an SSE stream, ending with the string "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


# ---------------------------------------------------------------------------- responses
def test_fake_engine_offline_entry_points(engine, tokenizer):
    from nanoseek.infer.sampling import SamplingParams

    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True))
    (completions,) = engine.generate([ids], SamplingParams(temperature=0, n=2))
    assert [(c.answer, c.finish_reason) for c in completions] == [("cba", "stop")] * 2
    assert "backwards" in completions[0].reasoning and completions[0].completion_tokens == len(completions[0].token_ids)
    events = list(engine.stream(ids, SamplingParams(temperature=0, max_new_tokens=4)))
    assert len(events) == 4 and events[-1].finish_reason == "length"


def test_models(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"


def test_chat_completion(client, tokenizer):
    r = client.post("/v1/chat/completions", json=chat("hello world", temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    (choice,) = body["choices"]
    prompt_ids, _ = tokenizer.encode_chat([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "dlrow olleh"
    assert choice["message"]["reasoning_content"] == \
        f"The prompt has {len(prompt_ids)} tokens; I will write the message backwards."
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] > len("dlrow olleh") // 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_system_and_multi_turn(client):
    messages = [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "tsrif"},
                {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "dnoces"


def test_chat_stream_with_usage(client):
    plain = client.post("/v1/chat/completions", json=chat("stream me", temperature=0)).json()
    with client.stream("POST", "/v1/chat/completions",
                       json=chat("stream me", temperature=0, stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    deltas = [c["choices"][0] for c in chunks[:-1]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
    assert content == plain["choices"][0]["message"]["content"] == "em maerts"
    assert reasoning == plain["choices"][0]["message"]["reasoning_content"]
    # The reasoning streams first, then the answer.
    first_content = next(i for i, d in enumerate(deltas) if d["delta"].get("content"))
    assert all(not d["delta"].get("reasoning_content") for d in deltas[first_content:])
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_stream_without_usage_has_no_usage_field(client):
    with client.stream("POST", "/v1/chat/completions", json=chat("x", stream=True)) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and all("usage" not in c for c in events[:-1])


def test_max_tokens_gives_length(client):
    for field in ("max_tokens", "max_completion_tokens"):
        body = client.post("/v1/chat/completions", json=chat("a long enough message", **{field: 5})).json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5
    short = client.post("/v1/chat/completions", json=chat("ab", max_tokens=100)).json()
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 100
    body = client.post("/v1/chat/completions", json=chat("ab", max_tokens=100, ignore_eos=True)).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 100


def test_stop_sequences(client):
    body = client.post("/v1/chat/completions", json=chat("abcdef", temperature=0, stop="c")).json()
    assert body["choices"][0]["message"]["content"] == "fed"
    assert body["choices"][0]["finish_reason"] == "stop"
    body = client.post("/v1/chat/completions", json=chat("abcdef", temperature=0, stop=["zz", "d"])).json()
    assert body["choices"][0]["message"]["content"] == "fe"


def test_n_choices_and_seed(client):
    req = chat("seeded", n=3, temperature=1.0, seed=1234)
    a = client.post("/v1/chat/completions", json=req).json()
    b = client.post("/v1/chat/completions", json=req).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in b["choices"]]  # same seed, same samples
    assert all(t.startswith("dedees ") and t.split(" ")[1] in WORDS for t in texts)
    assert len(set(texts)) > 1  # the samples of one request differ
    one = client.post("/v1/chat/completions", json=chat("seeded", temperature=0)).json()
    assert a["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once for n samples
    assert a["usage"]["completion_tokens"] > 3 * one["usage"]["completion_tokens"]  # each sample adds " word"
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        chunks = [c for c in sse(r) if c != "[DONE]"]
    streamed = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == texts


def test_completions(client, tokenizer):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "temperature": 0, "max_tokens": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    # Raw continuation: the think tags stay in the text.
    assert choice["text"].startswith("<think>\nThe prompt has") and choice["text"].endswith("</think>\n\ncba")
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("abc", add_bos=True))


def test_completions_batch_echo_and_token_ids(client, tokenizer):
    ids = tokenizer.encode("xyz")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cd"], "n": 2, "echo": True,
                                             "temperature": 0, "max_tokens": 100})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"][:2] for c in choices] == ["ab", "ab", "cd", "cd"]  # echo, then prompt-major order
    assert choices[0]["text"].endswith("ba") and choices[3]["text"].endswith("dc")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [ids, ids], "temperature": 0, "max_tokens": 100})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 2 * len(ids)
    assert all(c["text"].endswith("zyx") for c in r.json()["choices"])


def test_completions_stream(client):
    req = {"model": MODEL, "prompt": ["one", "two"], "temperature": 0, "max_tokens": 100}
    plain = client.post("/v1/completions", json=req).json()
    streamed = {**req, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=streamed) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = ["".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i) for i in range(2)]
    assert texts == [c["text"] for c in plain["choices"]]
    assert chunks[-1]["usage"] == plain["usage"]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]


# ---------------------------------------------------------------------------- bad input
LONG = "word " * 300  # over the 256-token context

BAD_REQUESTS = [
    # (name, endpoint, body: dict or raw str, status, param, code)
    ("malformed json", "chat", '{"model": "x", "messages": [', 400, None, "invalid_json"),
    ("json array", "chat", "[1, 2]", 400, None, "invalid_json"),
    ("json string", "completions", '"hello"', 400, None, "invalid_json"),
    ("empty body", "chat", "", 400, None, "invalid_json"),
    ("invalid utf-8", "chat", b'{"model": "nanoseek-test", "messages": [{"role": "user", "content": "\xff"}]}',
     400, None, "invalid_json"),
    ("deeply nested", "chat", "[" * 9_000 + "]" * 9_000, 400, None, "invalid_json"),
    ("huge integer", "chat", chat(n=10**30), 400, "n", "invalid_value"),
    ("message not an object", "chat", chat() | {"messages": [None]}, 400, "messages[0]", "invalid_value"),
    ("message without content", "chat", chat() | {"messages": [{"role": "user"}]}, 400, "messages[0].content",
     "invalid_value"),
    ("model not a string", "chat", chat(model=5), 400, "model", "invalid_value"),
    ("unknown model", "chat", chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("unknown model completions", "completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("missing model", "chat", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", "invalid_value"),
    ("empty messages", "chat", chat() | {"messages": []}, 400, "messages", "invalid_value"),
    ("messages not a list", "chat", chat() | {"messages": "hi"}, 400, "messages", "invalid_value"),
    ("content wrong type", "chat", chat() | {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_value"),
    ("unknown role", "chat", chat() | {"messages": [{"role": "function", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("image part", "chat", chat() | {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                 "image_url": {}}]}]},
     400, "messages[0].content", "invalid_value"),
    ("reasoning_content sent back", "chat", chat() | {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "c"}]},
     400, "messages[1].reasoning_content", "invalid_value"),
    ("temperature string", "chat", chat(temperature="hot"), 400, "temperature", "invalid_value"),
    ("temperature numeric string", "chat", chat(temperature="0.5"), 400, "temperature", "invalid_value"),
    ("temperature too high", "chat", chat(temperature=3), 400, "temperature", "invalid_value"),
    ("temperature NaN", "chat", '{"model": "nanoseek-test", "messages": [{"role": "user", "content": "x"}], '
                                '"temperature": NaN}', 400, "temperature", "invalid_value"),
    ("top_p zero", "chat", chat(top_p=0), 400, "top_p", "invalid_value"),
    ("n float", "chat", chat(n=1.5), 400, "n", "invalid_value"),
    ("n zero", "chat", chat(n=0), 400, "n", "invalid_value"),
    ("n over limit", "chat", chat(n=5), 400, "n", "invalid_value"),
    ("stream not bool", "chat", chat(stream="yes"), 400, "stream", "invalid_value"),
    ("max_tokens bool", "chat", chat(max_tokens=True), 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", "chat", chat(max_tokens=-5), 400, "max_tokens", "invalid_value"),
    ("max_tokens zero", "chat", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),   # completions: score only
    ("max_tokens huge", "chat", chat(max_tokens=10**12), 400, "max_tokens", "invalid_value"),
    ("max_tokens over context", "chat", chat(max_tokens=199, content="word " * 80), 400, "max_tokens",
     "context_length_exceeded"),
    ("prompt over context", "chat", chat(LONG), 400, "messages", "context_length_exceeded"),
    ("completion prompt over context", "completions", {"model": MODEL, "prompt": LONG}, 400, "prompt",
     "context_length_exceeded"),
    ("second prompt over context", "completions", {"model": MODEL, "prompt": ["ok", LONG]}, 400, "prompt[1]",
     "context_length_exceeded"),
    ("empty prompt list", "completions", {"model": MODEL, "prompt": []}, 400, "prompt", "invalid_value"),
    ("prompt wrong type", "completions", {"model": MODEL, "prompt": {"text": "x"}}, 400, "prompt", "invalid_value"),
    ("mixed prompt list", "completions", {"model": MODEL, "prompt": ["x", 5]}, 400, "prompt", "invalid_value"),
    ("token id out of vocab", "completions", {"model": MODEL, "prompt": [1, 2, 10**6]}, 400, "prompt", "invalid_value"),
    ("negative token id", "completions", {"model": MODEL, "prompt": [[1, -3]]}, 400, "prompt", "invalid_value"),
    ("too many prompts", "completions", {"model": MODEL, "prompt": ["a"] * 5}, 400, "prompt", "invalid_value"),
    ("missing prompt", "completions", {"model": MODEL}, 400, "prompt", "invalid_value"),
    ("stop wrong type", "chat", chat(stop=[1]), 400, "stop", "invalid_value"),
    ("too many stops", "chat", chat(stop=list("abcde")), 400, "stop", "invalid_value"),
    ("empty stop", "chat", chat(stop=[""]), 400, "stop", "invalid_value"),
    ("seed string", "chat", chat(seed="42"), 400, "seed", "invalid_value"),
    ("seed negative", "chat", chat(seed=-1), 400, "seed", "invalid_value"),
    ("unknown field", "chat", chat(foo=1), 400, "foo", "unknown_parameter"),
    ("penalty", "chat", chat(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter"),
    ("logprobs over 20", "completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs",
     "invalid_value"),
    ("logprobs bool", "completions", {"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs",
     "invalid_value"),
    ("chat logprobs int", "chat", chat(logprobs=1), 400, "logprobs", "invalid_value"),
    ("top_logprobs without logprobs", "chat", chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    ("top_logprobs over 20", "chat", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("tools", "chat", chat(tools=[{"type": "function"}]), 400, "tools[0].function", "invalid_value"),
    ("best_of", "completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("stream_options without stream", "chat", chat(stream_options={"include_usage": True}), 400, "stream_options",
     "invalid_value"),
    ("lone surrogate", "chat", '{"model": "nanoseek-test", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, "messages", "invalid_value"),
    ("max_tokens disagree", "chat", chat(max_tokens=5, max_completion_tokens=6), 400, "max_completion_tokens",
     "invalid_value"),
]


@pytest.mark.parametrize("name,endpoint,body,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error(client, name, endpoint, body, status, param, code):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[endpoint]
    raw = isinstance(body, (str, bytes))
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    r = client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"], err["code"]) == (param, code), err


def test_body_without_json_content_type(client):
    r = client.post("/v1/chat/completions", content=json.dumps(chat()), headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    r = client.post("/v1/chat/completions", json=chat(presence_penalty=0, frequency_penalty=0.0, logprobs=False,
                                                      user="me", tools=[], response_format={"type": "text"}))
    assert r.status_code == 200, r.text


def test_body_size_limit(client):
    big = json.dumps(chat("x" * 30_000))
    r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # No Content-Length (chunked): counted while receiving.
    r = client.post("/v1/chat/completions", content=iter([big[:15_000].encode(), big[15_000:].encode()]),
                    headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_engine_failure_is_a_500_error_object(tokenizer):
    class BrokenEngine:
        max_seq_len, max_batch_size = 128, 4

        def submit(self, prompt, params):
            raise RuntimeError("the accelerator caught fire")

    with background_server(create_app(BrokenEngine(), tokenizer, MODEL)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=chat(), timeout=5)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "caught fire" in err["message"]


def test_configurable_limits(tokenizer):
    engine = FakeEngine(tokenizer, max_seq_len=1000).start()
    limits = ServeLimits(max_body_bytes=300, max_prompt_tokens=20, max_tokens=10, max_n=2, max_prompts=1)
    with background_server(create_app(engine, tokenizer, MODEL, limits)) as url, httpx.Client(base_url=url) as c:
        cases = [(chat("hi", max_tokens=11), "max_tokens"), (chat("hi", n=3), "n"), (chat("word " * 30), "messages"),
                 (chat("x" * 400), None)]
        for body, param in cases:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == (413 if param is None else 400) and r.json()["error"]["param"] == param, r.text
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        ok = c.post("/v1/chat/completions", json=chat("hi", n=2)).json()
        assert [ch["finish_reason"] for ch in ok["choices"]] == ["length", "length"]  # default max_tokens capped at 10
        assert ok["usage"]["completion_tokens"] == 20
    engine.shutdown()
    with pytest.raises(ValueError, match="max_n"):
        ServeLimits(max_n=0).validate()


# ---------------------------------------------------------------------------- disconnects and batching
SLOW = "hello world " * 10  # 73 prompt tokens, a ~110-token answer


def wait_idle(engine, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while engine.num_active_requests and time.monotonic() - start < timeout:
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_client_disconnect_mid_stream_frees_slot(client, engine, endpoint):
    engine.step_delay = 0.02  # ~110 tokens: over 2 s if nobody cancels
    try:
        path, body = (("/v1/chat/completions", chat(SLOW, max_tokens=150, stream=True)) if endpoint == "chat" else
                      ("/v1/completions", {"model": MODEL, "prompt": SLOW, "max_tokens": 150, "stream": True}))
        with client.stream("POST", path, json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert engine.num_active_requests == 1
        # leaving the block closes the connection mid-stream
        assert wait_idle(engine) < 2.0 and engine.num_active_requests == 0
    finally:
        engine.step_delay = 0.002


def test_client_disconnect_non_streaming_frees_slot(client, engine):
    engine.step_delay = 0.02
    try:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=chat(SLOW, max_tokens=150), timeout=0.3)
        assert engine.num_active_requests == 1
        assert wait_idle(engine) < 2.0 and engine.num_active_requests == 0
    finally:
        engine.step_delay = 0.002


def test_concurrent_requests_share_decode_steps(served):
    client, engine = served
    engine.step_delay = 0.01
    engine.max_active_rows = 0
    k = 6

    async def one(ac: httpx.AsyncClient, i: int) -> dict:
        r = await ac.post("/v1/chat/completions", json=chat(f"request number {i}", temperature=0, max_tokens=60))
        return r.json()

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=10) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(k)))

    try:
        start = time.monotonic()
        results = asyncio.run(all_at_once())
        elapsed = time.monotonic() - start
    finally:
        engine.step_delay = 0.002
    assert [r["choices"][0]["message"]["content"] for r in results] == [f"{i} rebmun tseuqer" for i in range(k)]
    assert engine.max_active_rows == k  # all six were decoded in the same steps
    # One at a time would take k times one request's ~50 steps of 10 ms.
    assert elapsed < k * 50 * 0.01


# ---------------------------------------------------------------------------- the real engine and the CLI
@pytest.fixture(scope="module")
def real(tmp_path_factory, tokenizer):
    """``nanoseek serve`` over a tiny random DeepSeek-V3 run folder, with the real engine."""
    from nanoseek.cli import build_parser
    from nanoseek.serve.cli import build_server
    from serve_helpers import make_tiny_run

    run = make_tiny_run(tmp_path_factory.mktemp("serve") / "tiny-run", tokenizer)
    app, engine = build_server(build_parser().parse_args(["serve", "--model", str(run), "--port", "0"]))
    with background_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine, run
    engine.shutdown()


@pytest.fixture
def handles(real, monkeypatch):
    """The engine's request handles of the requests a test makes (``engine.submit`` is wrapped)."""
    engine, out = real[1], []
    submit = engine.submit

    def recording_submit(prompt, params):
        out.append(submit(prompt, params))
        return out[-1]
    monkeypatch.setattr(engine, "submit", recording_submit)
    return out


def test_real_engine_batches_concurrent_requests(real, handles):
    client, engine, _ = real
    rows: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)  # decode steps
    k = 4

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/chat/completions", json={
                "model": "tiny-run", "messages": [{"role": "user", "content": f"question {i}"}],
                "temperature": 0, "max_tokens": 24}) for i in range(k)))
            return [r.json() for r in rs]

    try:
        results = asyncio.run(all_at_once())
    finally:
        hook.remove()
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in results), results
    assert max(rows) == k, rows  # one decode step carried a row of every request
    assert len(handles) == k and all(h.done for h in handles)


def test_real_engine_disconnect_mid_stream_frees_rows(real, handles):
    client, engine, _ = real
    body = {"model": "tiny-run", "messages": [{"role": "user", "content": "go on"}], "ignore_eos": True,
            "max_tokens": 200, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():  # up to the first generated text (the first chunk only has the role)
            if line.startswith("data: ") and "role" not in json.loads(line[6:])["choices"][0]["delta"]:
                break
        (handle,) = handles
        assert not handle.done
    start = time.monotonic()
    while not handle.done and time.monotonic() - start < 3:
        time.sleep(0.01)
    assert handle.done and handle.cancelled
    (completion,) = handle.result()
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 200


def test_real_engine_think_prompt_puts_the_completion_in_reasoning(real, tokenizer):
    client, engine, _ = real
    messages = [{"role": "user", "content": "think first"}]
    with background_server(create_app(engine, tokenizer, "tiny-run", think=True)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-run", "messages": messages, "temperature": 0, "max_tokens": 8}).json()
    plain = client.post("/v1/chat/completions",
                        json={"model": "tiny-run", "messages": messages, "temperature": 0, "max_tokens": 8}).json()
    think_prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=True))
    assert think_prompt[-2:] == [tokenizer.think_id] + tokenizer.encode("\n")
    assert r["usage"]["prompt_tokens"] == len(think_prompt) == plain["usage"]["prompt_tokens"] + 2
    # The random model never closes the block: everything it wrote is reasoning.
    assert r["choices"][0]["message"]["reasoning_content"] and r["choices"][0]["message"]["content"] == ""


def test_cli_defaults_and_user_errors(tmp_path, capsys, real):
    from nanoseek.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # this machine only, unless asked
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    _, _, run = real
    assert main(["serve", "--model", str(run), "--max-n", "0"]) == 2
    assert "--max-n must be >= 1" in capsys.readouterr().err
    no_tok = tmp_path / "bare"
    (no_tok / "final").mkdir(parents=True)
    for f in (run / "final").iterdir():
        if not f.name.startswith("tokenizer"):
            (no_tok / "final" / f.name).write_bytes(f.read_bytes())
    assert main(["serve", "--model", str(no_tok)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
