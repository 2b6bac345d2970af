"""Test support for the server tests: a deterministic fake engine and a background uvicorn server.

:func:`make_test_tokenizer` trains a tiny tokenizer in milliseconds; :func:`make_tiny_run` saves
a random ``tiny`` model with it as a run folder, for tests of the real engine behind the server.
:func:`background_server`
runs an ASGI app with uvicorn on 127.0.0.1 and a free port in a daemon thread, for tests that
talk real HTTP (the ``openai`` client, disconnects, a browser).

:class:`FakeEngine` is a deterministic stand-in for :class:`nanoseek.infer.engine.Engine`. It
has the engine's public interface (``submit`` returning the engine's own
:class:`~nanoseek.infer.request.RequestHandle`, which it drives through the handle's public
producer side, ``put`` and ``finish``, exactly as the engine does; ``generate``; ``stream``;
``start``/``shutdown``)
and the same scheduling shape: a background thread runs decode *steps*, each advancing every
live row of every admitted request by one token (continuous batching, up to
``max_batch_size`` rows), and records ``max_active_rows`` so tests can check that concurrent
requests shared steps. Instead of a model it "answers" with text whose content the tests can
predict:

    <think>\\nThe prompt has N tokens; I will write the message backwards.\\n</think>\\n\\n
    {reversed message}[ word]<EOS>

where the message is the last user turn of a chat prompt (or the whole prompt for a raw
completion) and ``word`` is drawn from a seeded RNG when ``temperature > 0`` (so ``seed`` and
``n`` have observable effects). ``step_delay`` seconds pass between steps, so streams can be
watched and cancelled mid-way.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from nanoseek.data.tokenizer import ASSISTANT, USER, Tokenizer
from nanoseek.infer.request import Completion, RequestHandle, TokenEvent
from nanoseek.infer.sampling import SamplingParams

WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper",
         "kelp", "lagoon", "meadow", "nectar", "onyx", "pebble", "quartz", "river", "saffron", "tundra")


def make_tiny_run(run_dir: str | Path, tokenizer: Tokenizer, seed: int = 0, max_position_embeddings: int = 256) -> Path:
    """A run folder ``run_dir/final`` holding a random ``tiny`` DeepSeek-V3 (MLA, MoE, MTP) and ``tokenizer``."""
    import torch

    from nanoseek.model.checkpoint import save_pretrained
    from nanoseek.model.config import load_model_config
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    config = load_model_config("tiny").replace(vocab_size=tokenizer.vocab_size,
                                               max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    final = save_pretrained(DeepseekV3ForCausalLM(config).eval(), Path(run_dir) / "final")
    tokenizer.save(final)
    return Path(run_dir)


def make_test_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A small byte-level BPE tokenizer with DeepSeek's special tokens (trains in milliseconds)."""
    corpus = ["Hello world! How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog.",
              "Reasoning: the prompt has tokens; write the message backwards. 0123456789 + - * / = ?"] * 20
    return Tokenizer.train(corpus, vocab_size=vocab_size)


class _Row:
    """One sample (index among n): its planned tokens with their text/reasoning deltas."""

    def __init__(self, index: int, plan: list[tuple[int, str, str]]):
        self.index, self.plan, self.pos = index, plan, 0
        self.answer = ""
        self.finished = False
        self.events: list[TokenEvent] = []    # every event sent for this sample, for its Completion


class _Job:
    """One submitted request: the engine's handle for it, its prompt, parameters and rows."""

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams, rows: list[_Row]):
        self.handle, self.prompt, self.params, self.rows = handle, prompt, params, rows

    def send(self, row: _Row, event: TokenEvent) -> None:
        row.events.append(event)
        self.handle.put(event)

    def finish(self, engine: FakeEngine) -> None:
        self.handle.finish([engine._completion(self.prompt, r.events) for r in self.rows])


class FakeEngine:
    """Continuous-batching scheduler over scripted rows; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, max_batch_size: int = 16, max_seq_len: int = 1024,
                 step_delay: float = 0.002):
        self.tokenizer, self.max_batch_size, self.max_seq_len = tokenizer, max_batch_size, max_seq_len
        self.step_delay = step_delay
        self.max_active_rows = 0   # instrumentation: the most rows decoded in one step
        self.steps = 0
        self._ids = itertools.count()
        self._pending: list[_Job] = []
        self._active: list[_Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeEngine:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def num_active_requests(self) -> int:
        """Requests submitted and not yet finished or cancelled (waiting or decoding)."""
        with self._lock:
            return len(self._pending) + len(self._active)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], params: SamplingParams, toolbox=None) -> RequestHandle:
        if params.tools == "run":
            raise ValueError("FakeEngine does not run tools (use ScriptedEngine or the real engine)")
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.max_batch_size}")
        handle = RequestHandle(next(self._ids), params.n, len(prompt))
        rows = [_Row(i, self._plan(prompt, params, i)) for i in range(params.n)]
        with self._lock:
            self._pending.append(_Job(handle, list(prompt), params, rows))
        self._wake.set()
        return handle

    def stream(self, prompt: list[int], params: SamplingParams, toolbox=None) -> Iterator[TokenEvent]:
        yield from self.submit(prompt, params, toolbox)

    def generate(self, prompts: list[list[int]], params: SamplingParams, toolbox=None) -> list[list[Completion]]:
        handles = [self.submit(p, params, toolbox) for p in prompts]
        return [handle.result() for handle in handles]

    def _completion(self, prompt: list[int], evs: list[TokenEvent]) -> Completion:
        ids = [e.token_id for e in evs if e.token_id is not None]   # a cancellation event has no token
        reasoning = "".join(e.reasoning_delta for e in evs)
        answer = "".join(e.text_delta for e in evs)
        return Completion(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True), reasoning=reasoning,
                          answer=answer, finish_reason=evs[-1].finish_reason if evs else "length",
                          prompt_tokens=len(prompt), completion_tokens=len(ids))

    # ------------------------------------------------------------------ the script
    def _deltas(self, text: str) -> list[tuple[int, str]]:
        """Tokens of ``text`` with the text each adds (incremental decode, holding back partial UTF-8)."""
        ids = self.tokenizer.encode(text)
        out, shown = [], ""
        for i in range(len(ids)):
            now = self.tokenizer.decode(ids[: i + 1])
            if now.endswith("\ufffd") and i + 1 < len(ids):
                out.append((ids[i], ""))
                continue
            out.append((ids[i], now[len(shown):]))
            shown = now
        return out

    def _plan(self, prompt: list[int], params: SamplingParams, index: int) -> list[tuple[int, str, str]]:
        tk = self.tokenizer
        full = tk.decode(prompt)
        if USER in full:
            message = full.rsplit(USER, 1)[1].split(ASSISTANT, 1)[0]
        else:
            message = tk.decode(prompt, skip_special_tokens=True)
        answer = message[::-1]
        if params.temperature > 0:
            rng = random.Random(f"{params.seed}-{index}") if params.seed is not None else random.Random()
            answer += " " + rng.choice(WORDS)
        reasoning = f"The prompt has {len(prompt)} tokens; I will write the message backwards."
        if not params.split_reasoning:  # raw text: every token's text is answer text, tags included
            raw = f"\n{reasoning}\n{tk.decode([tk.end_think_id])}\n\n{answer}"
            return [(tk.think_id, "", tk.decode([tk.think_id]))] + [(t, "", d) for t, d in self._deltas(raw)] \
                + [(tk.eos_id, "", "")]
        plan = [(tk.think_id, "", "")] + [(t, "", "") for t, _ in self._deltas("\n")]
        plan += [(t, d, "") for t, d in self._deltas(reasoning)]
        plan += [(t, "", "") for t, _ in self._deltas("\n")] + [(tk.end_think_id, "", "")]
        plan += [(t, "", "") for t, _ in self._deltas("\n\n")]
        plan += [(t, "", d) for t, d in self._deltas(answer)] + [(tk.eos_id, "", "")]
        return plan

    # ------------------------------------------------------------------ the scheduler
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                rows = sum(sum(not r.finished for r in job.rows) for job in self._active)
                while self._pending and (not self._active or rows + len(self._pending[0].rows) <= self.max_batch_size):
                    job = self._pending.pop(0)
                    self._active.append(job)
                    rows += len(job.rows)
                active = list(self._active)
            if not active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.max_active_rows = max(self.max_active_rows, rows)
            self.steps += 1
            done = []
            for job in active:
                if job.handle.cancelled:  # like the engine: unfinished samples end "cancelled", without a token
                    for r in job.rows:
                        if not r.finished:
                            r.finished = True
                            job.send(r, TokenEvent(r.index, None, "", "", True, "cancelled"))
                if all(r.finished for r in job.rows):
                    done.append(job)
                    continue
                for r in job.rows:
                    if not r.finished:
                        job.send(r, self._step(job, r))
                if all(r.finished for r in job.rows):
                    done.append(job)
            with self._lock:
                self._active = [job for job in self._active if job not in done]
            for job in done:
                job.finish(self)
            time.sleep(self.step_delay)
        with self._lock:  # shutting down: end every open stream
            leftover = self._active + self._pending
            self._active, self._pending = [], []
        for job in leftover:
            job.finish(self)

    def _step(self, job: _Job, row: _Row) -> TokenEvent:
        p = job.params
        token, reasoning, text = row.plan[min(row.pos, len(row.plan) - 1)]  # ignore_eos: EOS again and again
        row.pos += 1
        finish = None
        if (token == self.tokenizer.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"
        row.answer += text
        hits = [row.answer.find(s) for s in p.stop if s in row.answer]
        if hits and finish is None:
            cut = min(hits)
            text = text[: max(0, len(text) - (len(row.answer) - cut))]
            finish = "stop"
        if finish is None and (row.pos >= p.max_new_tokens or len(job.prompt) + row.pos >= self.max_seq_len):
            finish = "length"
        row.finished = finish is not None
        return TokenEvent(index=row.index, token_id=token, text_delta=text, reasoning_delta=reasoning,
                          finished=row.finished, finish_reason=finish)


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yields its base URL (``http://host:port``)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


# ---------------------------------------------------------------------------- tool calls
def make_tool_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """:func:`make_test_tokenizer`: a newly trained nanoseek vocabulary carries DeepSeek-V3.1's seven
    tool tokens (ids 7..13) and its template renders ``tools``, ``tool_calls`` and ``tool`` messages."""
    from nanoseek.tools.format import ToolTokens

    tk = make_test_tokenizer(vocab_size)
    assert ToolTokens.of(tk) is not None
    return tk


class ScriptedEngine:
    """An engine stand-in whose "model" writes ``script(text_so_far, params, index)`` (control-token
    strings included, e.g. a tool-calls block), through the real engine's per-token pipeline
    (:class:`nanoseek.infer.request.Sample`: stop tokens, the length limit, detokenisation, stop
    strings, the reasoning split, the tool-call block of ``tools="stop"``/``"run"``) and, for
    ``tools="run"``, the real tool loop's functions (``nanoseek.infer.tool_loop``: the toolbox runs
    the calls, the outputs are appended, then the script is asked again with the text so far, tool
    outputs included). So the events are the ones the engine would send. A token in
    ``params.banned_token_ids`` is one the model cannot write: the script ends there (EOS).
    ``prompts`` and ``params`` record every submission."""

    def __init__(self, tokenizer: Tokenizer, script, max_batch_size: int = 16, max_seq_len: int = 1024,
                 step_delay: float = 0.0):
        self.tokenizer, self.script = tokenizer, script
        self.max_batch_size, self.max_seq_len, self.step_delay = max_batch_size, max_seq_len, step_delay
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self._ids = itertools.count()

    def start(self) -> ScriptedEngine:
        return self

    def shutdown(self) -> None:
        pass

    def _plan(self, ids: list[int], params: SamplingParams, index: int) -> list[int]:
        tk = self.tokenizer
        out = tk.encode(self.script(tk.decode(ids), params, index))
        banned = set(params.banned_token_ids)
        cut = next((j for j, t in enumerate(out) if t in banned), None)
        return (out if cut is None else out[:cut]) + [tk.eos_id]

    def stream(self, prompt: list[int], params: SamplingParams, toolbox=None) -> Iterator[TokenEvent]:
        yield from self.submit(prompt, params, toolbox)

    def submit(self, prompt: list[int], params: SamplingParams, toolbox=None) -> RequestHandle:
        from nanoseek.infer.reasoning import prompt_ends_in_think
        from nanoseek.infer.request import Request, Sample
        from nanoseek.infer.tool_loop import appended_tokens, run_block
        from nanoseek.tools.format import ToolTokens

        params.validate()
        tk = self.tokenizer
        tokens = ToolTokens.of(tk)
        if params.tools != "off" and tokens is None:
            raise ValueError("the tokenizer has no tool-call tokens")
        if params.tools == "run" and toolbox is None:
            raise ValueError("tools='run' needs a toolbox")
        self.prompts.append(list(prompt))
        self.params.append(params)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {tk.eos_id})
        in_think = params.split_reasoning and prompt_ends_in_think(prompt, tk)
        limit = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        req = Request(next(self._ids), list(prompt), params, stop_ids, in_think, limit, tokens, toolbox)
        samples = [Sample(req, i, i, tk) for i in range(params.n)]
        plans = [self._plan(prompt, params, i) for i in range(params.n)]

        def step(i: int, s: Sample) -> None:
            if not plans[i]:
                plans[i] = [tk.eos_id]
            req.handle.put(s.append(plans[i].pop(0), 0.0))
            if s.awaiting is not None and not s.finished:        # the tool loop, as the engine runs it
                calls, problems = s.awaiting
                s.awaiting = None
                results = run_block(toolbox, calls, problems, len(s.tool_calls))
                ids = appended_tokens(tk, tokens, tk.eos_id, results)
                if len(s.token_ids) + len(ids) >= req.limit:         # no room: what ran, nothing appended
                    for ev in s.add_tool_outputs(results, []):
                        req.handle.put(ev)
                    req.handle.put(s.finish_length())
                    return
                for ev in s.add_tool_outputs(results, ids):
                    req.handle.put(ev)
                plans[i] = self._plan(list(prompt) + s.token_ids, params, i)

        def run() -> None:
            while not all(s.finished for s in samples):
                for i, s in enumerate(samples):
                    if s.finished:
                        continue
                    if req.handle.cancelled:
                        req.handle.put(s.cancel())
                    else:
                        step(i, s)
                time.sleep(self.step_delay)
            req.handle.finish([s.completion() for s in samples])

        threading.Thread(target=run, daemon=True, name="scripted-engine").start()
        return req.handle
