"""What the server's text and logprobs say, field by field: JSON null, stop strings, control tokens.

* An explicit ``null`` for any optional field of either endpoint (and of the tokenizer
  endpoints) means "not given", as in OpenAI's spec and vLLM; a required field sent as null and
  a wrong type stay 400s. The fields are enumerated from the request models, so a field added
  later is covered.
* Stop strings and logprobs follow vLLM's rule (``nanoseek/serve/logprobs.py``): the text is cut
  before the stop string, the logprobs list every generated token up to the one that completed
  it (as many as ``usage.completion_tokens``), streamed and whole alike, on both endpoints.
* A prompt string that starts with the BOS token gets no second one (lm-eval's string requests).
* ``skip_special_tokens`` (default true, vLLM's): control tokens the model generates are left
  out of ``text`` / ``content`` / ``reasoning_content`` exactly as HF's
  ``decode(skip_special_tokens=True)`` leaves them out, and still listed in the logprobs; false
  shows them. A model with zeroed output weights samples uniformly, so control tokens do appear.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.streaming import IncrementalDetokenizer, skipped_token_ids
from nanoseek.serve.api import ServeLimits, create_app
from nanoseek.serve.logprobs import TokenPieces
from nanoseek.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, StreamOptions,
                                     TokenizeRequest)
from serve_helpers import FakeEngine, make_test_tokenizer, make_tiny_run

MODEL = "m"


def sse(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_test_tokenizer()


# ----------------------------------------------------------------------------- null = not given
@pytest.fixture(scope="module")
def fake(tokenizer):
    engine = FakeEngine(tokenizer, max_seq_len=512, step_delay=0).start()
    with TestClient(create_app(engine, tokenizer, MODEL)) as client:
        yield client
    engine.shutdown()


def optional_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.is_required()]


BASES = {"/v1/chat/completions": (ChatCompletionRequest, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
         "/v1/completions": (CompletionRequest, {"model": MODEL, "prompt": "hi"}),
         "/tokenize": (TokenizeRequest, {"prompt": "hi"}),
         "/detokenize": (DetokenizeRequest, {"tokens": [65, 66]})}


@pytest.mark.parametrize("path", list(BASES))
def test_null_for_every_optional_field_means_not_given(fake, path):
    model, base = BASES[path]
    fields = [f for f in optional_fields(model) if f not in base]
    assert len(fields) >= (1 if path in ("/tokenize", "/detokenize") else 20)
    want = fake.post(path, json=base)
    assert want.status_code == 200, want.text
    for name in fields:                                         # each alone, then all at once
        r = fake.post(path, json={**base, name: None})
        assert r.status_code == 200, (name, r.text)
        assert r.json().keys() == want.json().keys(), name
    r = fake.post(path, json={**base, **{name: None for name in fields}})
    assert r.status_code == 200, r.text
    if path in ("/tokenize", "/detokenize"):
        assert r.json() == want.json()
    else:
        assert len(r.json()["choices"]) == 1                    # n: null is n = 1


def test_null_inside_nested_objects_and_strictness_kept(fake):
    chat = BASES["/v1/chat/completions"][1]
    assert "include_usage" in optional_fields(StreamOptions)
    r = fake.post("/v1/chat/completions", json={**chat, "stream": True,
                                                "stream_options": {"include_usage": None, "include_obfuscation": None}})
    assert r.status_code == 200 and all(c.get("usage") is None for c in sse(r))
    r = fake.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "hi", "name": None,
                                                                      "reasoning_content": None}]})
    assert r.status_code == 200, r.text
    for path, body, param in (("/v1/chat/completions", {**chat, "model": None}, "model"),
                              ("/v1/chat/completions", {**chat, "messages": None}, "messages"),
                              ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": None}]}, None),
                              ("/v1/completions", {"model": MODEL, "prompt": None}, "prompt"),
                              ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "1"}, "temperature"),
                              ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": 1}, "echo"),
                              ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1}, "presence_penalty"),
                              ("/detokenize", {"tokens": None}, "tokens")):
        r = fake.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        if param:
            assert r.json()["error"]["param"] == param, r.text


# ----------------------------------------------------------------------------- stop strings + logprobs
@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference

    run = make_tiny_run(tmp_path_factory.mktemp("run"), tokenizer, max_position_embeddings=128)
    model, tok = load_for_inference(run)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    engine = Engine(model, tok, max_batch_size=8, max_seq_len=128)
    engine.start()
    with TestClient(create_app(engine, tok, MODEL, ServeLimits(max_tokens=24))) as client:
        yield client, engine, tok
    engine.shutdown()


def released(tok, ids: list[int]) -> list[str]:
    """The text the engine has let out after each token (what stop strings are matched on)."""
    d, text, out = IncrementalDetokenizer(tok), "", []
    for t in ids:
        text += d.push(t)
        out.append(text)
    return out


def stop_cases(text: str, offsets: list[int]) -> list[str]:
    """Stop strings taken from ``text``: one character inside a token, one spanning two tokens."""
    ok = lambda s: s.isascii() and s.isprintable() and s.strip() != ""  # noqa: E731
    cases = []
    inner = [text[o + 1] for o, nxt in zip(offsets, offsets[1:] + [len(text)]) if nxt - o >= 2 and o > 0]
    cases += [c for c in inner if ok(c) and text.find(c) > 0][:1]
    span = [text[o - 1:o + 1] for o in offsets[2:] if 0 < o < len(text) and ok(text[o - 1:o + 1])]
    cases += [s for s in span if text.find(s) > 0][:1]
    return cases


@pytest.mark.parametrize("prompt", ["Hello world", "The quick brown fox", "Once upon a time"])
def test_stop_strings_cut_the_text_and_logprobs_list_tokens_through_the_stop(served, prompt):
    client, engine, tok = served
    ids = tok.encode(prompt, add_bos=True)
    full = engine.generate([ids], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0][0].token_ids
    body = {"model": MODEL, "prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    T, lp_full = whole["text"], whole["logprobs"]
    cases = stop_cases(T, lp_full["text_offset"])
    assert cases, T
    after = released(tok, full)
    for stop in cases:
        k = next(j for j, t in enumerate(after) if stop in t)            # the token that completed the stop
        r = client.post("/v1/completions", json={**body, "stop": [stop, "\x00never"]})
        got = r.json()
        c = got["choices"][0]
        assert c["text"] == T[:T.find(stop)] and c["finish_reason"] == "stop", (stop, c["text"])
        assert got["usage"]["completion_tokens"] == k + 1
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert c["logprobs"][key] == lp_full[key][:k + 1], (stop, key)
        chunks = [x["choices"][0] for x in sse(client.post("/v1/completions", json={**body, "stop": stop,
                                                                                    "stream": True}))]
        assert "".join(x["text"] for x in chunks) == c["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for x in chunks for v in x["logprobs"][key]] == c["logprobs"][key], (stop, key)
    # chat: the same rule (the answer cut, every token through the stop listed)
    messages = [{"role": "user", "content": prompt}]
    cbody = {"model": MODEL, "messages": messages, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
             "logprobs": True, "chat_template_kwargs": {"thinking": False}}
    uncut = client.post("/v1/chat/completions", json=cbody).json()["choices"][0]
    text = uncut["message"]["content"]
    stops = [ch for ch in text[1:] if ch.isascii() and ch.isprintable() and ch != " "][:2]
    assert stops, text
    for stop in stops:
        cut = client.post("/v1/chat/completions", json={**cbody, "stop": stop}).json()
        m = cut["choices"][0]
        want = text[:text.find(stop)]
        assert m["message"]["content"] in (want, want.rstrip())     # the chat answer's trailing space is stripped
        n = cut["usage"]["completion_tokens"]
        assert m["logprobs"]["content"] == uncut["logprobs"]["content"][:n]
        streamed = [e for x in sse(client.post("/v1/chat/completions", json={**cbody, "stop": stop, "stream": True}))
                    if x["choices"] and x["choices"][0]["logprobs"] for e in x["choices"][0]["logprobs"]["content"]]
        assert streamed == m["logprobs"]["content"]


# ----------------------------------------------------------------------------- skip_special_tokens
@pytest.fixture(scope="module")
def uniform(tokenizer, tmp_path_factory):
    """A model whose every logit is 0: seeded sampling draws control tokens as often as any other."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference

    run = make_tiny_run(tmp_path_factory.mktemp("uniform"), tokenizer, max_position_embeddings=128)
    model, tok = load_for_inference(run)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = Engine(model, tok, max_batch_size=8, max_seq_len=128)
    engine.start()
    with TestClient(create_app(engine, tok, MODEL, ServeLimits(max_tokens=40))) as client:
        yield client, engine, tok
    engine.shutdown()


def test_skipped_tokens_are_hfs_special_tokens_but_never_the_think_tags(tokenizer):
    skip = skipped_token_ids(tokenizer)
    assert tokenizer.bos_id in skip and tokenizer.eos_id in skip
    assert not {tokenizer.token_to_id(t) for t in tokenizer.think_tags} & skip
    assert all(tokenizer.decode([t], skip_special_tokens=True) == "" for t in skip)


@pytest.mark.parametrize("seed", [1, 2])
def test_control_tokens_stay_out_of_completion_text(uniform, seed):
    client, engine, tok = uniform
    pieces = TokenPieces(tok)
    skip = skipped_token_ids(tok)
    prompt = tok.encode("Hello", add_bos=True)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed, n=6, ignore_eos=True,
                            skip_special_tokens=False)
    completions = engine.generate([prompt], params)[0]
    assert any(t in skip for c in completions for t in c.token_ids), "no control token drawn: pick another seed"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "seed": seed, "n": 6,
            "ignore_eos": True, "logprobs": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    shown = client.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()["choices"]
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}))
    for i, c in enumerate(completions):
        assert whole[i]["text"] == tok.decode(c.token_ids, skip_special_tokens=True)    # as HF skips them
        assert shown[i]["text"] == tok.decode(c.token_ids)
        assert whole[i]["logprobs"]["tokens"] == [pieces.text(t) for t in c.token_ids]  # every token listed
        mine = [x["choices"][0] for x in chunks if x["choices"] and x["choices"][0]["index"] == i]
        assert "".join(x["text"] for x in mine) == whole[i]["text"]
        assert [o for x in mine for o in x["logprobs"]["text_offset"]] == whole[i]["logprobs"]["text_offset"]
        offsets = whole[i]["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and all(o <= len(whole[i]["text"]) for o in offsets)


def test_control_tokens_stay_out_of_chat_content_and_reasoning(uniform):
    client, engine, tok = uniform
    controls = [tok.decode([t]) for t in skipped_token_ids(tok)]
    messages = [{"role": "user", "content": "hi"}]
    seen_control = False
    for thinking in (False, True):
        body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 1.0, "seed": 5, "n": 4,
                "ignore_eos": True, "logprobs": True, "chat_template_kwargs": {"thinking": thinking}}
        for c in client.post("/v1/chat/completions", json=body).json()["choices"]:
            tokens = [e["token"] for e in c["logprobs"]["content"]]
            seen_control |= any(t in controls for t in tokens)
            for field in ("content", "reasoning_content"):
                assert not any(s in (c["message"][field] or "") for s in controls), (field, c["message"])
        streamed = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
        text = "".join((x["choices"][0]["delta"].get("content") or "") + (x["choices"][0]["delta"].get("reasoning_content") or "")
                       for x in streamed if x["choices"])
        assert not any(s in text for s in controls)
        shown = client.post("/v1/chat/completions", json={**body, "skip_special_tokens": False}).json()["choices"]
        assert any(s in (c["message"]["content"] or "") + (c["message"]["reasoning_content"] or "")
                   for c in shown for s in controls)
    assert seen_control
    r = client.post("/v1/chat/completions", json={**body, "skip_special_tokens": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "skip_special_tokens"


# ----------------------------------------------------------------------------- a BOS the prompt brings
def test_a_prompt_starting_with_bos_gets_no_second_one(fake, tokenizer):
    bos = tokenizer.decode([tokenizer.bos_id])
    want = tokenizer.encode("Hello", add_bos=True)
    assert want[0] == tokenizer.bos_id
    for prompt in ("Hello", bos + "Hello"):
        r = fake.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert r.json()["usage"]["prompt_tokens"] == len(want), prompt
        assert fake.post("/tokenize", json={"prompt": prompt}).json()["tokens"] == want
    # a BOS the text brings twice stays twice; without special tokens nothing is added or removed
    r = fake.post("/tokenize", json={"prompt": bos + bos + "Hello"}).json()["tokens"]
    assert r == [tokenizer.bos_id] + want
    r = fake.post("/tokenize", json={"prompt": bos + "Hello", "add_special_tokens": False}).json()["tokens"]
    assert r == want
