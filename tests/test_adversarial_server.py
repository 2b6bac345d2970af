"""Adversarial input to the OpenAI-compatible server: no client input gets a 5xx, no connection is
reset, and no half-sent body holds a connection or an engine row.

* a fuzz over every numeric field of the chat and completions requests (found from the request
  schemas, so a new field is fuzzed too): out of range, wrong type, huge, non-finite -> a 400
  naming the field, through the real engine on a tiny model (``top_k = 2**63`` once overflowed
  inside the engine and came back as a 500);
* raw sockets against a real uvicorn on 127.0.0.1 (a free port): the keep-alive connection
  still answers after a 400 and after an unexpected exception (500); a body that stops half-way
  or drips in gets 408 and a closed connection within a few seconds and never reaches the engine.
"""

from __future__ import annotations

import json
import socket
import time
import typing

import pytest
from fastapi.testclient import TestClient

from nanoseek.serve.api import ServeLimits, create_app
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest
from serve_helpers import FakeEngine, background_server, make_test_tokenizer, make_tiny_run

MODEL = "m"
# OpenAI's numeric fields that nanoseek accepts only at their neutral value (typed Any in the schema)
NEUTRAL_NUMERIC = {"presence_penalty", "frequency_penalty", "top_logprobs"}
BAD_VALUES = [-1, -10**30, 10**30, 2**63, 2**64, 1e308, -1e308, "1", "abc", True, [], {}, [1], {"a": 1}]
BAD_RAW = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "99999999999999999999999999999999999999"]


def numeric_fields(cls) -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        if any(a in (int, float) for a in args) or name in NEUTRAL_NUMERIC:
            out.append(name)
    return sorted(out)


CHAT_FIELDS = numeric_fields(ChatCompletionRequest)
COMPLETION_FIELDS = numeric_fields(CompletionRequest)
BASES = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
         "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2}}


@pytest.fixture(scope="module")
def tokenizer():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def real_client(tokenizer, tmp_path_factory):
    """TestClient over the real engine serving a tiny random model."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference

    run = make_tiny_run(tmp_path_factory.mktemp("run"), tokenizer)
    model, tok = load_for_inference(run)
    engine = Engine(model, tok, max_batch_size=4, max_seq_len=64)
    engine.start()
    with TestClient(create_app(engine, tok, MODEL, ServeLimits(max_tokens=8, default_max_tokens=4)),
                    raise_server_exceptions=False) as client:
        yield client
    engine.shutdown()


def test_the_fuzz_covers_every_numeric_field():
    for name in ("max_tokens", "temperature", "top_p", "top_k", "n", "seed", "presence_penalty"):
        assert name in CHAT_FIELDS and name in COMPLETION_FIELDS
    assert "max_completion_tokens" in CHAT_FIELDS and "best_of" in COMPLETION_FIELDS


@pytest.mark.parametrize("path", list(BASES))
def test_fuzz_numeric_fields_get_a_400_naming_the_field(real_client, path):
    fields = CHAT_FIELDS if "chat" in path else COMPLETION_FIELDS
    failures = []
    for field in fields:
        for value in BAD_VALUES:
            r = real_client.post(path, json={**BASES[path], field: value})
            if r.status_code != 400 or r.json()["error"]["param"] != field:
                failures.append((field, value, r.status_code, r.text[:160]))
        for raw in BAD_RAW:
            body = json.dumps(BASES[path])[:-1] + f', "{field}": {raw}}}'
            r = real_client.post(path, content=body, headers={"content-type": "application/json"})
            if not 400 <= r.status_code < 500:
                failures.append((field, raw, r.status_code, r.text[:160]))
    assert not failures, failures


@pytest.mark.parametrize("path", list(BASES))
def test_in_range_extremes_are_served(real_client, path):
    """The edges of each range are valid requests: answered, not refused or crashed."""
    for extra in ({"top_k": 2**31 - 1}, {"seed": 2**63 - 1}, {"seed": 0}, {"temperature": 2.0}, {"top_p": 1e-9},
                  {"n": 2}, {"temperature": 0}):
        r = real_client.post(path, json={**BASES[path], **extra})
        assert r.status_code == 200, (extra, r.text)


def test_other_hostile_bodies_are_4xx(real_client):
    cases = [
        ("/v1/completions", '{"model": "m", "prompt": [[1, 2, 99999999999999999999999]]}'),
        ("/v1/completions", '{"model": "m", "prompt": [-1]}'),
        ("/v1/completions", '{"model": "m", "prompt": "\\udc80"}'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "\\udc80"}]}'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["\\udc80"]}'),
        ("/v1/chat/completions", '[1, 2, 3]'),
        ("/v1/chat/completions", '{"model": "m", "messages": "hi"}'),
        ("/v1/chat/completions", b'\xff\xfe{"model": 1}'),
        ("/v1/completions", '{"model": "m", "prompt": "' + "a" * 5000 + '"}'),
    ]
    for path, body in cases:
        r = real_client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text[:200])


# ---------------------------------------------------------------------------- raw HTTP on a real uvicorn
def _read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (Content-Length framed) from ``sock``: (status, headers, body)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response (got {buf!r})")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside a response body")
        body += chunk
    return status, headers, body


def _request(method: str, path: str, body: bytes | None = None, length: int | None = None) -> bytes:
    body = body or b""
    n = len(body) if length is None else length
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n\r\n").encode() + body


def _closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture
def fake_server(tokenizer):
    engine = FakeEngine(tokenizer, max_batch_size=4, max_seq_len=256, step_delay=0.001).start()
    limits = ServeLimits(max_tokens=50, body_timeout_s=0.5)
    with background_server(create_app(engine, tokenizer, MODEL, limits)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield (host, int(port)), engine
    engine.shutdown()


def test_keep_alive_survives_a_400_and_an_out_of_range_parameter(fake_server):
    addr, _ = fake_server
    good = json.dumps({**BASES["/v1/chat/completions"], "max_tokens": 3}).encode()
    with socket.create_connection(addr) as sock:
        for bad in ({"top_k": 2**63}, {"temperature": -1}, {"seed": -5}, {"n": "2"}):
            sock.sendall(_request("POST", "/v1/chat/completions",
                                  json.dumps({**BASES["/v1/chat/completions"], **bad}).encode()))
            status, headers, body = _read_response(sock)
            assert status == 400 and json.loads(body)["error"]["param"] == next(iter(bad)), body
            assert headers.get("connection", "").lower() != "close"
            sock.sendall(_request("POST", "/v1/chat/completions", good))      # the same connection
            status, _, body = _read_response(sock)
            assert status == 200 and json.loads(body)["choices"], body


def test_an_unexpected_exception_is_a_500_without_resetting_the_connection(tokenizer):
    class BrokenEngine:
        max_seq_len, max_batch_size = 128, 4

        def submit(self, prompt, params):
            raise RuntimeError("the accelerator caught fire")

    with background_server(create_app(BrokenEngine(), tokenizer, MODEL)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_request("POST", "/v1/chat/completions", json.dumps(BASES["/v1/chat/completions"]).encode()))
            status, _, body = _read_response(sock)
            assert status == 500 and "caught fire" in json.loads(body)["error"]["message"]
            sock.sendall(_request("GET", "/health"))                       # the same connection still answers
            status, _, body = _read_response(sock)
            assert status == 200 and json.loads(body)["status"] == "ok"


def test_half_sent_body_gets_408_and_a_close_and_holds_no_engine_row(fake_server):
    addr, engine = fake_server
    body = json.dumps(BASES["/v1/chat/completions"]).encode()
    with socket.create_connection(addr) as sock:
        t0 = time.monotonic()
        sock.sendall(_request("POST", "/v1/chat/completions", body[:10], length=len(body)))
        time.sleep(0.2)
        assert engine.num_active_requests == 0
        status, headers, payload = _read_response(sock, timeout=5)
        elapsed = time.monotonic() - t0
        assert status == 408 and json.loads(payload)["error"]["code"] == "request_timeout"
        assert headers.get("connection", "").lower() == "close"
        assert _closed(sock, 3), "the server kept the half-sent connection open"
    assert elapsed < 4, elapsed
    assert engine.num_active_requests == 0


def test_a_dripping_body_is_cut_off_by_the_total_deadline(fake_server):
    """One byte every 0.1 s never trips a per-read timeout; the body deadline still ends it."""
    addr, engine = fake_server
    body = json.dumps(BASES["/v1/chat/completions"]).encode()
    with socket.create_connection(addr) as sock:
        t0 = time.monotonic()
        sock.sendall(_request("POST", "/v1/chat/completions", b"", length=len(body)))
        sock.settimeout(0.05)
        response = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                response += sock.recv(65536)
            except socket.timeout:
                pass
            if response or time.monotonic() - t0 > 5:
                break
            time.sleep(0.05)
        sock.settimeout(5)
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert time.monotonic() - t0 < 4
    assert engine.num_active_requests == 0


def test_a_complete_slow_body_within_the_deadline_is_served(fake_server):
    addr, _ = fake_server
    body = json.dumps({**BASES["/v1/chat/completions"], "max_tokens": 3}).encode()
    with socket.create_connection(addr) as sock:
        sock.sendall(_request("POST", "/v1/chat/completions", body[:20], length=len(body)))
        time.sleep(0.2)
        sock.sendall(body[20:])
        status, _, payload = _read_response(sock)
        assert status == 200 and json.loads(payload)["choices"]


def test_serve_cli_refuses_out_of_range_flags(capsys):
    from nanoseek.cli import main

    for flag, value in (("--port", "70000"), ("--max-batch-size", "0"), ("--body-timeout", "0"),
                        ("--body-timeout", "nan"), ("--max-seq-len", "1"), ("--max-body-bytes", "-1")):
        assert main(["serve", "--model", "x", flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", ["\\ud800", "x" * 100_000, "\\udc80\\ud800 \\u0000"], ids=["surrogate", "long", "mixed"])
def test_a_hostile_model_name_is_a_short_404_on_every_endpoint(real_client, name):
    """The model name went into the 404's message raw: a lone surrogate made the error itself fail
    to encode (a 500), and a long name came back whole."""
    bodies = [("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'),
              ("/v1/completions", '{"model": "%s", "prompt": "hi"}'),
              ("/tokenize", '{"model": "%s", "prompt": "hi"}'),
              ("/detokenize", '{"model": "%s", "tokens": [1]}')]
    for path, body in bodies:
        r = real_client.post(path, content=body % name, headers={"content-type": "application/json"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (path, r.status_code, r.text[:200])
        assert len(r.text) < 1000
    if "\\" not in name:
        r = real_client.get("/v1/models/" + name[:20_000])
        assert r.status_code == 404 and len(r.text) < 1000


def test_a_template_keyword_that_breaks_the_template_is_blamed_on_the_keyword(real_client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = real_client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"namespace": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
    r = real_client.post("/tokenize", json={"model": MODEL, "messages": body["messages"],
                                            "chat_template_kwargs": {"namespace": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
    r = real_client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"greeting": "x"}})
    assert r.status_code == 200, r.text                # a keyword the template ignores is harmless


@pytest.mark.parametrize("path,body,slow", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "chat_prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, "completion_prompts"),
    ("/tokenize", {"prompt": "hi"}, "prompt_ids"),
], ids=["chat", "completions", "tokenize"])
def test_building_a_prompt_never_stalls_the_other_clients(tokenizer, path, body, slow):
    """Rendering and tokenizing a prompt near the body limit takes seconds; done on the event loop it
    froze every other client (streams got no chunk, a 2-token request waited for all of them). Here
    the prompt's builder waits until another request has been answered: on the event loop that
    never happens."""
    import threading

    import httpx

    engine = FakeEngine(tokenizer, max_batch_size=4, max_seq_len=256).start()
    app = create_app(engine, tokenizer, MODEL, ServeLimits(max_tokens=50))
    server = app.state.server
    entered, release = threading.Event(), threading.Event()
    original = getattr(server, slow)

    def held(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    setattr(server, slow, held)
    result = {}
    try:
        with background_server(app) as url:
            def heavy():
                result["r"] = httpx.post(url + path, json={"model": MODEL, **body}, timeout=30)
            t = threading.Thread(target=heavy)
            t.start()
            assert entered.wait(10)
            try:
                r = httpx.get(url + "/health", timeout=3)            # answered while the prompt is being built
                assert r.status_code == 200
            finally:
                release.set()
                t.join(30)
            assert result["r"].status_code == 200, result["r"].text
    finally:
        engine.shutdown()
