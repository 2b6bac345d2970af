"""The OpenAI-compatible HTTP API over the inference engine, and the web chat page.

``create_app(engine, tokenizer, model_name, limits)`` returns a FastAPI app with

* ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served;
* ``POST /v1/chat/completions``: chat through the tokenizer's DeepSeek chat template; the answer
  in ``content`` and the chain of thought in ``reasoning_content``, as DeepSeek's API returns them;
  tool calls as OpenAI's ``tool_calls`` (the client runs them), or run by the server itself with
  ``create_app(..., toolbox=...)`` (``nanoseek serve --tools``) and reported in ``tool_runs``
  (``tools.py``);
* ``POST /v1/completions``: raw text continuation of one or several prompts (strings or token ids);
* ``GET /``: the web chat (``static/index.html``), ``GET /health``;
* ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: vLLM's tokenizer endpoints,
  so lm-evaluation-harness's ``local-completions`` finds the server's tokenizer by itself
  (its ``tokenizer_backend=auto``/``remote``) and counts tokens exactly as the server does.

Logprobs, echo and thinking per request: see ``protocol.py`` (the fields) and ``logprobs.py``
(the two response formats). A chat request's thinking switch goes to the tokenizer as
``encode_chat(messages, add_generation_prompt=True, thinking=<bool>, **chat_template_kwargs)``.

Only the chat template makes control tokens: chat messages are encoded with the tokenizer's
``encode_chat``, so ``<｜Assistant｜>``, ``<｜end▁of▁sentence｜>``, ``<think>`` or any other
control-token string inside a message (a user's, or an earlier answer sent back) stays text and
cannot close its turn or forge another. A ``/v1/completions`` prompt string is raw model input:
its control-token strings are parsed (``encode``), as HF's ``tokenizer(text)``, vLLM and OpenAI's
legacy completions do and as lm-eval's chat-templated completion requests need; whoever writes a
raw prompt writes the whole model input, so there is no one else's turn to forge. The special
tokens the tokenizer's post-processor adds (BOS) are added as HF's ``tokenizer(text)`` adds them,
with one exception: a prompt that already starts with the BOS token (lm-eval's
``tokenized_requests=False`` sends the token ids it scores decoded to text, its BOS included when
``add_bos_token=True``, and its rolling windows start with BOS) gets no second BOS, so the server
scores exactly the ids lm-eval counted. ``/tokenize`` follows the same rule.

Both completion endpoints stream as server-sent events (``stream: true``; a final usage chunk
with ``stream_options.include_usage``) or answer in one JSON object, with ``n`` choices, usage
counts and ``finish_reason`` "stop" or "length". Every request is handed to the engine with
``engine.submit`` as soon as it is validated; the engine's scheduler batches the rows of all live
requests into each decode step (continuous batching), so concurrent requests share the model
rather than queueing behind one another. When a client goes away its request is cancelled
(streams: the response generator is closed; non-streaming: the connection is polled), which
frees its rows at the engine's next step.

Bad input never reaches the engine: malformed JSON, wrong types, unknown fields or models, a
prompt longer than the context, ``max_tokens``/``n`` over the configured :class:`ServeLimits`
each get an OpenAI error object with a 4xx status; every numeric field has a bounded range
(``protocol.py``), so no client value reaches the engine that it cannot represent. The body is
guarded by an ASGI middleware before anything is parsed: its size (by ``Content-Length`` and by
counting a streamed body: 413) and the time it takes to arrive (``ServeLimits.body_timeout_s``
from the first byte the app waits for to the last: 408 and the connection is closed), so a
half-sent body cannot hold a connection, and it never reaches the engine, so it holds no
generation slot. Rendering and tokenizing a prompt (seconds for a body near the limit) run in a
worker thread, not on the event loop, so they never stall other clients' streams. Error objects
are JSON with non-ASCII escaped (``ErrorResponse``): quoting a client's text cannot fail to
encode. An unexpected exception (a bug, or the engine failing) is answered with a 500
error object by the outermost middleware, which does not re-raise it: the keep-alive connection
stays usable for the client's next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.streaming import skipped_token_ids
from nanoseek.infer.thinking import DEFAULT_THINKING
from nanoseek.tasks.tool_use import with_system

from .logprobs import TextOffsets, TokenPieces, chat_logprobs, legacy_logprobs, merge_legacy, text_offsets
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingRequest,
                       TokenizeRequest, error_body, short, validation_error)
from .tools import ToolCallParser, ToolPlan, plan_tools, tool_run

logger = logging.getLogger("nanoseek.serve")
STATIC_DIR = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class ServeLimits:
    """Per-request limits; a request over any of them gets a 4xx error naming it."""

    max_body_bytes: int = 1 << 20          # request body, checked before parsing
    max_prompt_tokens: int | None = None   # None: the context length minus one
    max_tokens: int = 2048                 # completion tokens per choice (``max_tokens``)
    default_max_tokens: int = 512          # chat default when ``max_tokens`` is omitted (capped by the context)
    max_n: int = 8                         # choices per prompt
    max_prompts: int = 16                  # prompts in one /v1/completions request
    context_length: int | None = None      # prompt + completion; None: the engine's ``max_seq_len``
    body_timeout_s: float = 10.0           # the whole request body must arrive within this (else 408)

    def validate(self) -> ServeLimits:
        for name in ("max_body_bytes", "max_tokens", "default_max_tokens", "max_n", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.body_timeout_s < float("inf"):
            raise ValueError(f"ServeLimits.body_timeout_s must be a positive number, got {self.body_timeout_s}")
        for name in ("max_prompt_tokens", "context_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1 or None, got {getattr(self, name)}")
        return self


# ---------------------------------------------------------------------------- body size
class RequestTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class RequestTimeout(StarletteHTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s")


class BodySizeLimitMiddleware:
    """Guard the request body before the app parses it: over ``max_bytes`` -> 413 (by ``Content-Length``
    up front, else while receiving); not complete ``timeout_s`` after the app first waits for it -> 408
    with ``Connection: close`` (a slowloris body never reaches a route, so it holds no engine row)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 10.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:  # (the server rejects malformed lengths itself)
            return await _send_json(send, 413, _http_error_body(RequestTooLarge(self.max_bytes)))
        seen = 0
        started = False
        body_done = scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE")
        deadline: float | None = None

        async def limited_receive():
            nonlocal seen, body_done, deadline
            if body_done:                      # later receives wait for a disconnect: no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise RequestTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (RequestTooLarge, RequestTimeout) as e:  # raised outside a route (the app normally renders it)
            if started:
                raise
            await _send_json(send, e.status_code, _http_error_body(e), close=isinstance(e, RequestTimeout))


class CatchAllMiddleware:
    """The outermost layer: an exception nothing else handled becomes a 500 error object, and is not
    re-raised (Starlette's own handler re-raises, and uvicorn then resets the keep-alive connection)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:        # a bug, or the engine failing: never the answer to a client's mistake
            logger.exception("unexpected error handling %s %s", scope.get("method"), scope.get("path"))
            if started:               # the headers are out: end the body so the response is complete
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:
                    pass
                return
            await _send_json(send, 500, error_body(f"internal server error ({type(e).__name__}): {e}", "server_error",
                                                   None, "internal_error"))


class ErrorResponse(JSONResponse):
    """An error object as JSON with non-ASCII characters escaped: a message quoting a client's text
    stays encodable whatever the text holds (a lone surrogate has no UTF-8 form)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def _http_error_body(e: StarletteHTTPException) -> dict:
    message = str(e.detail)
    if e.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
        message = "request body is not valid JSON: it must be a UTF-8 encoded JSON object"
    return error_body(message, "invalid_request_error", None, _HTTP_CODES.get(e.status_code))


_HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "request_too_large"}


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:                                  # the rest of the body is never read: end the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------- engine events
@dataclass
class _Choice:
    """What one choice has produced so far: text, and each token with its logprobs and, with an
    ``offsets`` tracker (completions with logprobs), where its text starts."""

    text: str = ""
    reasoning: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    tracker: TextOffsets | None = None
    tools: ToolCallParser | None = None  # a request with tools: the text before the calls, and the calls
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tops: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    delta: tuple = ("", "", [])          # the last event's (text, reasoning, tool-call deltas)
    runs: list = field(default_factory=list)     # server-side tools: each call with its output (tools.tool_run)
    run: dict | None = None              # the last event's tool run, if it reported one

    def add(self, ev) -> None:
        if ev.token_id is not None:          # a cancellation (or score-only) event carries no token
            self.tokens += 1
            self.token_ids.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.tops.append(ev.top_logprobs)
            if self.tracker is not None:
                self.offsets.append(self.tracker.push(ev.token_id))
        self.delta = self.tools.push(ev) if self.tools is not None else (ev.text_delta, ev.reasoning_delta, [])
        self.run = tool_run(ev.tool_result) if getattr(ev, "tool_result", None) is not None else None
        if self.run is not None:
            self.runs.append(self.run)
        self.text += self.delta[0]
        self.reasoning += self.delta[1]
        if ev.finished:
            self.finish_reason = self.tools.finish_reason(ev.finish_reason) if self.tools else ev.finish_reason

    def message(self) -> dict:
        """The chat reply: content, reasoning and, with tools, the calls. With the request's tools an
        empty content is null (only calls, or nothing), as streamed: that stream opens with content
        null and ToolCallParser holds blank text."""
        calls = self.tools.calls() if self.tools is not None else []
        content = (self.text or None) if self.tools is not None else self.text
        out = {"role": "assistant", "content": content, "reasoning_content": self.reasoning or None}
        if calls:
            out["tool_calls"] = calls
        if self.runs:
            out["tool_runs"] = self.runs
        return out


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


async def _merged(handles: list) -> AsyncIterator[tuple[int, Any]]:
    """Events of several engine handles as ``(handle index, event)``; cancels them all on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for ev in handle.aiter():
                queue.put_nowait((i, ev))
        except Exception as e:  # surface engine failures to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        live = len(handles)
        while live:
            i, ev = await queue.get()
            if ev is None:
                live -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for h in handles:  # a no-op for finished requests; frees the rows of a disconnected client
            h.cancel()
        for t in tasks:
            t.cancel()


async def _collect(request: Request, handles: list, n: int, new_choice=None) -> list[_Choice]:
    """Run the requests to the end (choice ``i * n + k`` is sample k of prompt i); on disconnect, cancel them.
    ``new_choice(i)`` makes choice i's record."""
    choices = [new_choice(i) if new_choice else _Choice() for i in range(len(handles) * n)]

    async def consume() -> None:
        async for i, ev in _merged(handles):
            choices[i * n + ev.index].add(ev)

    task = asyncio.create_task(consume())
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                raise ClientGone
        task.result()
    finally:
        if not task.done():
            task.cancel()  # closes _merged, which cancels the engine requests
    _check_finished(choices)
    return choices


def _check_finished(choices: list[_Choice]) -> None:
    unfinished = [i for i, c in enumerate(choices) if c.finish_reason is None]
    if unfinished:
        raise APIError(503, f"the engine stopped before finishing choices {unfinished} (shutting down?)",
                       None, "engine_stopped", "server_error")


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _event_stream(handles: list, n: int, prompt_tokens: int, head: dict, include_usage: bool,
                        opening: list[dict], render, first=None, new_choice=None) -> AsyncIterator[str]:
    """The SSE body: ``opening`` choice chunks, then per prompt ``first(prompt index)`` chunks when its
    first event arrives (its prompt logprobs are known by then), ``render(choice index, event, choice)``
    chunks, usage, [DONE].

    Closing this generator (the client went away) closes ``_merged``, which cancels the requests.
    """
    extra = {"usage": None} if include_usage else {}
    choices = [new_choice(i) if new_choice else _Choice() for i in range(len(handles) * n)]
    started: set[int] = set()
    try:
        for c in opening:
            yield _sse({**head, "choices": [c], **extra})
        async for h, ev in _merged(handles):
            if first is not None and h not in started:
                started.add(h)
                for c in first(h):
                    yield _sse({**head, "choices": [c], **extra})
            i = h * n + ev.index
            choices[i].add(ev)
            for c in render(i, ev, choices[i]):
                yield _sse({**head, "choices": [c], **extra})
        _check_finished(choices)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are sent: report in-band, as OpenAI does
        yield _sse(error_body(f"generation failed ({type(e).__name__}): {e}", "server_error", None, "internal_error"))


def _chat_chunks(pieces: TokenPieces | None):
    """Chunks of a chat stream; with ``pieces`` (logprobs asked) each token's chunk carries its logprobs."""
    def render(i: int, ev, choice: _Choice) -> list[dict]:
        out = []
        lp = None
        if pieces is not None and ev.token_id is not None:
            lp = chat_logprobs(pieces, [ev.token_id], [ev.logprob], [ev.top_logprobs])
        text, reasoning, calls = choice.delta
        if reasoning or text or lp:  # DeepSeek's delta: one of the two fields set, the other null
            delta = {"content": text or None, "reasoning_content": reasoning or None}
            out.append({"index": i, "delta": delta, "logprobs": lp, "finish_reason": None})
        if calls:                    # OpenAI's tool-call deltas: index, id, type, name, then argument fragments
            out.append({"index": i, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None})
        if choice.run is not None:   # a server-side call and its output (nanoseek serve --tools)
            out.append({"index": i, "delta": {"tool_run": choice.run}, "logprobs": None, "finish_reason": None})
        if ev.finished:
            out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason})
        return out
    return render


def _completion_chunks(pieces: TokenPieces | None):
    """Chunks of a completions stream; with ``pieces`` (logprobs asked) one per token, with its logprobs."""
    def render(i: int, ev, choice: _Choice) -> list[dict]:
        with_token = pieces is not None and ev.token_id is not None
        if not (ev.text_delta or ev.finished or with_token):
            return []
        lp = None
        if pieces is not None:
            lp = legacy_logprobs(pieces, [ev.token_id], [ev.logprob], [ev.top_logprobs], [choice.offsets[-1]]) \
                if with_token else legacy_logprobs(pieces, [], [], [], [])
        finish = ev.finish_reason if ev.finished else None
        return [{"index": i, "text": ev.text_delta, "logprobs": lp, "finish_reason": finish}]
    return render


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------------------- requests -> engine
class OpenAIServer:
    """Turns validated requests into engine requests and their events into OpenAI responses."""

    def __init__(self, engine, tokenizer, model_name: str, limits: ServeLimits, think: bool = DEFAULT_THINKING,
                 toolbox=None, describe_tools: bool | str = "full"):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits, self.think = limits, think    # think: the thinking of requests that do not say
        self.toolbox = toolbox                     # server-side tools (tools.py); None: clients run their own
        self.describe_tools = describe_tools       # ...what the prompt says of them (full, names, none)
        self.pieces = TokenPieces(tokenizer)
        self.context = limits.context_length or getattr(engine, "max_seq_len", None)
        if not self.context:
            raise ValueError("no context length: set ServeLimits.context_length or engine.max_seq_len")
        self.max_prompt = min(limits.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_n = min(limits.max_n, getattr(engine, "max_batch_size", limits.max_n))
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.context}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {short(repr(name))} does not exist: this server serves "
                           f"'{self.model_name}'", "model", "model_not_found")

    # ------------------------------------------------------------------ validation
    def check(self, req: SamplingRequest) -> None:
        req.check_supported()
        self.check_model(req.model)
        if req.n > self.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {self.max_n}", "n", "invalid_value")

    def budget(self, prompt_len: int, requested: int | None, param: str, default: int) -> int:
        """max_new_tokens for a prompt of ``prompt_len`` tokens, or a 400 naming what is over."""
        if prompt_len > self.max_prompt:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server accepts at most {self.max_prompt} "
                                f"(context length {self.context})", param, "context_length_exceeded")
        if requested is None:
            return max(1, min(default, self.limits.max_tokens, self.context - prompt_len))
        if requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={requested} exceeds this server's limit of {self.limits.max_tokens}",
                           "max_tokens", "invalid_value")
        if prompt_len + requested > self.context:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens, but {prompt_len} "
                                f"prompt tokens + {requested} max_tokens were requested; reduce the prompt or "
                                "max_tokens",
                           "max_tokens", "context_length_exceeded")
        return requested

    def chat_prompt(self, req: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
        """The prompt's ids; with tools, the template describes them (``tools=``) and a forced call's
        start is appended (``tool_choice`` required or named: rendered without thinking, tools.py)."""
        tk = self.tokenizer
        thinking, extra = req.thinking(self.think), req.template_kwargs()
        tools = {} if plan is None else {"tools": plan.template_tools()}
        if plan is not None and plan.forced:
            thinking = False
        chat = with_system(req.chat(), plan.system if plan is not None else None)
        try:
            ids = tk.encode_chat(chat, add_generation_prompt=True, thinking=thinking, **extra, **tools)[0]
            return ids + (plan.prompt_suffix(tk) if plan is not None else [])
        except TypeError as e:   # a template keyword that collides with a parameter of encode_chat
            if not extra:
                raise
            raise APIError(400, f"chat_template_kwargs: this server's chat template takes no "
                                f"{short(', '.join(sorted(extra)))}", "chat_template_kwargs", "invalid_value") from e
        except ValueError as e:  # TokenizerError, or text that is not valid unicode (a lone surrogate)
            param = "messages"
            if extra:            # the client's template keywords, or the messages? the same without the keywords
                try:
                    tk.encode_chat(chat, add_generation_prompt=True, thinking=thinking, **tools)
                    param = "chat_template_kwargs"
                except (ValueError, TypeError):
                    pass
            raise APIError(400, f"{param}: {short(str(e), 300)}", param, "invalid_value") from e

    def prompt_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        """A raw prompt string's ids: the tokenizer's ``encode`` (HF's ``tokenizer(text)``), except
        that a text which already starts with the BOS token gets no second one (module docstring)."""
        ids = self.tokenizer.encode(text, add_bos=add_special_tokens)
        bos = getattr(self.tokenizer, "bos_id", None)
        if add_special_tokens and bos is not None and ids[:2] == [bos, bos]:
            plain = self.tokenizer.encode(text, add_bos=False)
            if plain[:1] == [bos] and ids[1:1 + len(plain)] == plain:   # the BOS added is the one too many
                ids = ids[1:]
        return ids

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts exceed this server's limit of {self.limits.max_prompts} "
                                "per request", "prompt", "invalid_value")
        out = []
        vocab = self.tokenizer.vocab_size
        for j, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{j}]"
            if isinstance(p, str):
                try:  # raw model input: control-token strings are parsed (module docstring)
                    ids = self.prompt_ids(p, add_special_tokens=True)
                except ValueError as e:
                    raise APIError(400, f"{param}: {e}", param, "invalid_value") from e
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                   param, "invalid_value")
                ids = list(p)
            self.budget(len(ids), req.max_tokens, param, COMPLETIONS_DEFAULT_MAX_TOKENS)
            out.append(ids)
        return out

    # ------------------------------------------------------------------ the engine
    def submit(self, prompts: list[list[int]], req: SamplingRequest, max_new_tokens: int,
               split_reasoning: bool, top_logprobs: int = 0, prompt_logprobs: int | None = None,
               **overrides: Any) -> list:
        """Each prompt to the engine; ``overrides``: more :class:`SamplingParams` fields (tools.py's)."""
        top_k = min(req.top_k, self.tokenizer.vocab_size)   # k >= the vocabulary filters nothing
        fields = dict(max_new_tokens=max_new_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                      top_k=top_k, n=req.n, seed=req.seed, stop=list(req.stop), ignore_eos=req.ignore_eos,
                      split_reasoning=split_reasoning, skip_special_tokens=req.skip_special_tokens,
                      top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)
        params = SamplingParams(**{**fields, **overrides})
        handles = []
        extra = {"toolbox": self.toolbox} if params.tools == "run" else {}
        try:
            for ids in prompts:
                handles.append(self.engine.submit(ids, params, **extra))
        except ValueError as e:  # the engine's own checks; ours should have caught it first
            for h in handles:
                h.cancel()
            raise APIError(400, f"the engine rejected the request: {e}", None, "invalid_value") from e
        return handles

    # ------------------------------------------------------------------ endpoints
    def _chat_prompt_checked(self, req: ChatCompletionRequest) -> tuple[ToolPlan | None, list[int], int]:
        """(tool plan, prompt ids, max new tokens) of a chat request, or its 400."""
        self.check(req)
        plan = plan_tools(req, self.tokenizer, self.toolbox, self.describe_tools)
        ids = self.chat_prompt(req, plan)
        return plan, ids, self.budget(len(ids), req.requested_max_tokens(), "messages", self.limits.default_max_tokens)

    async def chat(self, req: ChatCompletionRequest, request: Request):
        # rendering and tokenizing a prompt of up to the body limit takes seconds: in a worker
        # thread, so the event loop goes on serving the other clients' streams meanwhile
        plan, ids, max_new = await asyncio.to_thread(self._chat_prompt_checked, req)
        top = (req.top_logprobs or 0) if req.logprobs else 0
        handles = self.submit([ids], req, max_new, split_reasoning=True, top_logprobs=top,
                              **(plan.sampling() if plan is not None else {}))
        pieces = self.pieces if req.logprobs else None

        def new_choice(i: int) -> _Choice:
            return _Choice(tools=plan.parser(self.tokenizer) if plan is not None else None)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            # with the request's own tools content starts null: a reply that is only calls has content
            # null, as the whole reply says (the openai client's accumulation keeps None until text comes)
            start = None if req.tools else ""
            opening = [{"index": i, "delta": {"role": "assistant", "content": start}, "logprobs": None,
                        "finish_reason": None} for i in range(req.n)]
            body = _event_stream(handles, req.n, len(ids), {**head, "object": "chat.completion.chunk"},
                                 req.include_usage(), opening, _chat_chunks(pieces), new_choice=new_choice)
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            choices = await _collect(request, handles, req.n, new_choice)
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; the requests are cancelled
        return {**head, "choices": [
            {"index": i, "message": c.message(),
             "logprobs": chat_logprobs(pieces, c.token_ids, c.logprobs, c.tops) if pieces else None,
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(len(ids), choices)}

    def _prompt_logprobs(self, handle, ids: list[int], echo: str) -> dict:
        """The legacy logprobs of an echoed prompt; offsets into ``echo`` (which may lack the BOS text)."""
        pl = handle.prompt_logprobs
        shift = len(echo) - len(self.tokenizer.decode(ids))
        offsets = [max(0, o + shift) for o in text_offsets(self.tokenizer, ids)]
        return legacy_logprobs(self.pieces, ids, pl.logprobs, pl.top, offsets)

    def _completion_prompts_checked(self, req: CompletionRequest) -> tuple[list[list[int]], int]:
        """(prompt ids, max new tokens) of a completions request, or its 400."""
        self.check(req)
        prompts = self.completion_prompts(req)
        longest = max(len(p) for p in prompts)
        return prompts, self.budget(longest, req.max_tokens, "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS)

    async def completions(self, req: CompletionRequest, request: Request):
        prompts, max_new = await asyncio.to_thread(self._completion_prompts_checked, req)   # (as chat's)
        want_lp = req.logprobs is not None
        # A raw continuation: the text keeps its <think> tags (no reasoning split).
        handles = self.submit(prompts, req, max_new, split_reasoning=False, top_logprobs=req.logprobs or 0,
                              prompt_logprobs=req.logprobs if want_lp and req.echo else None)
        pieces = self.pieces if want_lp else None
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(p)) if req.echo else "" for p in req.prompts()]

        def new_choice(i: int) -> _Choice:       # offsets in the returned text: after the echo
            return _Choice(tracker=TextOffsets(self.tokenizer, len(echoes[i // n]), skip) if want_lp else None)
        skip = skipped_token_ids(self.tokenizer) if req.skip_special_tokens else frozenset()
        prompt_tokens = sum(len(p) for p in prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        n = req.n

        def echo_logprobs(h: int) -> dict | None:
            return self._prompt_logprobs(handles[h], prompts[h], echoes[h]) if want_lp else None

        if req.stream:
            def first(h: int) -> list[dict]:      # the echo, once the prefill has scored the prompt
                if not req.echo:
                    return []
                lp = echo_logprobs(h)
                return [{"index": h * n + k, "text": echoes[h], "logprobs": lp, "finish_reason": None}
                        for k in range(n)]
            body = _event_stream(handles, n, prompt_tokens, head, req.include_usage(), [], _completion_chunks(pieces),
                                 first, new_choice)
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            choices = await _collect(request, handles, n, new_choice)
        except ClientGone:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            lp = None
            if want_lp:
                mine = legacy_logprobs(self.pieces, c.token_ids, c.logprobs, c.tops, c.offsets)
                lp = merge_legacy([echo_logprobs(i // n), mine]) if req.echo else mine
            out.append({"index": i, "text": echoes[i // n] + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**head, "choices": out, "usage": _usage(prompt_tokens, choices)}

    # ------------------------------------------------------------------ tokenizer (vLLM's endpoints)
    def tokenize(self, req: TokenizeRequest) -> dict:
        if req.model is not None:
            self.check_model(req.model)
        try:
            if req.messages is not None:
                try:
                    chat = ChatCompletionRequest.model_validate({"model": self.model_name, "messages": req.messages,
                                                                 "chat_template_kwargs": req.chat_template_kwargs,
                                                                 "tools": req.tools, "tool_choice": req.tool_choice})
                except ValidationError as e:
                    raise validation_error(list(e.errors())) from None
                ids = self.chat_prompt(chat, plan_tools(chat, self.tokenizer, self.toolbox, self.describe_tools))
            else:
                ids = self.prompt_ids(req.prompt, req.add_special_tokens)
        except ValueError as e:
            raise APIError(400, f"{'messages' if req.messages is not None else 'prompt'}: {short(str(e), 300)}",
                           "messages" if req.messages is not None else "prompt", "invalid_value") from e
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        if req.model is not None:
            self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {self.tokenizer.vocab_size})",
                           "tokens", "invalid_value")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        tk = self.tokenizer
        name = {attr: tk.decode([getattr(tk, f"{attr}_id")]) if getattr(tk, f"{attr}_id", None) is not None else None
                for attr in ("bos", "eos", "pad")}
        return {"tokenizer_class": type(tk).__name__, "bos_token": name["bos"], "eos_token": name["eos"],
                "pad_token": name["pad"], "chat_template": getattr(tk, "chat_template", None),
                "model_max_length": self.context, "vocab_size": tk.vocab_size}


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str, limits: ServeLimits | None = None,
               think: bool = DEFAULT_THINKING, toolbox=None, describe_tools: bool | str = "full") -> FastAPI:
    """The API and web chat over ``engine`` (started by the caller; see ``nanoseek.serve.cli``).

    ``engine``: :class:`nanoseek.infer.engine.Engine` (or anything with its ``submit`` and
    ``max_seq_len``). ``tokenizer``: ``nanoseek.data.tokenizer.Tokenizer`` (or anything with its
    ``encode``, ``encode_chat``, ``decode`` and ``vocab_size``). ``think``: the chat template's
    thinking switch for requests that do not set it (``chat_template_kwargs.thinking`` or
    ``reasoning_effort``); the engine reads a completion as reasoning until ``</think>`` when the
    prompt ends in an open think block. ``toolbox``: tools the server runs itself (a
    :class:`nanoseek.tools.Toolbox`; ``nanoseek serve --tools``) for chat requests without their own
    ``tools`` (tools.py); the tokenizer must have the tool tokens (ValueError otherwise).
    ``describe_tools``: what their prompts say of them, "full" (described), "names" (named in the
    system turn, as the speedrun trains its model) or "none" (built in; :mod:`nanoseek.tasks.tool_use`).
    """
    if toolbox is not None and len(toolbox):
        from nanoseek.tools.format import ToolTokens

        from .tools import no_tool_tokens_message
        if ToolTokens.of(tokenizer) is None:
            raise ValueError(f"server-side tools: {no_tool_tokens_message(tokenizer)}")
    server = OpenAIServer(engine, tokenizer, model_name, (limits or ServeLimits()).validate(), think, toolbox,
                          describe_tools)
    app = FastAPI(title="nanoseek", description="OpenAI-compatible API for a nanoseek DeepSeek-V3 model",
                  version="0.1.0")
    app.state.server = server
    app.state.model_name = model_name
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=server.limits.max_body_bytes,
                       timeout_s=server.limits.body_timeout_s)
    app.add_middleware(CatchAllMiddleware)     # added last: the outermost of the app's middlewares

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return ErrorResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return ErrorResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        headers = dict(getattr(e, "headers", None) or {})
        if isinstance(e, RequestTimeout):      # the rest of the body is never read: end the connection
            headers["Connection"] = "close"
        return ErrorResponse(_http_error_body(e), status_code=e.status_code, headers=headers or None)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.completions(req, request)

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest):        # plain functions: FastAPI runs them in a worker thread
        return server.tokenize(req)

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest):
        return server.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return server.tokenizer_info()

    return app
