"""Sampling parameters and the batched, per-row-seeded token sampler of the inference engine.

One decode step turns logits ``[B, V]`` into one token per row, each row with its own
temperature, top-k, top-p and random stream (rows of one batch belong to different requests):

1. ``processed_probs``: temperature, then top-k, then top-p (nucleus) on the renormalised
   top-k distribution (the order of HF's logits warpers), then renormalise. A row with a
   temperature below :data:`GREEDY_BELOW` (0 among them) is greedy: its distribution is one-hot
   on the argmax, so greedy and sampled rows share one code path, speculative verification
   included (``speculative.py``).
2. ``sample_from_probs``: inverse-CDF sampling, ``token = min{j : cumsum(p)_j > u * sum(p)}``,
   with one uniform ``u`` per row drawn by that row's own :class:`random.Random`. A sample's
   tokens therefore depend only on its seed and its logits, never on which other requests
   happen to share the batch, and the same seed gives the same output.

Logprobs (:func:`logprobs_and_top`) are always of the model's own distribution: float32
``log_softmax`` of the raw logits, before temperature, top-k and top-p (vLLM's default), so
they score the text whatever the request sampled with. The chosen token's is always recorded;
the top-N alternatives (N <= :data:`MAX_LOGPROBS`) only when a request asks.

Stop conditions that are checked per token live here too: :func:`repeats_too_long` is the
repetition guard (see :class:`SamplingParams`). Stop *strings* need text and are handled by
``streaming.StopStringFilter``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from nanoseek.limits import TEMPERATURE_MAX

MAX_LOGPROBS = 20   # most alternatives per position (top_logprobs, prompt_logprobs), as vLLM's default


TOOL_MODES = ("off", "stop", "run")    # SamplingParams.tools

# Temperatures below this are greedy decoding, 0 among them (vLLM's rule, its _SAMPLING_EPS): the
# limit of sampling as the temperature goes to 0, and what a smaller one would compute anyway.
# Dividing fp32 logits by it gave inf, a NaN distribution and the last token id every step
# (1e-40: a denormal, still > 0), or rounded it to 0 in one place and not in another.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to sample one request (OpenAI-style fields; the engine validates them on submit).

    temperature 0 (or below :data:`GREEDY_BELOW`) is greedy decoding. ``top_k`` 0 and ``top_p`` 1
    disable those filters.
    ``n`` samples share one prefill of the prompt. ``seed``: sample ``i`` of a request draws
    from ``random.Random(f"nanoseek/{seed}/{i}")``, so the same seed reproduces the output;
    ``None`` seeds from the OS. ``stop`` strings end a sample and are cut from its text (the
    text never contains them, streamed or not); ``stop_token_ids`` end a sample like EOS does
    (the token is kept in ``token_ids`` but adds no text). EOS always stops unless ``ignore_eos``
    (benchmarks). ``repetition_guard`` = G > 0 stops a sample whose last G tokens are one
    n-gram (n <= G // 4, so at least four copies) repeated, e.g. ``the the the ...`` or a
    looping sentence; ``finish_reason`` is then "stop" with ``stop_reason`` "repetition".
    ``starts_in_think``: whether the completion begins inside a ``<think>`` block (R1's chat
    template ends the prompt with ``<think>\\n``); None detects it from the prompt (its last
    think tag is an opening one). ``split_reasoning`` False reports everything as answer text.
    ``skip_special_tokens`` (vLLM's default, True): generated control tokens (the tokenizer's
    "special" tokens, as HF's ``decode(skip_special_tokens=True)`` skips them; never the reasoning
    tags) add no text; they stay in ``token_ids`` and the logprobs.

    Logprobs (of the model's distribution before temperature/top-k/top-p; module docstring): every
    generated token's own is always recorded; ``top_logprobs`` = N adds the N most likely tokens
    at each generated position; ``prompt_logprobs`` = N (None: off, the default, no cost) scores
    the prompt: each prompt token's logprob given the tokens before it (None for the first) and
    the N most likely tokens there. ``max_new_tokens`` 0 generates nothing (score the prompt only).

    Tool calls (DeepSeek-V3.1's format, :mod:`nanoseek.tools`; the tokenizer needs its tool tokens):
    ``tools`` "off" (the default: tool tokens are ordinary tokens), "stop" (the sample ends with
    ``finish_reason`` "tool_calls" when it closes a calls block; the client runs the calls) or
    "run" (the engine runs them with the request's toolbox and the sample goes on after their
    outputs; see ``tool_loop.py``). ``banned_token_ids`` are never sampled (probability 0, also in
    the reported logprobs): ``tool_choice`` "none" bans the calls-begin token.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_guard: int = 0
    ignore_eos: bool = False
    starts_in_think: bool | None = None
    split_reasoning: bool = True
    skip_special_tokens: bool = True
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    tools: str = "off"
    banned_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an integer >= 0 (0: score the prompt only)")
        if not 0 <= self.temperature <= TEMPERATURE_MAX:        # (NaN and inf fail too)
            raise bad("temperature", f"must be in [0, {TEMPERATURE_MAX:g}] (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables it)")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids >= 0")
        if not isinstance(self.repetition_guard, int) or self.repetition_guard < 0 or 0 < self.repetition_guard < 4:
            raise bad("repetition_guard", "must be 0 (off) or an integer >= 4")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer in 0..{MAX_LOGPROBS}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"must be None (off) or an integer in 0..{MAX_LOGPROBS}")
        if self.tools not in TOOL_MODES:
            raise bad("tools", f"must be one of {', '.join(TOOL_MODES)}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.banned_token_ids):
            raise bad("banned_token_ids", "must be a list of token ids >= 0")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def sample_rng(self, index: int) -> random.Random:
        """The random stream of sample ``index`` (see the class docstring)."""
        if self.seed is None:
            return random.Random(int.from_bytes(os.urandom(8), "little"))
        return random.Random(f"nanoseek/{self.seed}/{index}")


def processed_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, filtered: bool = True, *, any_greedy: bool | None = None,
                    unit_temperature: bool = False) -> torch.Tensor:
    """logits [B, V]; per-row temperature/top_k/top_p [B] -> the sampling distribution [B, V] fp32.

    Rows with a temperature below :data:`GREEDY_BELOW` get a one-hot distribution on their argmax.
    ``filtered=False`` promises that no row uses top-k/top-p (skips the sort). What a caller knows of the
    temperatures saves work per step (``RowParams`` knows both): ``any_greedy`` whether a row is
    greedy (None: read it from ``temperature``), ``unit_temperature`` that every row's is 1 (the
    division by 1 is skipped; dividing by 1 changes no bit, so the result is the same).
    """
    logits = logits.float()
    if unit_temperature:                 # every row at 1: no greedy row, nothing to divide by
        scaled, any_greedy = logits, False
    else:
        greedy = temperature < GREEDY_BELOW
        if any_greedy is None:
            any_greedy = bool(greedy.any())
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    V = logits.shape[-1]
    if filtered:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=logits.device)[None]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
        p = sorted_logits.softmax(dim=-1)
        before = p.cumsum(dim=-1) - p                          # mass of strictly better tokens
        p = p.masked_fill(before >= top_p.float()[:, None], 0.0)  # always keeps the top token
        p = p / p.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(p).scatter_(1, order, p)
    else:
        probs = scaled.softmax(dim=-1)
    if any_greedy:
        onehot = torch.zeros_like(probs).scatter_(1, argmax(logits)[:, None], 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [B, V] (need not be normalised), u [B] in [0, 1) -> ids [B].

    A zero-probability token is never chosen; a one-hot row always gives its hot token.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = (u.to(cdf) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_max(probs.shape[-1] - 1)


@dataclass
class RowParams:
    """Per-row sampling settings of one batch as tensors (built once per batch composition)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    all_greedy: bool
    filtered: bool
    any_greedy: bool | None = None      # None: read from temperature
    unit_temperature: bool = False      # every row samples at temperature 1 (GRPO's rollouts)

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str) -> "RowParams":
        # greedy rows (SamplingParams.greedy, the one rule, read on the host) carry temperature 0,
        # so the fp32 tensor cannot round a temperature across GREEDY_BELOW the other way
        temperature = torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32)
        return cls(
            temperature=temperature.to(device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            all_greedy=all(p.greedy for p in params),
            filtered=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
            any_greedy=any(p.greedy for p in params),      # once per batch composition, on the host
            unit_temperature=bool((temperature == 1).all()),
        )

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> [B, V]; or [B, k, V] (k positions per row, one call) -> [B, k, V]."""
        known = {"any_greedy": self.any_greedy, "unit_temperature": self.unit_temperature}
        if logits.dim() == 3:
            B, k, V = logits.shape
            t, tk, tp = (x.repeat_interleave(k) for x in (self.temperature, self.top_k, self.top_p))
            return processed_probs(logits.reshape(B * k, V), t, tk, tp, self.filtered, **known).view(B, k, V)
        return processed_probs(logits, self.temperature, self.top_k, self.top_p, self.filtered, **known)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)``, the same indices (the first of tied maxima; a NaN wins) by
    ``max(dim=-1)``, whose CPU kernel is ~3x faster (34 against 98 us over [16, 4096] fp32): a greedy
    decode step takes one per step (tests/test_infer_sampling.py pins the equality)."""
    return logits.max(dim=-1).indices


def choose_tokens(logits: torch.Tensor, rp: RowParams, u: torch.Tensor | None) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax for greedy rows, a sample for the others."""
    if rp.all_greedy:
        return argmax(logits)
    return sample_from_probs(rp.probs(logits), u)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw model distribution (temperature 1, no filtering): [B]."""
    return logits.float().log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]


TopLogprobs = list[tuple[int, float]]   # (token id, logprob), most likely first


def logprobs_and_top(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> tuple[list[float], list[TopLogprobs | None]]:
    """logits [B, V], chosen tokens [B], alternatives wanted per row ``ks`` -> (log p(token) per row,
    per row its ``ks[i]`` most likely (id, logprob) or None when ``ks[i]`` is 0), all from one
    float32 ``log_softmax`` of the raw logits (one top-k for the batch, at the largest k)."""
    lsm = logits.float().log_softmax(dim=-1)
    chosen = lsm.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(ks, default=0)
    if k == 0:
        return chosen, [None] * len(ks)
    vals, ids = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
    vals, ids = vals.tolist(), ids.tolist()
    return chosen, [list(zip(ids[i][:ki], vals[i][:ki])) if ki else None for i, ki in enumerate(ks)]


def repeats_too_long(tokens: list[int], guard: int) -> bool:
    """True when the last ``guard`` tokens are one n-gram, n <= guard // 4, repeated.

    The last ``guard`` tokens have period ``n`` iff they equal themselves shifted by ``n``.
    """
    if guard <= 0 or len(tokens) < guard:
        return False
    tail = tokens[-guard:]
    return any(tail[n:] == tail[:-n] for n in range(1, guard // 4 + 1))


__all__ = ["GREEDY_BELOW", "SamplingParams", "RowParams", "processed_probs", "sample_from_probs", "argmax", "choose_tokens",
           "token_logprobs", "logprobs_and_top", "TopLogprobs", "MAX_LOGPROBS",
           "repeats_too_long"]
