"""The server through the official ``openai`` Python client: chat and completions, streaming and not.

First against the deterministic :class:`FakeEngine` (exact answers: the user's message reversed,
after a ``<think>`` block), then against the real engine serving a tiny random DeepSeek-V3,
loaded by ``nanoseek serve``'s own code from a run folder.
"""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from nanoseek.cli import build_parser
from nanoseek.serve.api import ServeLimits, create_app
from nanoseek.serve.cli import build_server
from serve_helpers import FakeEngine, background_server, make_test_tokenizer, make_tiny_run

MODEL = "nanoseek-test"


@pytest.fixture(scope="module")
def tokenizer():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def client(tokenizer):
    engine = FakeEngine(tokenizer, max_seq_len=256, step_delay=0.001).start()
    with background_server(create_app(engine, tokenizer, MODEL, ServeLimits(max_tokens=200))) as url:
        yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    engine.shutdown()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=user("hello there"), temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == "ereht olleh"
    assert msg.reasoning_content.endswith("I will write the message backwards.")  # DeepSeek's field
    assert r.choices[0].finish_reason == "stop"
    prompt = tokenizer.encode(tokenizer.apply_chat_template(user("hello there"), add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream(client):
    stream = client.chat.completions.create(model=MODEL, messages=user("stream this"), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    content, reasoning, finish, usage = "", "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish += [c.finish_reason] if c.finish_reason else []
    plain = client.chat.completions.create(model=MODEL, messages=user("stream this"), temperature=0)
    assert content == plain.choices[0].message.content == "siht maerts"
    assert reasoning == plain.choices[0].message.reasoning_content
    assert finish == ["stop"]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


def test_chat_n_seed_stop_max_tokens(client):
    kw = dict(model=MODEL, messages=user("abcdef"), temperature=0.8, seed=3, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    r = client.chat.completions.create(model=MODEL, messages=user("abcdef"), temperature=0, stop=["d", "zz"])
    assert r.choices[0].message.content == "fe"
    r = client.chat.completions.create(model=MODEL, messages=user("abcdef"), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt=["abc", "xyz"], temperature=0, max_tokens=100)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.endswith("cba") and r.choices[1].text.endswith("zyx")
    stream = client.completions.create(model=MODEL, prompt="abc", temperature=0, max_tokens=100, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == r.choices[0].text


def test_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=-1)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], stream=True)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    assert "exceeds this server's limit of 200" in e.value.message


# ---------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def real(tmp_path_factory, tokenizer):
    run = make_tiny_run(tmp_path_factory.mktemp("serve") / "tiny-run", tokenizer)
    args = build_parser().parse_args(["serve", "--model", str(run), "--port", "0", "--max-batch-size", "8"])
    app, engine = build_server(args)
    with background_server(app) as url:
        yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), tokenizer
    engine.shutdown()


def test_real_engine_chat_stream_matches_non_stream(real):
    client, tokenizer = real
    assert [m.id for m in client.models.list()] == ["tiny-run"]
    kw = dict(model="tiny-run", messages=user("What is 2 + 2?"), temperature=0, max_tokens=12)
    plain = client.chat.completions.create(**kw)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(kw["messages"], add_generation_prompt=True))
    assert plain.usage.prompt_tokens == len(prompt)
    assert 1 <= plain.usage.completion_tokens <= 12
    assert plain.choices[0].finish_reason in ("stop", "length")
    content, reasoning, usage = "", "", None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
    msg = plain.choices[0].message
    assert content == msg.content and reasoning == (msg.reasoning_content or "")
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_real_engine_seeded_samples_and_completions(real):
    client, _ = real
    kw = dict(model="tiny-run", messages=user("Tell me a story"), temperature=1.0, seed=11, n=2, max_tokens=10)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens
    r = client.completions.create(model="tiny-run", prompt=["Once upon", "2 + 2 ="], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens <= 12
