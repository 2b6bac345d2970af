"""The inference engine: batched generation over a preallocated latent KV cache.

One scheduler serves three entry points:

* ``generate(prompts, params)``: offline, all prompts at once, returns their completions;
* ``stream(prompt, params)``: one prompt, yields a :class:`TokenEvent` per generated token;
* ``submit(prompt, params) -> RequestHandle``: continuous batching for the server. A background
  thread (``start()`` / ``shutdown()``) repeats one *step*: admit waiting requests into free cache
  rows (one padded prefill for all of them), then ONE batched decode step over every active row.

``generate`` and ``stream`` run the same step loop in the caller's thread when the background
thread is not running, and go through ``submit`` when it is.

The cache (``model.new_cache``) has ``max_batch_size`` rows of ``max_seq_len + 1`` slots and is
never reallocated: for MLA a slot is the normalised KV latent plus the rotated rope key
(``kv_lora_rank + qk_rope_head_dim`` values per layer). A request with ``n`` samples takes ``n``
rows; its prompt is prefilled once into the first and copied to the others. Rows of different
lengths share a step: every row writes and attends at its own absolute positions, and the cache
masks slots beyond each query's position, so a freed row is reused without clearing.
DeepSeek-V4's cache (``model.v4.cache``) holds a sliding-window ring and compressor rings instead,
which padding would overwrite: a model that declares ``takes_valid`` gets the padded prefill's
mask ``valid`` [B, T] (False = padding, never cached), and ``mtp_input`` names the output its MTP
module continues from (V4: the hyper-connection ``streams``; default: ``hidden``).
Prefill uses the naive MLA path (large matmuls over the prompt), decoding the absorbed one
(attention directly over the cached latent). The model's mode is restored after every step, so a
model being trained (GRPO rollouts) can be passed in as is; so is a DeepSeek-V3.2 model's indexer
training stage (``set_dsa_stage``): the engine always decodes with top-k sparse attention and no
indexer loss, and puts back the stage it found.

Tool calls (``SamplingParams.tools``, ``tool_loop.py``): with "run" a sample that closes a
DeepSeek-V3.1 tool-calls block pauses while its calls run on worker threads, the other rows keep
decoding, and the tools' outputs are appended to its row in one forward (an *extend*: the absorbed
path over several new positions, as an MTP verify step runs two) before it rejoins the batch. With
"stop" the sample ends at the block. ``banned_token_ids`` are masked out of the logits.

With ``use_mtp`` every decode step is an MTP self-speculative step (``speculative.py``): it drafts
with the MTP module and verifies in the main model, for greedy and sampled rows alike.

With ``compile=True`` (opt-in) the plain decode forward runs through ``torch.compile`` (inductor;
on a CPU it needs a C++ compiler) with dynamic shapes, so a growing context or a changing number
of active rows does not recompile every step; the first steps pay the compilation (tens of
seconds; ``compile_seconds``). On a CPU a decode step is dominated by the number of small
operators, which the compiler fuses: the engine passes the step's ``cache_length`` (it knows every
row's position), so the forward is one graph, and on a CPU the graph's kernels are launched from
generated C++ (inductor's ``cpp_wrapper``) rather than Python; the MoE layers take a static-shape
path (:class:`~nanoseek.model.moe.Experts`: each token's chosen experts' matrices gathered), and
its linear layers multiply by k-major copies of their weights, which a CPU's BLAS runs faster for
a few rows (``nanoseek/model/kmajor.py``: one more copy of those weights in memory, made again at
the start of each decode run and followed within it where a change is visible). Prefill and MTP
steps stay eager. If compiling or running the compiled step fails, the engine warns once and
decodes eagerly from then on.

Logprobs are of the model's own distribution (float32 ``log_softmax`` of the raw logits, before
temperature / top-k / top-p, as vLLM reports them): each generated token's, from the logits it
was chosen from (the verifying main model's with MTP), and its top-N alternatives when the
request asks (``SamplingParams.top_logprobs``). ``prompt_logprobs`` scores the prompt inside the
prefill that runs it anyway: the final hidden states of the request's row go through ``lm_head``
a chunk of positions at a time (the full logits of the prompt are otherwise never computed), in
the engine's thread, so scoring is serialized with decoding. ``max_new_tokens=0`` only scores.

Per sample (``request.py``) the engine turns tokens into text (``streaming.py``: incremental
detokenisation, stop strings never leaked), splits ``<think>`` reasoning from the answer
(``reasoning.py``) and stops on EOS / stop tokens / stop strings / the repetition guard /
``max_new_tokens`` / the cache length.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .reasoning import prompt_ends_in_think
from nanoseek import limits
from nanoseek.model.kmajor import KMajorWeights
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.tools.format import ToolCall, ToolTokens
from nanoseek.tools.tool import ToolLimits, ToolResult
from nanoseek.train.compiled import failure_reason, recompile_limit_fails

from .request import Completion, EngineError, PromptLogprobs, Request, RequestHandle, Sample, TokenEvent
from .sampling import (RowParams, SamplingParams, TopLogprobs, argmax, choose_tokens, logprobs_and_top,
                       sample_from_probs)
from .speculative import SpeculativeStats, speculative_accept
from .tool_loop import ToolWorkers, appended_tokens, run_block

TOOL_WAIT_S = 0.02                  # how long an idle step waits for a running tool

DEFAULT_MAX_SEQ_LEN = 4096          # when the model allows more (the cache is preallocated)
DEFAULT_MAX_PREFILL_TOKENS = 8192   # padded prompt tokens per prefill forward
PROMPT_SCORE_CHUNK = 512            # prompt positions per lm_head call when scoring a prompt


class _StepSwitches:
    """The attention modules a step switches, found once per engine (three walks over every module at
    each step were ~5% of a GRPO rollout): MLA's naive / absorbed path (``model.absorb_modules()``:
    prefill naive, decode absorbed) and DeepSeek-V3.2's indexer stage (none while serving: sampling
    always sees the served model, not an indexer training stage). :meth:`serving` restores both."""

    def __init__(self, model):
        self.absorbing = list(model.absorb_modules())
        self.indexed = [m for m in model.modules() if hasattr(m, "dsa_stage")]

    def set_absorb(self, absorb: bool) -> None:
        for m in self.absorbing:
            m.absorb = absorb

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        absorb = [m.absorb for m in self.absorbing]
        stages = [m.dsa_stage for m in self.indexed]
        for m in self.indexed:
            m.dsa_stage = None
        try:
            yield
        finally:
            for m, a in zip(self.absorbing, absorb):
                m.absorb = a
            for m, stage in zip(self.indexed, stages):
                m.dsa_stage = stage


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0


class Engine:
    """Batched generation for a nanoseek causal LM, DeepSeek-V3 / V3.2 / V4 (see the module docstring).

    ``tokenizer`` is needed for text, stop strings and the reasoning split (token ids work
    without it). ``max_batch_size`` cache rows (a request uses ``n``), ``max_seq_len`` prompt +
    completion tokens per row (default: the model's max positions, at most 4096). ``use_mtp``
    turns on MTP self-speculative decoding (the model needs ``num_nextn_predict_layers >= 1``).
    ``dtype``: the KV cache dtype (default: the model's). ``max_prefill_tokens`` bounds the padded
    prompt tokens admitted into one prefill forward (more waiting requests wait a step).
    ``compile``: run decode steps through ``torch.compile`` (see the module docstring).
    Counters: ``stats`` (prefill / decode tokens and seconds), ``spec_stats`` (MTP acceptance),
    ``compile_seconds`` (time of the decode steps that compiled).
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 16, max_seq_len: int | None = None,
                 use_mtp: bool = False, dtype: torch.dtype | None = None,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS, compile: bool = False):
        cfg = model.config
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if use_mtp and cfg.num_nextn_predict_layers < 1:
            raise ValueError("use_mtp needs a model with MTP modules (config num_nextn_predict_layers >= 1); "
                             "this checkpoint has none")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.use_mtp = use_mtp
        # model capabilities (class attributes; DeepSeek-V4 declares both): whether the cached forward
        # takes ``valid`` (padding mask of a batched prefill), and which output MTP continues from
        self.takes_valid = bool(getattr(model, "takes_valid", False))
        self.mtp_input = getattr(model, "mtp_input", "hidden")
        # whether the cached forward gathers the cache's rows anyway (V4): then the compiled step always
        # passes them (one graph, not one for rows in order and one for the others)
        self.rows_gathered = bool(getattr(model, "rows_gathered", False))
        self.max_prefill_tokens = max_prefill_tokens
        self.compile = compile
        self.compile_seconds = 0.0
        self._compiled = None            # torch.compile(model.forward), built on the first decode step
        self._kmajor: KMajorWeights | None = None     # its k-major weight copies on a CPU
        self.device = next(model.parameters()).device
        self._switches = _StepSwitches(model)
        # one spare slot per row: a speculative step writes its draft one position ahead
        self.cache = model.new_cache(max_batch_size, self.max_seq_len + 1, dtype, with_mtp=use_mtp)
        if tokenizer is not None and getattr(tokenizer, "stop_ids", None):   # EOS + generation_config's
            self.eos_ids = {int(t) for t in tokenizer.stop_ids}
        elif tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            self.eos_ids = {int(tokenizer.eos_id)}
        else:
            eos = cfg.eos_token_id
            self.eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        self.pad_id = int(getattr(tokenizer, "pad_id", None) or 0)
        self.stats = EngineStats()
        self.spec_stats = SpeculativeStats()
        self._ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._active: list[Sample] = []
        self._free_rows = list(range(max_batch_size))
        self._rp_cache: tuple[tuple, RowParams] | None = None
        self._admitting: list[Request] = []
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_flag = False
        self.tool_tokens = ToolTokens.of(tokenizer) if tokenizer is not None else None
        self._tools = ToolWorkers()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 toolbox=None) -> list[list[Completion]]:
        """All prompts (token id lists) batched; returns each prompt's ``n`` completions.
        ``toolbox``: the tools a ``tools="run"`` request calls (:class:`nanoseek.tools.Toolbox`)."""
        params = params or SamplingParams()
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
            raise TypeError("generate() takes a list of prompts (lists of token ids); wrap a single prompt in a list")
        handles = [self._enqueue(p, params, which=f"prompt {i}", toolbox=toolbox, streamed=False)
                   for i, p in enumerate(prompts)]
        if not self.running:
            while not all(h.done for h in handles):
                self._step_guarded()
        return [h.result() for h in handles]

    def generate_each(self, requests: list[tuple[list[int], SamplingParams, Any]]) -> list[list[Completion]]:
        """:meth:`generate` of requests that differ in their settings: each (prompt ids,
        SamplingParams, Toolbox or None) keeps its own, and all of them share the batch (one
        scheduling loop, not one per kind of request: GRPO's rollouts mix prompts with and without
        tools). A sample's tokens depend only on its seed and its logits, so each request's
        completions equal those of generating it alone."""
        handles = [self._enqueue(p, params, which=f"request {i}", toolbox=toolbox, streamed=False)
                   for i, (p, params, toolbox) in enumerate(requests)]
        if not self.running:
            while not all(h.done for h in handles):
                self._step_guarded()
        return [h.result() for h in handles]

    def stream(self, prompt: list[int], params: SamplingParams | None = None, toolbox=None) -> Iterator[TokenEvent]:
        """Generate for one prompt, yielding each token's event as soon as it is sampled."""
        handle = self._enqueue(prompt, params or SamplingParams(), toolbox=toolbox)
        if self.running:
            yield from handle.events()
            return
        try:
            while True:
                yield from handle.ready_events()
                if handle.drained:
                    if handle.error is not None:
                        raise EngineError(f"request failed: {handle.error}") from handle.error
                    return
                self._step_guarded()
        finally:
            if not handle.done:                 # the consumer stopped early: free the rows
                handle.cancel()
                while not handle.done:
                    self._step_guarded()

    def submit(self, prompt: list[int], params: SamplingParams | None = None, toolbox=None) -> RequestHandle:
        """Queue a request for the background scheduler (started on first use); thread-safe."""
        handle = self._enqueue(prompt, params or SamplingParams(), toolbox=toolbox)
        self.start()
        return handle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the background scheduler thread (no-op when running)."""
        with self._cv:
            if self.running:
                return
            self._stop_flag = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()

    def shutdown(self, cancel_pending: bool = True) -> None:
        """Stop the scheduler thread; pending and active requests are cancelled."""
        with self._cv:
            self._stop_flag = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel_pending:
            with self._cv:
                for r in list(self._waiting) + [s.req for s in self._active]:
                    r.handle.cancel()
            while self._waiting or self._active:
                self._step_guarded()
        self._tools.shutdown()

    # ------------------------------------------------------------------ requests
    def _enqueue(self, prompt: list[int], params: SamplingParams, which: str = "prompt",
                 toolbox=None, streamed: bool = True) -> RequestHandle:
        params.validate()
        if params.tools != "off" and self.tool_tokens is None:
            raise ValueError(f"SamplingParams.tools = {params.tools!r}: "
                             + ("this Engine was built without a tokenizer" if self.tokenizer is None else
                                "the tokenizer has no tool-call tokens (<｜tool▁calls▁begin｜>...): "
                                "this model cannot call tools"))
        if params.tools == "run" and toolbox is None:
            raise ValueError("SamplingParams.tools = 'run' needs a toolbox (generate/stream/submit(..., toolbox=...))")
        if toolbox is not None and not (callable(getattr(toolbox, "run", None))
                                        and isinstance(getattr(toolbox, "limits", None), ToolLimits)):
            raise ValueError(f"toolbox: expected a nanoseek.tools.Toolbox (run(call) and ToolLimits limits), got "
                             f"{type(toolbox).__name__}")
        V0 = self.config.vocab_size
        if any(t >= V0 for t in params.banned_token_ids):
            raise ValueError(f"SamplingParams.banned_token_ids: an id is outside the vocabulary [0, {V0})")
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise TypeError(f"{which}: expected a list of token ids, got {type(prompt).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ValueError(f"{which} is empty (start it with BOS at least)")
        V = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"{which}: token id {bad[0]} is outside the vocabulary [0, {V})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"{which} has {len(prompt)} tokens; the engine's max_seq_len is {self.max_seq_len} "
                             "(prompt + completion); shorten it or build the Engine with a larger max_seq_len")
        if params.n > self.max_batch_size:
            raise ValueError(f"SamplingParams.n = {params.n} exceeds the engine's max_batch_size {self.max_batch_size}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this Engine was built without one")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        if params.starts_in_think is not None:
            in_think = params.starts_in_think
        else:
            in_think = (self.tokenizer is not None and params.split_reasoning
                        and prompt_ends_in_think(prompt, self.tokenizer))
        limit = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        req = Request(next(self._ids), prompt, params, stop_ids, in_think, limit, self.tool_tokens, toolbox,
                      streamed)
        with self._cv:
            self._waiting.append(req)
            self._cv.notify_all()
        return req.handle

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop_flag and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stop_flag:
                    return
            try:
                self._step_guarded()
            except Exception:   # already reported to the requests' handles; keep serving others
                pass

    def _step_guarded(self) -> None:
        with self._step_lock:
            try:
                self._step()
            except Exception as e:
                self._fail_all(e)
                raise

    def _fail_all(self, error: BaseException) -> None:
        reqs = {s.req.id: s.req for s in self._active}
        reqs.update((r.id, r) for r in self._admitting)
        self._admitting = []
        with self._cv:
            reqs.update((r.id, r) for r in self._waiting)
            self._waiting.clear()
        for r in reqs.values():
            r.handle.finish(None, error)
        self._active = []
        self._free_rows = list(range(self.max_batch_size))
        self._rp_cache = None

    def _step(self) -> None:
        """Cancel, admit + prefill, then one decode step over all active rows."""
        events: list[tuple[Sample, TokenEvent]] = []
        if self._kmajor is not None and not self._active:
            self._kmajor.forget()           # a decode run starts: the weights may have changed unseen
        for s in [s for s in self._active if s.req.handle.cancelled]:
            events.append((s, s.cancel()))
        admitted: list[Request] = []
        with self._cv:
            for r in [r for r in self._waiting if r.handle.cancelled]:   # never admitted: nothing generated
                self._waiting.remove(r)
                comps = []
                for i in range(r.params.n):
                    r.handle.put(TokenEvent(i, None, "", "", True, "cancelled"))
                    comps.append(Completion([], "", None, "", "cancelled", len(r.prompt), 0, index=i))
                r.handle.finish(comps)
            budget = self.max_prefill_tokens
            while self._waiting and len(self._free_rows) >= self._waiting[0].params.n:
                r = self._waiting[0]
                longest = max([len(x.prompt) for x in admitted] + [len(r.prompt)])
                if admitted and longest * (len(admitted) + 1) > budget:
                    break
                self._waiting.popleft()
                rows, self._free_rows = self._free_rows[:r.params.n], self._free_rows[r.params.n:]
                r.samples = [Sample(r, i, row, self.tokenizer) for i, row in enumerate(rows)]
                admitted.append(r)
        self._admitting = admitted           # failed with the step if its prefill raises
        model = self.model
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode(), self._switches.serving():
                resumed = [s for s in self._active if not s.finished and s.future is not None and s.future.done()]
                decoding = [s for s in self._active if not s.finished and s.awaiting is None]
                if admitted:
                    events += self._prefill(admitted)
                if resumed:
                    events += self._extend(resumed)
                if decoding:
                    events += self._decode_mtp(decoding) if self.use_mtp else self._decode(decoding)
        finally:
            if was_training:
                model.train()
        self._admitting = []
        self._start_tools()
        self._publish(events)
        if not admitted and not resumed and not decoding:
            self._wait_for_tools()

    def _publish(self, events: list[tuple[Sample, TokenEvent]]) -> None:
        for s, ev in events:
            s.req.handle.put(ev)
        finished = [s for s in self._active if s.finished]
        if finished:
            self._active = [s for s in self._active if not s.finished]
            self._free_rows = sorted(self._free_rows + [s.row for s in finished])
            for s in finished:
                req = s.req
                req.completions[s.index] = s.completion()
                if all(c is not None for c in req.completions):
                    req.handle.finish(list(req.completions))

    # ------------------------------------------------------------------ tool loop (tool_loop.py)
    def _start_tools(self) -> None:
        """Run the calls of every sample that just closed a block, on the worker threads."""
        for s in self._active:
            if s.awaiting is not None and s.future is None and not s.finished:
                calls, problems = s.awaiting
                s.future = self._tools.submit(run_block, s.req.toolbox, calls, problems, len(s.tool_calls))

    def _wait_for_tools(self) -> None:
        """Nothing to decode: wait a little for a running tool (never longer than TOOL_WAIT_S)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        running = [s.future for s in self._active if s.future is not None and not s.finished]
        if running:
            wait(running, timeout=TOOL_WAIT_S, return_when=FIRST_COMPLETED)

    def _extend(self, samples: list[Sample]) -> list[tuple[Sample, TokenEvent]]:
        """Append each sample's tool outputs to its row and sample the token after them."""
        events: list[tuple[Sample, TokenEvent]] = []
        dev, model = self.device, self.model
        eos = int(self.tokenizer.eos_id)          # the calling turn's end, as the chat template writes it
        for s in samples:
            results = self._tool_results(s)
            new = appended_tokens(self.tokenizer, self.tool_tokens, eos, results)
            if len(s.token_ids) + len(new) >= s.req.limit or s.pos + len(new) + 1 > self.max_seq_len:
                events += [(s, ev) for ev in s.add_tool_outputs(results, [])]   # what ran, nothing appended
                events.append((s, s.finish_length()))
                continue
            events += [(s, ev) for ev in s.add_tool_outputs(results, new)]
            t0 = time.perf_counter()
            ids = torch.tensor([[s.pending] + new], device=dev)
            pos = (s.pos + torch.arange(len(new) + 1, device=dev))[None]
            rows = torch.tensor([s.row], device=dev)
            self._switches.set_absorb(True)
            out = model(ids, positions=pos, cache=self.cache, rows=rows, return_hidden=self.use_mtp)
            logits = self._ban(out.logits[:, -1], [s])
            rp = RowParams.build([s.params], dev)
            tok = choose_tokens(logits, rp, self._uniforms([s], rp))
            lps, tops = logprobs_and_top(logits, tok, [s.params.top_logprobs])
            if self.use_mtp:   # MTP cache over the appended positions, then the first draft
                prev = getattr(out, self.mtp_input)
                model.mtp_forward(0, prev[:, :-1], ids[:, 1:], pos[:, :-1], self.cache, rows)
                _, mtp_logits = model.mtp_forward(0, prev[:, -1:], tok[:, None], pos[:, -1:], self.cache, rows)
                self._set_drafts([s], mtp_logits[:, 0], rp)
            s.pending, s.pos = int(tok[0]), s.pos + len(new) + 1
            events.append((s, s.append(int(tok[0]), lps[0], tops[0])))
            self.stats.prefill_tokens += len(new) + 1
            self.stats.prefill_seconds += time.perf_counter() - t0
        return events

    @staticmethod
    def _tool_results(s: Sample) -> list[ToolResult]:
        """A paused sample's results; a toolbox that raised (run_block never does with a sound one) or a
        future cancelled at shutdown fails only this sample's calls, as outputs the model reads."""
        calls = s.awaiting[0] if s.awaiting is not None else []
        try:
            results = s.future.result()
        except Exception as e:  # noqa: BLE001 - e.g. a Toolbox subclass whose run() raises
            why = f"error: the tool runner failed ({type(e).__name__}: {str(e)[:200]})"
            results = [ToolResult(c, why, False) for c in calls] or [ToolResult(ToolCall("", ""), why, False)]
        s.future, s.awaiting = None, None
        return results

    def _ban(self, logits: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
        """Logits [B, ...V] with each row's ``banned_token_ids`` at -inf (a copy only when any)."""
        if not any(s.params.banned_token_ids for s in samples):
            return logits
        logits = logits.clone()
        for i, s in enumerate(samples):
            if s.params.banned_token_ids:
                logits[i, ..., s.params.banned_token_ids] = float("-inf")
        return logits

    def _row_params(self, samples: list[Sample]) -> RowParams:
        key = tuple(s.serial for s in samples)
        if self._rp_cache is None or self._rp_cache[0] != key:
            self._rp_cache = (key, RowParams.build([s.params for s in samples], self.device))
        return self._rp_cache[1]

    def _uniforms(self, samples: list[Sample], rp: RowParams, k: int = 0) -> torch.Tensor | None:
        """One uniform per row from the row's own stream ([B]), or k per row ([B, k])."""
        if rp.all_greedy:
            return None
        if k:
            u = [[s.rng.random() for _ in range(k)] for s in samples]
        else:
            u = [s.rng.random() for s in samples]
        return torch.tensor(u, dtype=torch.float32, device=self.device)

    def _rows(self, rows: list[int]) -> torch.Tensor | None:
        """Cache rows of a batch; None (read the cache as a view) when they are 0..B-1 in order."""
        if rows == list(range(len(rows))):
            return None
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, reqs: list[Request]) -> list[tuple[Sample, TokenEvent]]:
        t0 = time.perf_counter()
        dev, model = self.device, self.model
        lens = [len(r.prompt) for r in reqs]
        T = max(lens)
        ids = torch.tensor([r.prompt + [self.pad_id] * (T - len(r.prompt)) for r in reqs], device=dev)
        pos = torch.arange(T, device=dev).expand(len(reqs), T)
        first_rows = [r.samples[0].row for r in reqs]
        rows = torch.tensor(first_rows, device=dev)
        self._switches.set_absorb(False)
        last = torch.tensor(lens, device=dev) - 1
        pad = {}
        if self.takes_valid and min(lens) < T:     # padding must not enter the rings of shorter rows
            valid = torch.arange(T, device=dev)[None] <= last[:, None]
            pad, mtp_pad = {"valid": valid}, {"valid": valid[:, 1:]}
        out = model(ids, positions=pos, cache=self.cache, rows=rows, logits_to_keep=1, return_hidden=True, **pad)
        arange = torch.arange(len(reqs), device=dev)
        h_last = out.hidden[arange, last]                                          # [R, d]
        logits = model.lm_head(h_last)                                             # [R, V]
        prev = getattr(out, self.mtp_input)                                        # MTP's input state
        if self.use_mtp and T > 1:   # MTP cache at positions 0..T-2: inputs (h_i, t_{i+1})
            model.mtp_forward(0, prev[:, :-1], ids[:, 1:], pos[:, :-1], self.cache, rows, **(pad and mtp_pad))
        src = [r.samples[0].row for r in reqs for _ in r.samples[1:]]
        dst = [s.row for r in reqs for s in r.samples[1:]]
        if dst:
            self.cache.copy_rows(src, dst, T)
        samples = [s for r in reqs for s in r.samples]
        owner = torch.tensor([i for i, r in enumerate(reqs) for _ in r.samples], device=dev)
        logits = self._ban(logits[owner], samples)                                 # [S, V]
        rp = RowParams.build([s.params for s in samples], dev)
        tokens = choose_tokens(logits, rp, self._uniforms(samples, rp))
        lps, tops = logprobs_and_top(logits, tokens, [s.params.top_logprobs for s in samples])
        for i, r in enumerate(reqs):   # before any event of the request is published
            if r.params.prompt_logprobs is not None:
                r.handle.prompt_logprobs = self._score_prompt(out.hidden[i, :lens[i]], r.prompt,
                                                              r.params.prompt_logprobs)
        if self.use_mtp:   # first drafts: MTP at the last prompt position with each sample's token
            p_last = (last[owner])[:, None]
            s_rows = torch.tensor([s.row for s in samples], device=dev)
            _, mtp_logits = model.mtp_forward(0, prev[arange, last][owner][:, None], tokens[:, None], p_last,
                                              self.cache, s_rows)
            self._set_drafts(samples, mtp_logits[:, 0], rp)
        self.stats.prefill_tokens += sum(lens)
        self.stats.prefill_seconds += time.perf_counter() - t0
        events = []
        for s, tok, lp, top in zip(samples, tokens.tolist(), lps, tops):
            self._active.append(s)
            if s.req.limit == 0:       # max_new_tokens 0: the prompt was only scored
                events.append((s, s.finish_empty()))
                continue
            s.pending = tok
            events.append((s, s.append(tok, lp, top)))
        self._active.sort(key=lambda s: s.row)
        return events

    def _score_prompt(self, hidden: torch.Tensor, prompt: list[int], k: int) -> PromptLogprobs:
        """A prompt's logprobs from its prefill's final hidden states [T, d] (see the module docstring)."""
        lps: list[float | None] = [None]
        tops: list[TopLogprobs | None] = [None]
        targets = torch.tensor(prompt[1:], device=hidden.device)
        for a in range(0, len(prompt) - 1, PROMPT_SCORE_CHUNK):
            t = targets[a:a + PROMPT_SCORE_CHUNK]                                  # tokens a+1 .. a+len(t)
            logits = self.model.lm_head(hidden[a:a + len(t)])                     # predicted at a .. a+len(t)-1
            chosen, top = logprobs_and_top(logits, t, [k] * len(t))
            lps += chosen
            tops += top
        return PromptLogprobs(list(prompt), lps, tops)

    def _set_drafts(self, samples: list[Sample], mtp_logits: torch.Tensor, rp: RowParams) -> None:
        """Draft each row's next token from the MTP logits: argmax for greedy rows (their draft
        distribution q is one-hot, stored as None), a sample from q otherwise (q kept for verifying)."""
        mtp_logits = self._ban(mtp_logits, samples)
        if rp.all_greedy:
            for s, d in zip(samples, argmax(mtp_logits).tolist()):
                s.draft, s.draft_q = d, None
            return
        q = rp.probs(mtp_logits)
        drafts = sample_from_probs(q, self._uniforms(samples, rp)).tolist()
        for i, s in enumerate(samples):
            s.draft, s.draft_q = drafts[i], q[i]

    # ------------------------------------------------------------------ decode
    def _decode(self, samples: list[Sample]) -> list[tuple[Sample, TokenEvent]]:
        t0 = time.perf_counter()
        dev = self.device
        ids = torch.tensor([[s.pending] for s in samples], device=dev)
        pos = torch.tensor([[s.pos] for s in samples], device=dev)
        rows = self._rows([s.row for s in samples])
        self._switches.set_absorb(True)
        logits = self._ban(self._decode_forward(ids, pos, rows, max(s.pos for s in samples) + 1), samples)
        rp = self._row_params(samples)
        tokens = choose_tokens(logits, rp, self._uniforms(samples, rp))
        lps, tops = logprobs_and_top(logits, tokens, [s.params.top_logprobs for s in samples])
        events = []
        for s, tok, lp, top in zip(samples, tokens.tolist(), lps, tops):
            s.pending, s.pos = tok, s.pos + 1
            events.append((s, s.append(tok, lp, top)))
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(samples)
        self.stats.decode_seconds += time.perf_counter() - t0
        return events

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None,
                        length: int) -> torch.Tensor:
        """The model's decode forward -> last-position logits [B, V]; compiled when ``compile`` is on.
        ``length``: max(pos) + 1, known here, so the forward reads nothing back from its tensors."""
        if self.compile:
            try:
                return self._compiled_forward(ids, pos, rows, length)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, never fail the request
                warnings.warn(f"Engine(compile=True): the compiled decode step failed ({failure_reason(e)}); "
                              "decoding eagerly from now on", RuntimeWarning, stacklevel=2)
                self.compile = False
        return self.model(ids, positions=pos, cache=self.cache, rows=rows, cache_length=length).logits[:, -1]

    def _compiled_forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None,
                          length: int) -> torch.Tensor:
        import torch._dynamo

        if rows is None and self.rows_gathered:
            rows = torch.arange(ids.shape[0], device=ids.device)
        if self._compiled is None:
            for m in self.model.modules():      # rotary tables for every position the cache holds
                if isinstance(m, RotaryEmbedding):
                    m.reserve(self.cache.max_len, self.device)
            # cpp_wrapper: on a CPU the graph's kernels are called from generated C++, not Python
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self._compiled = torch.compile(self.model.forward, dynamic=True, options=options)
            self._kmajor = self._kmajor_weights()
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        # k-major copies at every batch size (README, Performance: batch 1 1.08-1.28x on an AMD EPYC, 0.97x on
        # an Intel Xeon with AMX; batch 4-64 1.0-1.04x with the experts gathered)
        layout = self._kmajor.installed() if self._kmajor is not None else contextlib.nullcontext()
        # past dynamo's limit: fall back visibly, not silently. Python floats (the model's eps and scales)
        # as constants: left dynamic, dynamo traced the forward twice (it tensorifies them, fails on some
        # and restarts): 35 of 191 s compiling a DeepSeek-V4 graph, 6 of 35 s for bench-moe
        with recompile_limit_fails(specialize_float=True), layout:
            logits = self._compiled(ids, positions=pos, cache=self.cache, rows=rows, cache_length=length).logits[:, -1]
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != frames:   # this call compiled
            self.compile_seconds += time.perf_counter() - t0
        return logits

    def _kmajor_weights(self) -> KMajorWeights | None:
        """The k-major weight copies for the compiled decode on a CPU (``nanoseek/model/kmajor.py``),
        or None: on other devices, and where one more copy of the weights would take more than half
        of the memory available (said once)."""
        if self.device.type != "cpu":
            return None
        layout = KMajorWeights(self.model)
        free = limits.available_memory_bytes("cpu")
        if free is not None and layout.nbytes > free // 2:
            warnings.warn(f"Engine(compile=True): no k-major copy of the weights for the compiled decode "
                          f"({layout.nbytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB of memory available); "
                          "decoding with the model's layout", RuntimeWarning, stacklevel=3)
            return None
        return layout

    def _decode_mtp(self, samples: list[Sample]) -> list[tuple[Sample, TokenEvent]]:
        """One speculative step: verify each row's MTP draft, emit 1 or 2 tokens, draft again."""
        t0 = time.perf_counter()
        dev, model = self.device, self.model
        B = len(samples)
        ids = torch.tensor([[s.pending, s.draft] for s in samples], device=dev)
        pos = torch.tensor([[s.pos, s.pos + 1] for s in samples], device=dev)
        rows = self._rows([s.row for s in samples])
        self._switches.set_absorb(True)
        out = model(ids, positions=pos, cache=self.cache, rows=rows, return_hidden=True)
        logits = self._ban(out.logits, samples)                                    # [B, 2, V]
        rp = self._row_params(samples)
        draft = ids[:, 1]
        if rp.all_greedy:        # one-hot p and q: speculative_accept reduces to comparing argmaxes
            tok0, bonus = argmax(logits[:, 0]), argmax(logits[:, 1])
            accepted = tok0 == draft
        else:
            p = rp.probs(logits)                                                   # [B, 2, V]
            V = logits.shape[-1]
            q = torch.stack([s.draft_q if s.draft_q is not None
                             else torch.nn.functional.one_hot(torch.tensor(s.draft, device=dev), V).float()
                             for s in samples])
            u = self._uniforms(samples, rp, k=3)                                   # accept, resample, bonus
            tok0, accepted = speculative_accept(p[:, 0], q, draft, u[:, 0], u[:, 1])
            bonus = sample_from_probs(p[:, 1], u[:, 2])
        ks = [s.params.top_logprobs for s in samples]
        (lp0, top0), (lp1, top1) = logprobs_and_top(logits[:, 0], tok0, ks), logprobs_and_top(logits[:, 1], bonus, ks)
        # MTP at [p, p+1] with (h_p, tok0) and (h_{p+1}, bonus); the draft comes from the last real one
        _, mtp_logits = model.mtp_forward(0, getattr(out, self.mtp_input), torch.stack([tok0, bonus], dim=1), pos,
                                          self.cache, rows)
        pick = accepted.long()
        self._set_drafts(samples, mtp_logits[torch.arange(B, device=dev), pick], rp)
        events = []
        acc_list = accepted.tolist()
        emitted = 0
        rows_out = zip(samples, tok0.tolist(), bonus.tolist(), lp0, lp1, top0, top1, acc_list)
        for s, first, second, lp_first, lp_second, top_first, top_second, acc in rows_out:
            events.append((s, s.append(first, lp_first, top_first)))
            emitted += 1
            acc = acc and s.awaiting is None      # a closed tool block pauses the row at its last token
            if acc and not s.finished:
                events.append((s, s.append(second, lp_second, top_second)))
                emitted += 1
            s.pending, s.pos = (second, s.pos + 2) if acc else (first, s.pos + 1)
        self.spec_stats.steps += B
        self.spec_stats.drafted += B
        self.spec_stats.accepted += sum(acc_list)
        self.spec_stats.emitted += emitted
        self.stats.decode_steps += 1
        self.stats.decode_tokens += emitted
        self.stats.decode_seconds += time.perf_counter() - t0
        return events


__all__ = ["Engine", "EngineStats", "SamplingParams", "Completion", "TokenEvent", "RequestHandle", "EngineError",
           "PromptLogprobs"]
