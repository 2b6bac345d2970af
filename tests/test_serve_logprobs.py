"""The server's logprobs, echo, thinking per request and OpenAI-field handling.

Logprobs go through the real engine on a tiny random model and are checked against the model's
own float32 ``log_softmax`` of a direct forward: ``/v1/completions`` in OpenAI's legacy format
(``echo`` with prompt logprobs, ``max_tokens`` 0, streaming, several prompts in one request; the
exact request lm-evaluation-harness sends, parsed by lm-eval's own ``parse_logprobs``) and
``/v1/chat/completions`` (``logprobs`` + ``top_logprobs``, streamed too). Thinking per request
(``chat_template_kwargs``, ``reasoning_effort``, the server default) is checked on the prompt the
tokenizer is asked for. Unsupported fields are short 400s even for a 100 KB value or name.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from nanoseek.serve.api import ServeLimits, create_app
from nanoseek.serve.logprobs import TokenPieces
from serve_helpers import FakeEngine, make_test_tokenizer, make_tiny_run

MODEL = "m"
TOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """(TestClient over the real engine, the model, its tokenizer)."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference

    run = make_tiny_run(tmp_path_factory.mktemp("run"), tokenizer, max_position_embeddings=128)
    model, tok = load_for_inference(run)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)         # spread the random logits: top-N orders are not ties
    engine = Engine(model, tok, max_batch_size=8, max_seq_len=128)
    engine.start()
    with TestClient(create_app(engine, tok, MODEL, ServeLimits(max_tokens=16, default_max_tokens=6))) as client:
        yield client, model, tok
    engine.shutdown()


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[T, V] rows t = log p(. | ids[:t+1]), one direct forward."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        t = int(ref_logprobs(model, ids)[-1].argmax())
        out.append(t)
        ids.append(t)
    return out


def legacy_top(pieces: TokenPieces, row: torch.Tensor, k: int, chosen: int) -> dict[str, float]:
    vals, ids = row.topk(k) if k else (torch.tensor([]), torch.tensor([], dtype=torch.long))
    out: dict[str, float] = {}
    for t, lp in list(zip(ids.tolist(), vals.tolist())) + [(chosen, row[chosen].item())]:
        out[pieces.text(t)] = max(out.get(pieces.text(t), -1e30), lp)
    return out


def assert_dict_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=TOL), k


# ----------------------------------------------------------------------------- /v1/completions
def test_completions_echo_logprobs_equal_the_model(served):
    client, model, tok = served
    pieces = TokenPieces(tok)
    prompts = [tok.encode("Hello world! How are", add_bos=True), tok.encode("The quick brown fox")]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 3, "temperature": 0,
                                             "logprobs": 4, "echo": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        full = ids + greedy(model, ids, 3)
        ref = ref_logprobs(model, full)
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert lp["tokens"] == [pieces.text(t) for t in full]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for t in range(1, len(full)):
            assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, full[t]].item(), abs=TOL)
            assert_dict_close(lp["top_logprobs"][t], legacy_top(pieces, ref[t - 1], 4, full[t]))
        # text_offset: where each token's text starts in the returned text
        text = choice["text"]     # the echoed prompt, then the completion without its control tokens
        assert text == tok.decode(ids) + tok.decode(full[len(ids):], skip_special_tokens=True)
        for k, (t, off) in enumerate(zip(full, lp["text_offset"])):
            if not pieces.text(t).startswith("bytes:") and not (k >= len(ids) and t in tok.special_ids):
                assert text[off:off + len(pieces.text(t))] == pieces.text(t)
        assert lp["text_offset"] == sorted(lp["text_offset"])


def test_string_prompt_echo_offsets_skip_the_bos_the_server_added(served):
    client, model, tok = served
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello world", "max_tokens": 1,
                                             "temperature": 0, "logprobs": 0, "echo": True})
    choice = r.json()["choices"][0]
    ids = tok.encode("Hello world", add_bos=True)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and choice["text"].startswith("Hello world")
    assert lp["text_offset"][:2] == [0, 0]                 # BOS is not in the echoed text
    assert all(len(d) == 1 for d in lp["top_logprobs"][1:])  # logprobs 0: the chosen token only


def test_max_tokens_zero_scores_the_prompt_only(served):
    client, model, tok = served
    ids = tok.encode("I am fine, thank you.", add_bos=True)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 0, "logprobs": 2,
                                             "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    ref = ref_logprobs(model, ids)
    assert c["text"] == tok.decode(ids) and c["finish_reason"] == "length"
    assert c["logprobs"]["token_logprobs"][1:] == pytest.approx([ref[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                                                abs=TOL)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # without echo there is nothing to return but it is not an error; without logprobs no logprobs
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 0})
    assert r.json()["choices"][0]["text"] == "" and r.json()["choices"][0]["logprobs"] is None


def test_what_lm_eval_sends_parses_to_the_models_loglikelihood(served):
    """lm-eval's loglikelihood request (token ids, max_tokens 1, logprobs 1, echo) through its own parser."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    client, model, tok = served
    pairs = [("The quick brown", " fox jumps"), ("Hello world! How", " are you today?"), ("1 + 2 =", " 3")]
    inputs, ctxlens = [], []
    for ctx, cont in pairs:
        ctx_ids = tok.encode(ctx)
        inputs.append(ctx_ids + tok.encode(ctx + cont)[len(ctx_ids):])
        ctxlens.append(len(ctx_ids))
    payload = {"model": MODEL, "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    out = client.post("/v1/completions", json=payload).json()
    parsed = LocalCompletionsAPI.parse_logprobs(out, tokens=inputs, ctxlens=ctxlens)
    for (ll, is_greedy), ids, n in zip(parsed, inputs, ctxlens):
        ref = ref_logprobs(model, ids)
        want = sum(ref[t - 1, ids[t]].item() for t in range(n, len(ids)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert is_greedy == all(int(ref[t - 1].argmax()) == ids[t] for t in range(n, len(ids)))
    # a continuation that is the model's own greedy choice is greedy
    ids = tok.encode("Hello", add_bos=True)
    ids = ids + greedy(model, ids, 2)
    out = client.post("/v1/completions", json={**payload, "prompt": [ids]}).json()
    assert LocalCompletionsAPI.parse_logprobs(out, tokens=[ids], ctxlens=[len(ids) - 2])[0][1] is True


def sse(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_completions_stream_carries_the_same_logprobs(served):
    client, _, tok = served
    body = {"model": MODEL, "prompt": ["Hello world", "thank you"], "max_tokens": 5, "temperature": 0.9, "seed": 3,
            "logprobs": 3, "echo": True, "n": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}))
    for i, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in mine for x in c["logprobs"][key]] == choice["logprobs"][key], key


# ----------------------------------------------------------------------------- /v1/chat/completions
def test_chat_logprobs_and_top_logprobs_equal_the_model(served):
    client, model, tok = served
    pieces = TokenPieces(tok)
    messages = [{"role": "user", "content": "How are you?"}]
    prompt = tok.encode_chat(messages, add_generation_prompt=True, thinking=False)[0]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    full = prompt + greedy(model, prompt, 6)
    ref = ref_logprobs(model, full)
    assert len(content) == 6
    for j, entry in enumerate(content):
        t, row = full[len(prompt) + j], ref[len(prompt) + j - 1]
        assert entry["token"] == pieces.text(t) and entry["bytes"] == list(pieces.bytes(t))
        assert entry["logprob"] == pytest.approx(row[t].item(), abs=TOL)
        want = row.topk(3)
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(want.values.tolist(), abs=TOL)
        assert [a["token"] for a in entry["top_logprobs"]] == [pieces.text(x) for x in want.indices.tolist()]
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    # logprobs: true alone gives each token's own logprob and no alternatives; false gives none
    r = client.post("/v1/chat/completions", json={**body, "top_logprobs": None})
    assert all(e["top_logprobs"] == [] for e in r.json()["choices"][0]["logprobs"]["content"])
    r = client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert r.json()["choices"][0]["logprobs"] is None


def test_token_bytes_of_a_byte_level_vocabulary(tokenizer):
    pieces = TokenPieces(tokenizer)
    text = "héllo 😀 wörld"
    ids = tokenizer.encode(text)
    assert b"".join(pieces.bytes(t) for t in ids) == text.encode("utf-8")   # partial characters included
    assert any(pieces.text(t).startswith("bytes:\\x") for t in ids)          # the emoji is split across tokens
    assert pieces.text(tokenizer.eos_id) == tokenizer.decode([tokenizer.eos_id])


# ----------------------------------------------------------------------------- thinking per request
class RecordingTokenizer:
    """The real tokenizer, recording what ``encode_chat`` is asked for (and taking template keywords)."""

    def __init__(self, tk):
        self.tk, self.calls = tk, []

    def __getattr__(self, name):
        return getattr(self.tk, name)

    def encode_chat(self, messages, add_generation_prompt=False, thinking=False, **template_kwargs):
        self.calls.append({"thinking": thinking, **template_kwargs})
        return self.tk.encode_chat(messages, add_generation_prompt, thinking=thinking)


@pytest.fixture(params=[False, True], ids=["serve-no-think", "serve-think"])
def fake(request, tokenizer):
    tk = RecordingTokenizer(tokenizer)
    engine = FakeEngine(tokenizer, max_seq_len=512, step_delay=0).start()
    with TestClient(create_app(engine, tk, MODEL, think=request.param)) as client:
        yield client, tk, request.param
    engine.shutdown()


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, **kw}


@pytest.mark.parametrize("fields,thinking", [
    ({"chat_template_kwargs": {"thinking": True}}, True),
    ({"chat_template_kwargs": {"thinking": False}}, False),
    ({"reasoning_effort": "high"}, True), ({"reasoning_effort": "low"}, True), ({"reasoning_effort": "medium"}, True),
    ({"reasoning_effort": "minimal"}, False), ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"thinking": True}}, True),
    ({"chat_template_kwargs": {"thinking": None}}, None),
    ({}, None),
])
def test_thinking_per_request(fake, fields, thinking):
    client, tk, default = fake
    r = client.post("/v1/chat/completions", json=chat(**fields))
    assert r.status_code == 200, r.text
    want = default if thinking is None else thinking
    assert tk.calls[-1]["thinking"] is want
    # the FakeEngine answers with a think block: it is split into reasoning_content either way
    assert r.json()["choices"][0]["message"]["reasoning_content"]


def test_thinking_on_opens_the_think_block_in_the_prompt(tokenizer):
    from nanoseek.serve.api import OpenAIServer
    from nanoseek.serve.protocol import ChatCompletionRequest

    server = OpenAIServer(FakeEngine(tokenizer), tokenizer, MODEL, ServeLimits())
    on = server.chat_prompt(ChatCompletionRequest.model_validate(chat(chat_template_kwargs={"thinking": True})))
    off = server.chat_prompt(ChatCompletionRequest.model_validate(chat(reasoning_effort="none")))
    assert on[-2:] == tokenizer.encode_chat([{"role": "user", "content": "hi"}], True, thinking=True)[0][-2:]
    assert tokenizer.think_id in on and tokenizer.think_id not in off


def test_template_kwargs_reach_the_template_and_contradictions_are_400(fake):
    client, tk, _ = fake
    r = client.post("/v1/chat/completions", json=chat(chat_template_kwargs={"thinking": True, "date": "today"}))
    assert r.status_code == 200 and tk.calls[-1] == {"thinking": True, "date": "today"}
    r = client.post("/v1/chat/completions", json=chat(chat_template_kwargs={"thinking": True}, reasoning_effort="none"))
    err = r.json()["error"]
    assert r.status_code == 400 and "chat_template_kwargs.thinking" in err["message"] and \
        "reasoning_effort" in err["message"] and err["param"] == "reasoning_effort"
    for bad, param in (({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs"),
                       ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                       ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
                       ({"chat_template_kwargs": ["thinking"]}, "chat_template_kwargs"),
                       ({"reasoning_effort": "maximum"}, "reasoning_effort")):
        r = client.post("/v1/chat/completions", json=chat(**bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_template_keywords_reach_a_real_tokenizers_template(served):
    client, _, tok = served     # nanoseek's own Tokenizer: extra keywords are Jinja variables, as in transformers
    r = client.post("/v1/chat/completions", json=chat(chat_template_kwargs={"some_flag": 1}, max_tokens=4))
    assert r.status_code == 200, r.text
    thinking = client.post("/v1/chat/completions", json=chat(chat_template_kwargs={"thinking": True}, max_tokens=4))
    plain = client.post("/v1/chat/completions", json=chat(chat_template_kwargs={"thinking": False}, max_tokens=4))
    ids_on = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True, thinking=True)[0]
    ids_off = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True, thinking=False)[0]
    assert len(ids_on) > len(ids_off)
    assert thinking.json()["usage"]["prompt_tokens"] == len(ids_on)
    assert plain.json()["usage"]["prompt_tokens"] == len(ids_off)


# ----------------------------------------------------------------------------- OpenAI's other fields
HARMLESS = dict(store=True, metadata={"team": "eval"}, user="u1", service_tier="auto", safety_identifier="h1",
                prompt_cache_key="k", prompt_cache_retention="24h", parallel_tool_calls=True, modalities=["text"],
                web_search_options=None, audio=None, verbosity="medium", tools=[], tool_choice="none",
                prediction={"type": "content", "content": "hi"}, response_format={"type": "text"},
                presence_penalty=0, frequency_penalty=0.0, logit_bias={}, functions=None, function_call=None)


def test_harmless_openai_fields_are_accepted(fake):
    client, _, _ = fake
    r = client.post("/v1/chat/completions", json=chat(**HARMLESS))
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True,
                                                                                   "include_obfuscation": False}))
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "store": False, "metadata": {},
                                             "user": "u", "suffix": None, "best_of": 1})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "hi", "name": "ann"}]))
    assert r.status_code == 200, r.text


BIG = "x" * 100_000


@pytest.mark.parametrize("endpoint,fields,param", [
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"verbosity": "high"}, "verbosity"),
    ("chat", {"tools": [{"type": "function", "function": {"name": BIG}}]}, "tools[0].function.name"),
    ("chat", {"logit_bias": {"5": BIG}}, "logit_bias"),
    ("chat", {BIG: 1}, None),                                       # an unknown field with a 100 KB name
    ("chat", {"unknown_field": BIG}, "unknown_field"),
    ("chat", {"metadata": {BIG: 1}}, None),
    ("chat", {"store": BIG}, "store"),
    ("chat", {"reasoning_effort": BIG}, "reasoning_effort"),
    ("chat", {"chat_template_kwargs": {"-" + BIG: 1}}, "chat_template_kwargs"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": BIG}]}]}, None),
    ("chat", {"prediction": {"type": BIG, "content": "x"}}, None),
    ("completions", {"suffix": BIG}, "suffix"),
    ("completions", {"presence_penalty": BIG}, "presence_penalty"),
])
def test_unsupported_fields_are_short_400s(fake, endpoint, fields, param):
    client, _, _ = fake
    body = chat(**fields) if endpoint == "chat" else {"model": MODEL, "prompt": "hi", **fields}
    r = client.post(f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body)
    assert r.status_code == 400, r.text[:300]
    assert len(r.content) < 1000, r.text[:300]           # names the field, never echoes the value back
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err


# ----------------------------------------------------------------------------- vLLM's tokenizer endpoints
def test_tokenizer_endpoints_match_the_servers_tokenization(served):
    client, _, tok = served
    r = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})
    assert r.json()["tokens"] == tok.encode("Hello world") and r.json()["count"] == len(tok.encode("Hello world"))
    assert client.post("/tokenize", json={"prompt": "Hi"}).json()["tokens"] == tok.encode("Hi", add_bos=True)
    messages = [{"role": "user", "content": "hi"}]
    r = client.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"thinking": True}})
    assert r.json()["tokens"] == tok.encode_chat(messages, True, thinking=True)[0]
    assert client.post("/detokenize", json={"tokens": tok.encode("abc")}).json() == {"prompt": "abc"}
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.decode([tok.eos_id]) and info["bos_token"] == tok.decode([tok.bos_id])
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": messages}),
                       ("/detokenize", {"tokens": [10**9]}), ("/tokenize", {"prompt": 5}),
                       ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}),
                       ("/tokenize", {"messages": messages, "chat_template_kwargs": {"thinking": 1}})):
        assert client.post(path, json=body).status_code == 400, (path, body)


# ----------------------------------------------------------------------------- the official openai client
def test_openai_client_reads_logprobs_from_both_endpoints(served):
    from openai import OpenAI

    from serve_helpers import background_server

    client, model, tok = served
    app = client.app
    with background_server(app) as url:
        oa = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "How are you?"}]
        r = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"chat_template_kwargs": {"thinking": False}})
        content = r.choices[0].logprobs.content
        prompt = tok.encode_chat(messages, add_generation_prompt=True, thinking=False)[0]
        full = prompt + greedy(model, prompt, len(content))
        ref = ref_logprobs(model, full)
        for j, entry in enumerate(content):
            row = ref[len(prompt) + j - 1]
            assert entry.logprob == pytest.approx(row[full[len(prompt) + j]].item(), abs=TOL)
            assert [a.logprob for a in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
            assert isinstance(entry.bytes, list)
        stream = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
        streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
        assert [e.logprob for e in streamed] == [e.logprob for e in content]
        ids = tok.encode("Hello world", add_bos=True)
        r = oa.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, logprobs=3, echo=True)
        lp = r.choices[0].logprobs
        ref = ref_logprobs(model, ids)
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 2
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([ref[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                                              abs=TOL)
        assert all(len(d) >= 3 for d in lp.top_logprobs[1:]) and len(lp.text_offset) == len(lp.tokens)
        chunks = list(oa.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, logprobs=3,
                                            echo=True, stream=True))
        assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
        # reasoning_effort through the client's own parameter
        r = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, reasoning_effort="minimal")
        assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- one thinking default
@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_chat_generate_and_serve_share_one_thinking_default(command):
    from nanoseek.cli import build_parser
    from nanoseek.infer.thinking import DEFAULT_THINKING

    parser = build_parser()
    base = [command, "--model", "runs/x"]
    assert parser.parse_args(base).think is DEFAULT_THINKING is False
    assert parser.parse_args(base + ["--think"]).think is True
    assert parser.parse_args(base + ["--no-think"]).think is False
