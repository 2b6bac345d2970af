"""Rollouts: sample replies to prompts with the inference engine and score them with the verifiers.

One way to sample and score serves every post-training stage that learns from its own (or a
teacher's) samples:

* GRPO's rollouts (:class:`~nanoseek.post.grpo.GRPOTask`): a group of G replies per prompt from the
  policy being trained, rewarded, then turned into advantages;
* DPO's on-policy pairs (``dpo.data = "auto:..."``): a correct and a wrong reply of the starting model;
* rejection sampling and distillation (:mod:`~nanoseek.post.distill`): the verified replies of a
  teacher (the RL model itself, or a bigger one) become SFT data.

The reply format (how a prompt is rendered in a template, what stops generation, what text is
scored, what a chat-think prompt pre-filled) is :mod:`nanoseek.tasks.reply`'s; the rewards are
:func:`nanoseek.tasks.rewards.build_reward_fn` of a :class:`~nanoseek.tasks.rewards.RewardConfig`.

:func:`sampling_params` is a template's sampling settings (its stop rule included); :func:`sample`
runs the engine once over a batch of prompts and returns every completion with its scored text;
:func:`sample_and_score` is the whole operation on a model (an engine sized for it, rewards,
a :class:`SampleReport`). Sampling is seeded (the engine's ``seed``: sample ``i`` of a request
draws from its own generator), so the same seed gives the same replies.

Tool use (:mod:`nanoseek.tools`): a prompt rendered with tools is sampled through the engine's tool
loop (``SamplingParams.tools = "run"`` and a :class:`~nanoseek.tools.toolbox.Toolbox`): a sample
that calls a tool pauses, the tool runs, its output is appended and the sample goes on. Its scored
text is its reasoning and final answer (:func:`nanoseek.tasks.reply.completion_text`); its
``model_mask`` marks the tokens the model sampled (the tool loop's are never trained).

Deliberately left out: rollouts that overlap training (an asynchronous sampler) and a separate
inference server; the engine samples from the very module the trainer updates.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from nanoseek.tasks.reply import completion_text, prefilled_text, render_prompt, stop_rule
from nanoseek.tasks.rewards import RewardConfig, RewardFn, build_reward_fn

from .common import eval_mode
from .datasets import RLPrompt


def sampling_params(tokenizer, template: str, *, n: int, seed: int, max_new_tokens: int, temperature: float,
                    top_p: float = 1.0, top_k: int = 0, tools: bool = False):
    """The engine's SamplingParams for ``n`` replies per prompt in ``template`` (its stop strings);
    ``tools``: run the calls a sample makes (the engine's tool loop, ``tools = "run"``)."""
    from nanoseek.infer.engine import SamplingParams

    stop, _ = stop_rule(tokenizer, template)
    extra = {"tools": "run"} if tools else {}
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n,
                          seed=seed, stop=stop, **extra)


@dataclass
class Samples:
    """One engine call: ``params.n`` completions per prompt and the text the verifiers score."""

    groups: list[list[Any]]            # per prompt, its completions (token_ids, text, finish_reason ...)
    texts: list[str]                   # the scored text of every completion, group-contiguous
    seconds: float                     # wall time of the generation

    def items(self, prompts: list[Any]) -> list[Any]:
        """``prompts`` repeated once per completion, aligned with :attr:`texts`."""
        return [p for p, g in zip(prompts, self.groups) for _ in g]


def model_mask(completion) -> list[int]:
    """1 per token the model sampled, 0 per token the tool loop appended (all 1 without tools)."""
    mask = getattr(completion, "model_mask", None)
    return list(mask) if mask else [1] * len(completion.token_ids)


def _timed_samples(engine, generate, template: str, tokenizer) -> Samples:
    """:class:`Samples` of ``generate()`` (the engine call), timed, the model held in eval mode once for
    the whole generation: the engine would otherwise switch a model being trained to eval and back at
    every decode step (each switch walks every module: ~10% of a GRPO rollout)."""
    model = getattr(engine, "model", None)
    t0 = time.perf_counter()
    with eval_mode(model) if model is not None else contextlib.nullcontext():
        groups = generate()
    return Samples(groups=groups, texts=[completion_text(c, template, tokenizer) for g in groups for c in g],
                   seconds=time.perf_counter() - t0)


def sample(engine, prompt_ids: list[list[int]], params, template: str, *, toolbox=None,
           tokenizer=None) -> Samples:
    """Generate ``params.n`` completions for each prompt (token ids rendered in ``template``);
    with a ``toolbox`` (and ``params.tools = "run"``) their calls run in it. ``tokenizer`` reads the
    scored text of a completion that ran tools (:func:`~nanoseek.tasks.reply.completion_text`)."""
    extra = {"toolbox": toolbox} if toolbox is not None else {}
    return _timed_samples(engine, lambda: engine.generate(prompt_ids, params, **extra), template, tokenizer)


def sample_mixed(engine, prompt_ids: list[list[int]], with_tools: list[bool], params, tool_params, template: str,
                 *, toolbox=None, tokenizer=None) -> Samples:
    """:func:`sample` of prompts of which some run tools (``with_tools[i]``: with ``tool_params`` and
    ``toolbox``) and some do not (``params``), results in prompt order: all in one batch where the
    engine takes requests of both kinds at once (:meth:`~nanoseek.infer.engine.Engine.generate_each`;
    one call per kind took twice the decode steps: GRPO's speedrun stage made half as many steps),
    else one engine call per kind. Either way each completion is the same (per-sample seeds)."""
    if any(with_tools) and not all(with_tools) and hasattr(engine, "generate_each"):
        requests = [(ids, tool_params if t else params, toolbox if t else None) for ids, t in zip(prompt_ids, with_tools)]
        return _timed_samples(engine, lambda: engine.generate_each(requests), template, tokenizer)
    kinds = [[i for i, t in enumerate(with_tools) if t == kind] for kind in (False, True)]
    groups: list[Any] = [None] * len(prompt_ids)
    texts: list[list[str]] = [[] for _ in prompt_ids]
    seconds = 0.0
    for kind, idx in zip((False, True), kinds):
        if not idx:
            continue
        part = sample(engine, [prompt_ids[i] for i in idx], tool_params if kind else params, template,
                      toolbox=toolbox if kind else None, tokenizer=tokenizer)
        seconds += part.seconds
        k = 0
        for i, g in zip(idx, part.groups):
            groups[i] = g
            texts[i] = part.texts[k:k + len(g)]
            k += len(g)
    return Samples(groups=groups, texts=[t for ts in texts for t in ts], seconds=seconds)


@dataclass
class Scored:
    """One sampled completion with its verdict."""

    text: str                          # what the verifier saw (think prefix included for chat-think)
    result: Any                        # RewardResult
    finish_reason: str
    tokens: int


@dataclass
class SampleReport:
    prompts: int = 0
    samples: int = 0
    correct: int = 0
    well_formed: int = 0
    kept: int = 0
    seconds: float = 0.0
    tokens: int = 0
    by_prompt_solved: int = 0          # prompts with at least one verified sample
    dropped: int = 0                   # prompts too long for the context with max_new_tokens (not sampled)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "samples": self.samples, "accuracy": self.correct / max(self.samples, 1),
                "format_rate": self.well_formed / max(self.samples, 1), "kept": self.kept,
                "solved_prompts": self.by_prompt_solved, "dropped_prompts": self.dropped, "sample_seconds": self.seconds,
                "sample_tokens_per_s": self.tokens / max(self.seconds, 1e-9)}


def fit_prompts(model, ids: list[list[int]], max_new_tokens: int, where: str) -> list[int]:
    """Indices of the rendered prompts that leave ``max_new_tokens`` in the model's context
    (``max_position_embeddings``): a prompt that does not is dropped before any rollout (its
    engine cache alone could take gigabytes); a DataError, one line naming ``where``, when
    ``max_new_tokens`` alone fills the context or no prompt fits."""
    from .datasets import DataError

    context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    if not context:
        return list(range(len(ids)))
    if max_new_tokens >= context:
        raise DataError(f"{where}: max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens")
    keep = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= context]
    if not keep and ids:
        lengths = sorted(len(x) for x in ids)
        span = f"{lengths[0]}" if lengths[0] == lengths[-1] else f"{lengths[0]}-{lengths[-1]}"
        raise DataError(f"{where}: none of the {len(ids)} prompts fits the model's context of {context} tokens with "
                        f"max_new_tokens={max_new_tokens} (prompts of {span} tokens); use a "
                        "task config with smaller problems or a smaller max_new_tokens")
    return keep


def sample_and_score(model, tokenizer, prompts: list[RLPrompt], n: int, *, template: str, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int = 0, engine_batch_size: int = 64,
                     reward_fn: RewardFn | None = None) -> tuple[list[list[Scored]], SampleReport]:
    """``n`` completions per prompt from ``model`` (inference engine), scored by the verifiers
    (``reward_fn``, default: the rule-based rewards of ``template``'s format). The sampling
    settings are the caller's section's (``DistillSection``, ``DPOSection``'s ``auto_*``): no
    defaults of their own here."""
    from nanoseek.infer.engine import Engine

    reward_fn = reward_fn or build_reward_fn(RewardConfig.for_template(template))
    all_ids = [render_prompt(tokenizer, p, template) for p in prompts]
    keep = fit_prompts(model, all_ids, max_new_tokens, "prompts")
    dropped = len(prompts) - len(keep)
    ids, fitted = [all_ids[i] for i in keep], [prompts[i] for i in keep]
    engine = Engine(model, tokenizer, max_batch_size=max(engine_batch_size, n),
                    max_seq_len=max(len(x) for x in ids) + max_new_tokens + 1)
    params = sampling_params(tokenizer, template, n=n, seed=seed, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p)
    samples = sample(engine, ids, params, template)
    report = SampleReport(prompts=len(prompts), seconds=samples.seconds, dropped=dropped)
    prefix = prefilled_text(template)
    results = reward_fn(samples.texts, samples.items(fitted))
    out: list[list[Scored]] = []
    k = 0
    for g in samples.groups:
        scored = []
        for c in g:
            r = results[k]
            scored.append(Scored(text=prefix + samples.texts[k], result=r, finish_reason=c.finish_reason,
                                 tokens=len(c.token_ids)))
            k += 1
            report.samples += 1
            report.tokens += len(c.token_ids)
            report.correct += bool(r.correct)
            report.well_formed += bool(r.format_ok)
        report.by_prompt_solved += any(s.result.correct and s.result.format_ok for s in scored)
        out.append(scored)
    by_prompt: list[list[Scored]] = [[] for _ in prompts]    # a dropped prompt has no samples
    for i, scored in zip(keep, out):
        by_prompt[i] = scored
    return by_prompt, report


__all__ = ["fit_prompts", "sampling_params", "Samples", "sample", "sample_mixed", "model_mask", "Scored",
           "SampleReport", "sample_and_score"]
