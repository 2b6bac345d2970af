"""The evaluation harness: held-out task accuracy of a checkpoint, with k samples per problem.

:func:`evaluate` draws ``n_problems`` problems of the ``"test"`` split of each task of its spec,
mixed in one list: built-in tasks (:mod:`nanoseek.tasks.generators`), reasoning-gym datasets
(``rg:NAME``, :mod:`nanoseek.tasks.rg`), HumanEval (``humaneval``, ``humaneval:A-B``,
:mod:`nanoseek.tasks.humaneval`) or any source registered in :data:`nanoseek.tasks.sources.SOURCES`;
each source's test split is disjoint from what trains on it by construction. It renders each
problem in one of four prompt modes, samples ``k`` completions per problem with the inference
engine, scores them and returns an :class:`~nanoseek.eval.results.EvalResult` (per-problem
records, pass@1 with its 95% interval, pass@k, maj@k, format rate, lengths; see ``results.py``).
Every item goes through the same :class:`~nanoseek.tasks.source.TaskSource` calls (draw, prompt,
stop rule, batched scoring), so a source with its own prompts, stop sequences and code-running
grader (HumanEval) is one more registry entry, not a branch here; a problem named by two
overlapping items is evaluated once.

Prompt modes (``mode``) are the templates of :mod:`nanoseek.tasks.reply` (``EVAL_TEMPLATES``),
which renders them, says where generation stops and what text is scored (for question-and-answer
sources; HumanEval renders, stops and scores code its own way in each mode):

* ``fewshot``, for base models: ``few_shot`` TRAIN problems of the same task and level (the
  source's ``examples``: reasoning-gym's come from their own seed stream) rendered
  as pre-training documents before the question. The answer is ``extract_answer`` of the
  completion (its "Answer:" line); "format" here means the completion states an ``Answer:`` line.
  Examples are dropped, oldest first, when the prompt would not leave
  ``min(max_new_tokens, context / 2)`` tokens in the engine's context (noted in the result).
  In every mode a problem whose prompt alone does not fit the context (a reasoning-gym grid puzzle
  in a small model's 1024 tokens) is skipped with a note naming the task and the count, so one
  such task does not stop the others; :func:`check_prompts_fit` is the same test as an error,
  which the speedrun runs before it trains.
* ``chat``, for SFT / GRPO models: the question as one user turn of the chat template; scored
  by the source's ``score_reply`` (:mod:`nanoseek.tasks.sources`: the task's verifier or reasoning-gym's
  ``score_answer`` on ``extract_answer``, R1's format rule): accuracy is the answer being right whatever the
  format, format rate is R1's ``<think>`` format, reported separately (``strict@1`` needs both).
* ``chat-think``: the same with ``<think>\\n`` pre-filled (the R1 template).
* ``r1-zero``: DeepSeek-R1-Zero's plain-text template (as ``nanoseek grpo`` with
  ``template = "r1-zero"`` trains); stops at ``</answer>``, which is put back before scoring.

Sampling: R1's evaluation settings by default (temperature 0.6, top-p 0.95; every default is
:class:`EvalConfig`'s). Temperature 0 is
greedy decoding; its k samples would be identical, so k is set to 1 (noted). Every request has
its own seed derived from ``(seed, problem id, chunk)``, so a problem's samples do not depend on
which other problems are evaluated with it or on the batch size (the engine's per-row random
streams), and the same seed reproduces the result (up to float rounding in batched matmuls).
k above the engine's ``max_batch_size`` is split into chunks of at most that many samples.
Requests go through ``Engine.submit`` (continuous batching over all problems); an object with
only ``generate(prompts, params)`` works too (tests pass a fake one).

Tools (``tools = "calculator"``, ``tool_tasks``: :class:`~nanoseek.tasks.tool_use.ToolUse`, chat
modes only): the problems of the tasks that get tools are prompted with their description (or
their names, ``describe_tools = "names"``) and
sampled through the engine's tool loop (``SamplingParams.tools = "run"``, a fresh
:class:`~nanoseek.tools.toolbox.Toolbox` per evaluation); each sample's reasoning and final answer
are scored (:func:`~nanoseek.tasks.reply.completion_text`), and its tool calls and failed calls are
recorded per problem (``tool_calls``, ``tool_failed``; the ``tools`` summary per task).

Bits per byte on held-out text is :func:`nanoseek.train.bpb.bits_per_byte` (the trainer's metric).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from nanoseek.limits import TEMPERATURE_MAX
from nanoseek.tasks.reply import EVAL_TEMPLATES, completion_text, tool_counts

from .results import EvalResult, ProblemResult, k_values

@dataclass
class EvalConfig:
    """The settings of one evaluation (saved in ``eval.json`` as ``config``), and the one home of
    their defaults: ``nanoseek eval``'s flags fall back to these (its --help quotes them), and
    :func:`evaluate` and the speedrun's ``[eval]`` table take them from here."""

    tasks: list[str]
    n_problems: int = 200
    k: int = 4
    mode: str = "chat"
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    levels: list[int] | None = None
    few_shot: int = 3
    batch_size: int = 16
    keep_samples: int = 3                 # full responses saved per task
    tools: str = ""                       # built-in tools the tool tasks' samples may call ("" = none)
    tool_tasks: str = ""                  # tasks that get them ("": every built-in task with a tool call)
    describe_tools: bool | str = "full"   # what prompts say of the tools: full, names or none (nanoseek.tasks.tool_use)
    ks: list[int] = field(default_factory=list)   # filled in: the k values of pass@k / maj@k

    def validate(self) -> "EvalConfig":
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"eval {name} = {getattr(self, name)!r}: {why}")

        if not self.tasks:
            raise bad("tasks", "name at least one task")
        from nanoseek.tasks.sources import parse_sources

        try:
            parse_sources(self.tasks)  # names (levels, configs, ranges) valid, else the item is named
        except ValueError as e:
            raise bad("tasks", str(e)) from None
        if self.mode not in EVAL_TEMPLATES:
            raise bad("mode", f"must be one of {', '.join(EVAL_TEMPLATES)}")
        for name in ("n_problems", "k", "max_new_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if self.few_shot < 0 or self.keep_samples < 0:
            raise bad("few_shot", "few_shot and keep_samples must be >= 0")
        if not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise bad("temperature", f"must be in [0, {TEMPERATURE_MAX:g}] (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.levels is not None and not self.levels:
            raise bad("levels", "give at least one level, or None for all levels mixed")
        try:
            use = self.tool_use
        except ValueError as e:
            raise bad("tools", str(e)) from None
        if use.enabled and self.mode not in ("chat", "chat-think"):
            raise bad("tools", f"tools need a chat mode (chat or chat-think), not mode {self.mode!r}")
        return self

    @property
    def tool_use(self):
        """The tools and the tasks that get them (:class:`~nanoseek.tasks.tool_use.ToolUse`)."""
        from nanoseek.tasks.tool_use import ToolUse

        return ToolUse.of(self.tools, self.tool_tasks, self.describe_tools)


# ---------------------------------------------------------------------- prompts and scoring

def score_response(text: str, problem, mode: str, source=None) -> tuple[bool, bool, str | None]:
    """(answer correct, well formed, extracted answer) of one response, graded by the problem's task
    source (``source``, or the one ``problem.task`` names)."""
    from nanoseek.tasks.sources import resolve

    return (source or resolve(problem.task)).score_reply(text, problem, mode)


def request_seed(seed: int, problem_id: str, chunk: int) -> int:
    """A request's sampling seed: a hash of the run seed, the problem and the sample chunk."""
    return int(hashlib.sha256(f"{seed}/{problem_id}/{chunk}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------- problems

def draw_problems(task_name: str, n: int, seed: int, levels: Sequence[int] | None) -> list:
    """``n`` distinct test problems of a task spec item (a built-in task: all levels mixed, or
    ``levels`` in equal shares; a level whose test space runs out, like arithmetic L1's ~41 sums,
    leaves the rest to the others; see ``Task.generate``). Fewer than ``n`` when the whole space is
    smaller (modular L1 alone has ~80): the result's N says how many were evaluated."""
    from nanoseek.tasks.sources import resolve

    return resolve(task_name).test_problems(n, seed, list(levels) if levels else None)


# ---------------------------------------------------------------------- sampling

def _run_requests(engine, requests: list[tuple[list[int], Any, Any]],
                  progress: Callable[[int, int], None] | None) -> list[list]:
    """Completions of every (prompt ids, SamplingParams, Toolbox or None) request, in order."""
    total = len(requests)
    out: list[list] = []

    def tools(tb) -> dict[str, Any]:
        return {"toolbox": tb} if tb is not None else {}

    if hasattr(engine, "submit") and hasattr(engine, "shutdown"):
        was_running = bool(getattr(engine, "running", False))
        try:
            handles = [engine.submit(p, sp, **tools(tb)) for p, sp, tb in requests]
            for i, h in enumerate(handles, start=1):
                out.append(h.result())
                if progress:
                    progress(i, total)
        finally:
            if not was_running:
                engine.shutdown()
        return out
    for i, (p, sp, tb) in enumerate(requests, start=1):
        out.append(list(engine.generate([p], sp, **tools(tb))[0]))
        if progress:
            progress(i, total)
    return out


def model_info(model) -> dict[str, Any]:
    """Architecture and parameter counts (total / activated per token) of a model, for the record."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    info: dict[str, Any] = {k: getattr(cfg, k, None) for k in (
        "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
        "vocab_size", "num_nextn_predict_layers")}
    try:
        from nanoseek.model.registry import count_params

        pc = count_params(cfg)
        info.update({"params_total": pc.total, "params_active": pc.active, "params_mtp": pc.mtp})
    except Exception as e:  # an exotic config must not stop an evaluation; say why it is missing
        info["params_error"] = f"{type(e).__name__}: {e}"
    return info


def _render(cfg: EvalConfig, tokenizer, context: int | None, strict: bool = False
            ) -> tuple[list, list, list[list[int]], list[str]]:
    """(problems, their task sources, prompt ids, notes): every task's test problems rendered in
    ``cfg.mode``. A problem whose prompt alone (no few-shot example left) does not fit the engine's
    context is skipped and counted in a note per task (:func:`too_long`); ValueError, one line, when
    no problem at all fits, or (``strict``) when any does not."""
    from nanoseek.tasks.sources import parse_sources

    problems, owners, prompts, notes = [], [], [], []
    use = cfg.tool_use
    seen: set[tuple[str, str]] = set()
    skipped: dict[str, list[int]] = {}   # task -> token counts of the prompts that do not fit
    repeated = 0
    shortened = cut_budget = 0
    examples_cache: dict[tuple[str, int], list] = {}
    reserve = min(cfg.max_new_tokens, context // 2) if context else cfg.max_new_tokens   # room kept for the answer
    for source in parse_sources(cfg.tasks):
        drawn, source_notes = source.draw(cfg.n_problems, cfg.seed, cfg.levels)
        notes += source_notes
        if cfg.mode == "fewshot" and cfg.few_shot and not source.has_gold:
            notes.append(f"{source.name}: no gold answers to show as few-shot examples; evaluated zero-shot")
        for p in drawn:
            if (p.task, p.id) in seen:      # items that overlap (humaneval:0-9,humaneval:5-14)
                repeated += 1
                continue
            seen.add((p.task, p.id))
            examples = []
            if cfg.mode == "fewshot" and cfg.few_shot:
                key = (source.name, p.level)
                if key not in examples_cache:
                    examples_cache[key] = source.examples(p.level, cfg.few_shot, cfg.seed)
                examples = list(examples_cache[key])
            ids = (source.prompt_ids(tokenizer, p, cfg.mode, examples, **use.prompt_tools(p.task)) if use.applies(p.task)
                   else source.prompt_ids(tokenizer, p, cfg.mode, examples))
            if context is not None:
                if cfg.mode == "fewshot" and len(ids) + reserve > context and examples:
                    shortened += 1
                    while examples and len(ids) + reserve > context:
                        examples.pop(0)
                        ids = source.prompt_ids(tokenizer, p, cfg.mode, examples)
                if len(ids) >= context:
                    skipped.setdefault(p.task, []).append(len(ids))
                    continue
                cut_budget += len(ids) + cfg.max_new_tokens > context
            problems.append(p)
            owners.append(source)
            prompts.append(ids)
    if strict and skipped:
        task, lengths = next(iter(skipped.items()))
        raise ValueError(too_long(task, lengths, cfg.mode, context, skipped=False))
    for task, lengths in skipped.items():
        notes.append(too_long(task, lengths, cfg.mode, context))
    if skipped and not problems:
        raise ValueError(f"no prompt fits the engine's context: {'; '.join(notes[-len(skipped):])}")
    if use.enabled and not any(use.applies(p.task) for p in problems):
        notes.append(f"tools {use.tools!r}: no task evaluated here gets them (tool_tasks {use.tasks or 'empty'!r}; "
                     "without it, the built-in tasks with a tool call); evaluated without tools")
    if repeated:
        notes.append(f"{repeated} problems named by more than one task item were evaluated once")
    if shortened:
        notes.append(f"fewshot: {shortened} prompts dropped examples to leave min(max_new_tokens, context / 2) = "
                     f"{reserve} tokens for the answer in the engine's context of {context} tokens")
    if cut_budget:
        notes.append(f"{cut_budget} prompts leave fewer than max_new_tokens={cfg.max_new_tokens} tokens of context "
                     f"({context}); their samples stop earlier (counted as truncated)")
    return problems, owners, prompts, notes


def too_long(task: str, lengths: Sequence[int], mode: str, context: int | None, skipped: bool = True) -> str:
    """The note (``skipped``) or error line for ``task``'s prompts that do not fit the engine's context."""
    span = f"{min(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
    return (f"{task}: {len(lengths)} held-out problems have {mode} prompts of {span} tokens, "
            f"more than the engine's context of {context} tokens ({'skipped; ' if skipped else ''}use a larger max_seq_len, or a "
            f"config with smaller problems)")


def check_prompts_fit(cfg: EvalConfig, tokenizer, context: int) -> None:
    """ValueError, one line naming the task, when any held-out problem :func:`evaluate` would draw
    with ``cfg`` has a prompt that does not fit ``context`` (what a run checks before it trains, so
    an evaluation after hours of training neither skips problems nor fails)."""
    _render(replace(cfg), tokenizer, context, strict=True)


def _requests(cfg: EvalConfig, tokenizer, problems: list, owners: list, prompts: list[list[int]],
              per_request: int) -> tuple[list[tuple[list[int], Any, Any]], list[int]]:
    """(requests, the problem index of each): k samples per problem in chunks of ``per_request``,
    stopping where the problem's source says; a problem with tools runs them (one toolbox)."""
    from nanoseek.infer.sampling import SamplingParams

    use = cfg.tool_use
    toolbox = use.toolbox()
    requests, owner = [], []
    rules: dict[int, tuple[list[str], list[int]]] = {}
    for i, (p, source, ids) in enumerate(zip(problems, owners, prompts)):
        if id(source) not in rules:
            rules[id(source)] = source.stop_rule(tokenizer, cfg.mode)
        stop, stop_ids = rules[id(source)]
        runs = use.applies(p.task)
        for chunk, start in enumerate(range(0, cfg.k, per_request)):
            sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k, n=min(per_request, cfg.k - start),
                                seed=request_seed(cfg.seed, p.id, chunk), stop=list(stop),
                                stop_token_ids=list(stop_ids), **({"tools": "run"} if runs else {}))
            requests.append((ids, sp, toolbox if runs else None))
            owner.append(i)
    return requests, owner


def _score(cfg: EvalConfig, problems: list, owners: list, completions: list[list], tokenizer=None
           ) -> tuple[list[ProblemResult], list[dict]]:
    """Per-problem records (with pass@k / maj@k, tool calls when tools ran) and the first
    ``keep_samples`` responses per task."""
    records, samples, kept = [], [], {}
    use = cfg.tool_use
    texts = [[completion_text(c, cfg.mode, tokenizer) for c in comps] for comps in completions]
    for p, comps in zip(problems, completions):
        if len(comps) != cfg.k:
            raise RuntimeError(f"{p.id}: the engine returned {len(comps)} completions, expected {cfg.k}")
    scored: dict[tuple[int, int], tuple[bool, bool, str | None]] = {}
    batches: dict[int, tuple[Any, list[tuple[int, int]]]] = {}     # each source's samples, scored in one batch
    for i, source in enumerate(owners):
        batches.setdefault(id(source), (source, []))[1].extend((i, j) for j in range(len(texts[i])))
    for source, keys in batches.values():
        verdicts = source.score_replies([(problems[i], texts[i][j]) for i, j in keys], cfg.mode)
        scored.update(zip(keys, verdicts))
    for i, (p, comps) in enumerate(zip(problems, completions)):
        correct, fmt, answers, tokens, truncated, calls, failed = [], [], [], [], [], [], []
        for j, c in enumerate(comps):
            n_calls, n_failed = tool_counts(c)
            calls.append(n_calls)
            failed.append(n_failed)
            text = texts[i][j]
            ok, well_formed, answer = scored[(i, j)]
            correct.append(ok)
            fmt.append(well_formed)
            answers.append(answer)
            tokens.append(int(c.completion_tokens))
            truncated.append(c.finish_reason == "length")
            if j == 0 and kept.get(p.task, 0) < cfg.keep_samples:
                kept[p.task] = kept.get(p.task, 0) + 1
                samples.append({"task": p.task, "id": p.id, "level": p.level, "mode": cfg.mode, "prompt": p.prompt,
                                "response": text, "reasoning": getattr(c, "reasoning", None), "answer": answer,
                                "gold": p.answer, "correct": ok, "format_ok": well_formed,
                                "finish_reason": c.finish_reason, "tokens": int(c.completion_tokens),
                                **({"text": c.text, "tool_calls": calls[-1], "tool_failed": failed[-1]}
                                   if use.applies(p.task) else {})})
        tooled = use.applies(p.task)
        records.append(ProblemResult(task=p.task, id=p.id, level=p.level, gold=p.answer, correct=correct,
                                     format_ok=fmt, answers=answers, tokens=tokens, truncated=truncated,
                                     tool_calls=calls if tooled else [], tool_failed=failed if tooled else []
                                     ).compute_curves(seed=cfg.seed))
    return records, samples


def evaluate(model, tokenizer, tasks: EvalConfig | str | Sequence[str], *, engine=None, max_seq_len: int | None = None,
             progress: Callable[[int, int], None] | None = None, **settings: Any) -> EvalResult:
    """Evaluate ``model`` on held-out problems; see the module docstring.

    ``tasks``: an :class:`EvalConfig`, or the task spec (a list or "a,rg:b"); ``settings``: fields of
    :class:`EvalConfig` (``n_problems``, ``k``, ``mode``, ``temperature``, ...) set over it; a
    setting not given takes EvalConfig's default (their one home). ``engine``: an engine to
    sample with (default: ``Engine(model, tokenizer, max_batch_size=batch_size,
    max_seq_len=max_seq_len)``). ``progress(done, total)`` is called per request.
    """
    t0 = time.perf_counter()
    if settings.get("levels") is not None:
        settings["levels"] = list(settings["levels"])
    if isinstance(tasks, EvalConfig):
        cfg = replace(tasks, **settings)  # a copy: the caller's config is left as it was
    else:
        from nanoseek.tasks.generators import split_specs

        cfg = EvalConfig(tasks=split_specs(tasks), **settings)
    cfg.validate()
    notes: list[str] = []
    from nanoseek.infer.sampling import GREEDY_BELOW   # (torch: not at this module's import)

    if cfg.temperature < GREEDY_BELOW and cfg.k > 1:
        notes.append(f"greedy decoding (temperature {cfg.temperature:g}): k reduced from {cfg.k} to 1, its samples would be identical")
        cfg.k = 1
    cfg.ks = k_values(cfg.k)
    if cfg.tool_use.enabled:
        from nanoseek.tasks.tool_use import require_tool_tokens

        require_tool_tokens(tokenizer, f"eval tools = {cfg.tools!r}")
    if engine is None:
        from nanoseek.infer.engine import Engine

        engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, max_seq_len=max_seq_len)
    context = getattr(engine, "max_seq_len", None)

    problems, owners, prompts, render_notes = _render(cfg, tokenizer, context)
    notes += render_notes
    requests, owner = _requests(cfg, tokenizer, problems, owners, prompts,
                                per_request=min(cfg.k, int(getattr(engine, "max_batch_size", cfg.k))))
    completions: list[list] = [[] for _ in problems]
    for i, comps in zip(owner, _run_requests(engine, requests, progress)):
        completions[i].extend(comps)
    records, samples = _score(cfg, problems, owners, completions, tokenizer)

    wall = time.perf_counter() - t0
    generated = sum(sum(r.tokens) for r in records)
    stats = {"generated_tokens": generated, "generated_tokens_per_s": generated / wall if wall > 0 else math.nan,
             "requests": len(requests), "engine_max_seq_len": context}
    return EvalResult.build(asdict(cfg), records, samples=samples, model=model_info(model), notes=notes, wall_s=wall,
                            stats=stats, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def record_speculation(result, engine) -> None:
    """The engine's MTP draft statistics into ``result`` (``model`` fields and a note), where it drafted."""
    spec = getattr(engine, "spec_stats", None)
    if spec is None or not spec.drafted:
        return
    result.model["mtp_acceptance"] = spec.acceptance_rate
    result.model["mtp_tokens_per_step"] = spec.tokens_per_step
    result.notes.append(f"MTP self-speculative decoding: {spec.acceptance_rate:.1%} of {spec.drafted:,} drafts "
                        f"accepted, {spec.tokens_per_step:.2f} tokens per step")


def evaluate_checkpoint(ckpt: str | Path, cfg: EvalConfig, mode: str, *, device: str = "cpu", use_mtp: bool = False,
                        label: str = "") -> EvalResult:
    """The checkpoint folder ``ckpt`` (with its tokenizer) on ``cfg``'s problems in prompt ``mode``, by an
    engine of ``cfg.batch_size`` rows (``use_mtp``: MTP drafts, their acceptance recorded); the result
    names the checkpoint (and ``label`` as its stage). The library form of ``nanoseek eval --model``."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference
    from nanoseek.train.loop import resolve_device

    model, tokenizer = load_for_inference(ckpt, device=resolve_device(device), require_tokenizer=True)
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, use_mtp=use_mtp)
    result = evaluate(model, tokenizer, cfg, mode=mode, engine=engine)
    result.model["path"] = str(ckpt)
    if label:
        result.model["stage"] = label
    record_speculation(result, engine)
    return result


__all__ = ["evaluate", "evaluate_checkpoint", "record_speculation", "EvalConfig", "check_prompts_fit", "too_long", "score_response", "request_seed", "draw_problems", "model_info"]
