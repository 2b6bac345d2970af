"""One request's life in the engine: the client's handle, the results, and each sample's text state.

* :class:`RequestHandle` is what ``Engine.submit`` returns: a thread-safe queue of
  :class:`TokenEvent` s, readable blocking (``events(timeout)``) or from asyncio (``aiter()``),
  ``result()`` for the finished :class:`Completion` s and ``cancel()``. The producer side is
  public too: a scheduler ``put`` s events and ``finish`` es the request, and a caller that runs
  the steps itself reads ``ready_events()`` without waiting; the engine and the tests' fake
  engine (``tests/serve_helpers.py``) both drive handles through these methods only.
* :class:`Request` / :class:`Sample` are the scheduler's bookkeeping: a request has ``n``
  samples, one per cache row. ``Sample.append(token)`` is the per-token pipeline (stop tokens, the repetition
  guard, the length limit, then incremental detokenisation (skipped control tokens add no
  text) -> stop strings -> ``<think>`` split),
  returning the event to stream. It needs no model, so tests drive it with scripted tokens.
  A sample nobody streams (``Engine.generate``) whose text cannot end it (no stop strings, no
  tool calls) skips the text per token and decodes its tokens once at its end (``_final_text``).

Logprobs travel with the tokens: each :class:`TokenEvent` carries its token's logprob and, when
the request asked, its top alternatives; a request that asked for prompt logprobs finds them in
``RequestHandle.prompt_logprobs`` (:class:`PromptLogprobs`, set by the prefill before the first
event is queued) and in each :class:`Completion`.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from nanoseek.tools.format import ToolCall, ToolTokens
from nanoseek.tools.toolbox import Toolbox, ToolResult

from .reasoning import ReasoningSplitter
from .sampling import SamplingParams, TopLogprobs, repeats_too_long
from .streaming import IncrementalDetokenizer, StopStringFilter, skipped_token_ids


class EngineError(RuntimeError):
    """The scheduler failed while serving a request (the message carries the cause)."""


@dataclass
class PromptLogprobs:
    """A prompt scored by the model (``SamplingParams.prompt_logprobs``): ``logprobs[t]`` is
    log p(token_ids[t] | token_ids[:t]) (None for t = 0: nothing precedes it), ``top[t]`` the N
    most likely (id, logprob) at position t (None at t = 0 or when N is 0)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[TopLogprobs | None]


@dataclass
class Completion:
    """One finished sample. ``text`` is the whole generated text (think tags included, cut before
    a stop string, no EOS); ``reasoning`` the stripped text inside ``<think>...</think>`` (None when
    there was no think block), ``answer`` the stripped rest. ``token_ids`` are all generated
    tokens, the final EOS / stop token included. ``finish_reason``: "stop" (EOS, a stop token or
    string, or the repetition guard; ``stop_reason`` says which: "eos", "stop_token",
    "stop_string", "repetition"), "length" (max_new_tokens or the cache length) or "cancelled"
    (a failed step raises :class:`EngineError` instead). ``logprobs``: log p of each token under
    the raw model (temperature 1); ``top_logprobs``: per token its top-N alternatives (when the
    request set ``top_logprobs``, else empty); ``prompt_logprobs``: the scored prompt (when asked).

    Tool calls (``SamplingParams.tools`` "stop" or "run"): a calls block adds no text (``text`` is
    the model's own text); ``finish_reason`` "tool_calls" ends a "stop" sample at its block, whose
    calls are ``tool_calls``. With "run", ``tool_calls`` are every call made, ``tool_results``
    their results in order, ``token_ids`` also hold what the tool loop appended (``model_mask`` 0
    there, 1 on the model's own tokens; their logprobs 0.0) and ``final_text`` is the text written
    after the last tool output (the whole text when no tool ran), as written: a think block the
    model opens after an output (V3.1 may think again) stays in ``final_text`` with its tags
    (``reasoning`` joins every think block; a reader of the answer splits ``final_text`` itself,
    e.g. :func:`nanoseek.tasks.reply.split_reasoning`). The text on either side of a calls block
    is separate: a stop string never matches across it. Outputs that would not fit the row end
    the sample ("length") unappended; ``tool_results`` still say what ran."""

    token_ids: list[int]
    text: str
    reasoning: str | None
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    index: int = 0
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    top_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    final_text: str | None = None

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


@dataclass
class TokenEvent:
    """One streamed token of sample ``index``: ``text_delta`` is new *answer* text and
    ``reasoning_delta`` new reasoning text (either may be empty while text is withheld: an
    incomplete character, a possible tag or stop string). The last event of a sample has
    ``finished`` True and its ``finish_reason``; an event that ends a sample without a token
    (cancelled, or ``max_new_tokens`` 0) has ``token_id`` None. ``logprob``: the token's;
    ``top_logprobs``: its top-N alternatives when the request asked (else None). When the tool
    loop appends a tool's output, an event with ``token_id`` None carries its ``tool_result``."""

    index: int
    token_id: int | None
    text_delta: str
    reasoning_delta: str
    finished: bool = False
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    tool_result: ToolResult | None = None


_END = object()   # sentinel closing a handle's event queue


class RequestHandle:
    """A submitted request: iterate its events (blocking), ``async for ev in handle.aiter()``,
    ``result()`` for the completions, ``cancel()`` to free its rows at the next step.

    ``streamed`` False (``Engine.generate``, which reads only the completions): no per-token events
    are queued, only the end (a queue put per token was ~3 us of a rollout's per-token work)."""

    def __init__(self, request_id: int, n: int, prompt_tokens: int, streamed: bool = True):
        self.request_id, self.n, self.prompt_tokens = request_id, n, prompt_tokens
        self.streamed = streamed
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._completions: list[Completion] | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._drained = False       # ready_events() has read the end of the queue
        self._waker = None          # set by aiter(): wakes the asyncio consumer from the engine thread
        self.prompt_logprobs: PromptLogprobs | None = None   # set before the first event when asked

    # -- producer side (the engine's scheduler)
    def _push(self, item) -> None:
        self._events.put(item)
        waker = self._waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:    # the consumer's event loop has closed: nobody is waiting
                pass

    def put(self, event: TokenEvent) -> None:
        """Queue one event for the client (thread-safe; wakes an ``aiter()`` consumer)."""
        if self.streamed:
            self._push(event)

    def finish(self, completions: list[Completion] | None, error: BaseException | None = None) -> None:
        """End the request: ``result()`` returns ``completions`` (or raises :class:`EngineError`
        with ``error``), and every reader of the events stops after the ones already queued."""
        self._completions, self._error = completions, error
        self._done.set()
        self._push(_END)

    # -- client side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        """Why the request failed (set by ``finish``), or None."""
        return self._error

    @property
    def drained(self) -> bool:
        """``ready_events()`` has read every event up to the end of the request."""
        return self._drained

    def ready_events(self) -> Iterator[TokenEvent]:
        """The events queued now, without waiting, for a caller that runs the engine's steps itself;
        stops when none is left. After the request's last event ``drained`` is True (check
        ``error``); later calls yield nothing."""
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return
            if item is _END:
                self._events.put(_END)          # other readers end at once too
                self._drained = True
                return
            yield item

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating; unfinished samples end with finish_reason "cancelled"."""
        self._cancelled = True

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Events as they come; ``timeout`` seconds without one raises ``TimeoutError``."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no event for {timeout} s") from None
            if item is _END:
                self._events.put(_END)          # later iterations end at once too
                if self._error is not None:
                    raise EngineError(f"request {self.request_id} failed: {self._error}") from self._error
                return
            yield item

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events()

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        """The events from asyncio, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._waker = lambda: loop.call_soon_threadsafe(wake.set)
        try:
            while True:
                wake.clear()
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    await wake.wait()
                    continue
                if item is _END:
                    self._events.put(_END)
                    if self._error is not None:
                        raise EngineError(f"request {self.request_id} failed: {self._error}") from self._error
                    return
                yield item
        finally:
            self._waker = None

    def result(self, timeout: float | None = None) -> list[Completion]:
        """The n completions, by sample index (blocks until the request is done)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not done after {timeout} s")
        if self._error is not None:
            raise EngineError(f"request {self.request_id} failed: {self._error}") from self._error
        return list(self._completions or [])


class Request:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 starts_in_think: bool, limit: int, tool_tokens: ToolTokens | None = None,
                 toolbox: Toolbox | None = None, streamed: bool = True):
        self.id, self.prompt, self.params = rid, prompt, params
        self.stop_ids, self.starts_in_think, self.limit = stop_ids, starts_in_think, limit
        self.tool_tokens = tool_tokens if params.tools != "off" else None
        self.toolbox = toolbox
        self.handle = RequestHandle(rid, params.n, len(prompt), streamed)
        self.samples: list[Sample] = []
        self.completions: list[Completion | None] = [None] * params.n


class Sample:
    """One of a request's n samples, living in one cache row."""

    _serials = itertools.count()

    def __init__(self, req: Request, index: int, row: int, tokenizer):
        self.serial = next(Sample._serials)   # identifies the sample in batch-composition keys
        self.req, self.index, self.row = req, index, row
        self.params = req.params
        self.rng = req.params.sample_rng(index)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs | None] = []
        self.pos = len(req.prompt)            # position of the pending (sampled, not yet fed) token
        self.pending = -1
        self.draft = -1                       # MTP draft for position pos + 1
        self.draft_q: torch.Tensor | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.text: list[str] = []
        # the tool loop (tool_loop.py): the open block's first index, a closed block's calls waiting
        # to run (tools="run": the row is paused), what ran, which tokens are the model's own
        self.model_mask: list[int] = []
        self.block_start: int | None = None
        self.awaiting: tuple[list[ToolCall], list[str]] | None = None
        self.future = None
        self.tool_calls: list[ToolCall] = []
        self.tool_results: list[ToolResult] = []
        self.final_from = 0                   # index into self.text where the final text starts
        self.tokenizer = tokenizer
        self.has_text = tokenizer is not None
        # text at the end, not per token: nobody reads this sample's events (Engine.generate) and no
        # per-token text can end it (no stop strings, no tool calls); see _final_text
        self.deferred = (self.has_text and not req.handle.streamed and not req.params.stop
                         and req.tool_tokens is None)
        if self.has_text:
            self.detok = IncrementalDetokenizer(tokenizer)
            # control tokens that add no text (SamplingParams.skip_special_tokens; streaming.py)
            self.skip = skipped_token_ids(tokenizer) if req.params.skip_special_tokens else frozenset()
            self.stops = StopStringFilter(req.params.stop)
            self.split = ReasoningSplitter(req.starts_in_think, req.params.split_reasoning,
                                           getattr(tokenizer, "think_tags", None))

    def _text(self, delta: str, final: bool) -> tuple[str, str, bool]:
        """Delta of decoded text -> (reasoning delta, answer delta, stop string matched)."""
        safe, matched = self.stops.push(delta)
        if final and not matched:
            safe += self.stops.flush()
        self.text.append(safe)
        r, a = self.split.push(safe)
        if final or matched:
            r2, a2 = self.split.flush()
            r, a = r + r2, a + a2
        return r, a, matched

    def append(self, token: int, logprob: float, top: TopLogprobs | None = None) -> TokenEvent:
        """Record a sampled token; decide whether the sample is finished; the event to stream."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.model_mask.append(1)
        if self.params.top_logprobs:
            self.top_logprobs.append(top)
        tt = self.req.tool_tokens
        if tt is not None and (self.block_start is not None or token == tt.calls_begin):
            return self._block_token(token, logprob, top, tt)
        r = a = ""
        if token in self.req.stop_ids:
            self.finished, self.finish_reason = True, "stop"
            self.stop_reason = "stop_token" if token in self.params.stop_token_ids else "eos"
            if self.has_text and not self.deferred:
                r, a, _ = self._text(self.detok.flush(), final=True)
        else:
            if repeats_too_long(self.token_ids, self.params.repetition_guard):
                self.finished, self.finish_reason, self.stop_reason = True, "stop", "repetition"
            elif len(self.token_ids) >= self.req.limit:
                self.finished, self.finish_reason = True, "length"
            if self.has_text and not self.deferred:
                delta = "" if token in self.skip else self.detok.push(token)
                if self.finished:
                    delta += self.detok.flush()
                r, a, matched = self._text(delta, final=self.finished)
                if matched:
                    self.finished, self.finish_reason, self.stop_reason = True, "stop", "stop_string"
        return TokenEvent(self.index, token, a, r, self.finished, self.finish_reason if self.finished else None,
                          logprob, top)

    def _block_token(self, token: int, logprob: float, top: TopLogprobs | None, tt: ToolTokens) -> TokenEvent:
        """A token of a tool-calls block: no text; the block's end stops the sample ("stop") or
        pauses it for the tool loop ("run"); a stop token or the length limit inside it ends it."""
        r = a = ""
        if self.block_start is None:
            self.block_start = len(self.token_ids) - 1
            if self.has_text:             # the text before the block, withheld characters included: a stop
                r, a, matched = self._text(self.detok.flush(), final=True)   # string or a think tag never
                if matched:                                                  # spans a tool call
                    self.block_start = None
                    self.finished, self.finish_reason, self.stop_reason = True, "stop", "stop_string"
                    return TokenEvent(self.index, token, a, r, True, "stop", logprob, top)
        if token == tt.calls_end:
            from .tool_loop import parse_block

            calls, problems = parse_block(self.tokenizer, self.token_ids[self.block_start:])
            self.block_start = None
            if self.params.tools == "stop":
                self.tool_calls = calls
                self.finished, self.finish_reason, self.stop_reason = True, "tool_calls", "tool_calls"
            else:
                self.awaiting = (calls, problems)
        elif token in self.req.stop_ids:
            self.finished, self.finish_reason = True, "stop"
            self.stop_reason = "stop_token" if token in self.params.stop_token_ids else "eos"
        if not self.finished and len(self.token_ids) >= self.req.limit:
            self.finished, self.finish_reason = True, "length"
        if self.finished and self.block_start is not None and self.params.tools == "stop":
            from .tool_loop import parse_block     # an unclosed block: its complete calls

            self.tool_calls = parse_block(self.tokenizer, self.token_ids[self.block_start:])[0]
        if self.finished and self.has_text:
            r2, a2, _ = self._text(self.detok.flush(), final=True)
            r, a = r + r2, a + a2
        return TokenEvent(self.index, token, a, r, self.finished, self.finish_reason if self.finished else None,
                          logprob, top)

    def add_tool_outputs(self, results: list[ToolResult], ids: list[int]) -> list[TokenEvent]:
        """Record what the tool loop appended after a block: ``ids`` (not the model's) and the
        results; the events that report them (token_id None). Outputs that do not fit are not
        appended (``ids`` empty, then :meth:`finish_length`): the results still say what ran."""
        self.tool_calls += [r.call for r in results]
        self.tool_results += results
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.model_mask += [0] * len(ids)
        if self.params.top_logprobs:
            self.top_logprobs += [None] * len(ids)
        self.final_from = len(self.text)
        return [TokenEvent(self.index, None, "", "", False, None, tool_result=r) for r in results]

    def _end(self, reason: str) -> TokenEvent:
        """End the sample without a token, releasing any withheld text."""
        self.finished, self.finish_reason = True, reason
        r = a = ""
        if self.has_text and not self.deferred:
            r, a, _ = self._text(self.detok.flush(), final=True)
        return TokenEvent(self.index, None, a, r, True, reason)

    def _final_text(self) -> None:
        """A deferred sample's text, once, at its end: the tokenizer's decoding of the tokens the
        streamed path would have pushed (all but skipped control tokens and a final stop token),
        split as the streamed path splits it. The streamed deltas are built to concatenate to this
        decoding (streaming.py); it is the reference where they cannot: the stream holds text that
        ends in U+FFFD (an incomplete character) and lets it out after ``MAX_PENDING_TOKENS``
        tokens, which can split a character the next token completes (after invalid UTF-8, or
        after literal U+FFFD characters), and a byte-fallback run's streamed characters stay
        characters where a later invalid byte makes the whole decoding U+FFFD; the decoding of the
        whole is the reference."""
        ids = self.token_ids[:-1] if self.stop_reason in ("eos", "stop_token") else self.token_ids
        text = self.tokenizer.decode([t for t in ids if t not in self.skip]) if ids else ""
        self.deferred = False
        self._text(text, final=True)

    def finish_length(self) -> TokenEvent:
        """End the sample for lack of room (tool outputs that do not fit)."""
        return self._end("length")

    def finish_empty(self) -> TokenEvent:
        """End a sample that may generate nothing (``max_new_tokens`` 0: the prompt is only scored)."""
        self.finished, self.finish_reason = True, "length"
        return TokenEvent(self.index, None, "", "", True, "length")

    def cancel(self) -> TokenEvent:
        return self._end("cancelled")

    def completion(self) -> Completion:
        if self.deferred:
            self._final_text()
        if self.has_text:
            text, reasoning, answer = "".join(self.text), self.split.reasoning_text, self.split.answer_text
        else:
            text, reasoning, answer = "", None, ""
        return Completion(token_ids=list(self.token_ids), text=text, reasoning=reasoning, answer=answer,
                          finish_reason=self.finish_reason or "length", prompt_tokens=len(self.req.prompt),
                          completion_tokens=len(self.token_ids), index=self.index,
                          logprobs=list(self.logprobs), stop_reason=self.stop_reason,
                          top_logprobs=list(self.top_logprobs), prompt_logprobs=self.req.handle.prompt_logprobs,
                          tool_calls=list(self.tool_calls), tool_results=list(self.tool_results),
                          model_mask=list(self.model_mask),
                          final_text="".join(self.text[self.final_from:]) if self.has_text else "")


__all__ = ["Completion", "TokenEvent", "RequestHandle", "EngineError", "Request", "Sample", "PromptLogprobs"]
