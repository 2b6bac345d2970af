"""GRPO with verifiable rewards, as in DeepSeekMath and DeepSeek-R1(-Zero).

One GRPO step (a *rollout*, then ``num_iterations`` optimisation passes over it):

1. **Rollout.** ``prompts_per_step`` questions are rendered with the template and the inference
   engine samples a group of ``group_size`` (G) completions for each from the policy being
   trained (:mod:`nanoseek.post.rollout`, the sampler DPO and distillation share). The engine puts the model in eval mode and decodes on the absorbed MLA path (prefill
   on the naive one), then restores the training mode and the naive path for the update. Rollouts
   run between optimizer steps, where a DeepSeek-V3.2 policy has no indexer training stage: it samples
   with top-k sparse attention and no indexer loss, as served (the engine also clears any stage it
   finds); its indexers train in the update, in the sparse stage (:mod:`nanoseek.train.dsa`).
2. **Rewards** from the rule-based verifiers of :mod:`nanoseek.tasks.rewards` (format + accuracy,
   scored in a thread pool), plus DAPO's soft overlong penalty when ``overlong_buffer > 0``.
3. **Advantages** ``(r - mean) / std`` within each group (``scale_rewards=False``: Dr. GRPO's
   ``r - mean``), the same for every token of a completion. With ``filter_zero_std`` the groups
   whose rewards all agree (no signal) are dropped and more prompts are sampled, up to
   ``max_rollout_attempts`` rollouts, to fill the batch (DAPO's dynamic sampling).
4. **Old and reference log-probs**, computed once before the first pass: pi_old only when
   ``num_iterations > 1`` (with one pass rho = 1 and pi_old is the detached current policy), the
   frozen reference only when ``beta > 0`` (with ``beta = 0`` no reference model is kept at all).
5. **Optimisation**: ``num_iterations`` passes, each one optimizer step of the shared trainer over
   the batch split into micro-batches of at most ``micro_batch_size`` rows of similar length
   (each cropped to its longest row); loss :func:`~nanoseek.post.grpo_loss.grpo_loss` with the
   chosen policy loss (``policy_loss``: GRPO's clipped surrogate, GSPO or CISPO, each with its own
   clip range) and aggregation, normalised by the whole batch so micro-batches add up exactly.

Templates (``template``): ``r1-zero`` is DeepSeek-R1-Zero's plain-text prompt (no chat markup,
straight from the base model; the answer goes in ``<answer>`` tags and generation stops at
``</answer>`` or EOS); ``chat`` renders the question as a user turn of the chat template and the
model writes ``<think>...</think>`` itself; ``chat-think`` also pre-fills ``<think>\\n``. In every
template the question is text: only the template makes control tokens (:mod:`nanoseek.tasks.reply`).

Tool use (``tools = "calculator"``, ``tool_tasks``: :class:`~nanoseek.tasks.tool_use.ToolUse`): the
prompts of the tasks that get the tools describe or name them in the system turn
(``describe_tools``; with ``tool_offer`` below 1 only that share of a partly-calling task's prompts
have them, the rest are head math) and are sampled through the engine's tool loop (multi-turn rollouts: call, tool output, more reasoning, answer). The loss
covers the model's own tokens only: ``Completion.model_mask`` takes the tool loop's tokens (the EOS
after a call block and the tool's output) out of the targets, for every loss aggregation and for
pi_old / pi_ref alike. The reward reads the final answer (after the last tool output) and, with
``tool_failure_penalty > 0``, subtracts that much per failed call (bad JSON, unknown tool, a tool
error). Logged besides: calls per sample, the share of samples that called a tool, failed calls.

Logged with every step (constant within a rollout): reward mean/std (the overlong penalty
included), accuracy, format rate, mean/max response length, truncated fraction, zero-std group
fraction, rollout tokens/s; from the loss: clip fractions, KL to the reference, entropy, mean ratio,
train tokens (the trainer turns them into train tokens/s). A few sample completions per rollout go
to ``samples.jsonl`` in the run directory. The logged loss of an on-policy step (rho = 1) is
-mean(A) over the aggregation: about 0 by construction, while its gradient is not.

Under torchrun (data parallel, see ``nanoseek/train/distributed.py``) every rank samples, scores
and trains on its share of each step's prompts: rank k takes prompts k, k + W, ... of the
``prompts_per_step`` (whole groups, so advantages stay within each group and need no
communication). The loss normalisers (sequence and token counts of the step) are summed over
ranks, so each rank's micro-batch losses are shares of the one global loss and the trainer sums
the gradients over ranks (``micro_batch_reduction = "sum"``): the update is the one a single
process would make from the same samples. The ranks keep their prompt cursors in step (with
dynamic sampling, every rank advances by the most attempts any rank made); rank 0 writes
``samples.jsonl`` from its own share; the logged rollout statistics are the mean over ranks.
Rollouts run the policy independently on each rank, so expert parallelism and FSDP (whose
forwards are collectives) are refused for GRPO.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.infer.sampling import GREEDY_BELOW
from nanoseek.limits import TEMPERATURE_MAX
from nanoseek.tasks.reply import DEFAULT_TEMPLATE, TEMPLATES, render_prompt, tool_counts
from nanoseek.tasks.rewards import RewardConfig, RewardFn, build_reward_fn

from .common import IGNORE, eval_mode, pad_rows, sequence_logprobs
from .datasets import RLPrompt, check_prompt_weights, check_rl_source, check_task_level, source_key
from .grpo_loss import LOSS_AGGREGATIONS, POLICY_LOSSES, group_advantages, grpo_loss, overlong_penalty, zero_std_groups
from .rollout import fit_prompts, model_mask, sample_mixed, sampling_params


@dataclass
class GRPOSection:
    """What a GRPO stage does; the optimizer, schedule and checkpointing are the trainer's."""

    prompts: str = "arithmetic"       # RL prompt source: a .jsonl, rg:NAME, or built-in task names "a,b"
    num_prompts: int = 2048           # prompt pool drawn from the source (0: the whole file)
    prompt_weights: str = ""          # "NAME=W,...": a source's share of the pool relative to the others' 1
    level: int | None = None          # built-in task difficulty (None: mixed)
    template: str = DEFAULT_TEMPLATE  # r1-zero | chat | chat-think
    prompts_per_step: int = 8         # questions per rollout
    group_size: int = 8               # G samples per question
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # loss
    policy_loss: str = "clip"         # clip (GRPO / DAPO / Dr. GRPO) | gspo | cispo (nanoseek.post.grpo_loss)
    eps_low: float = 0.2              # clip range of policy_loss = "clip"
    eps_high: float = 0.2             # DAPO's clip-higher: 0.28
    gspo_eps_low: float = 3e-4        # GSPO's sequence-ratio clip range (GSPO paper v2, section 5.1)
    gspo_eps_high: float = 4e-4
    cispo_eps_low: float = 1.0        # CISPO's IS-weight clip range; 1.0: no lower bound (MiniMax-M1)
    cispo_eps_high: float = 4.0       # the weight is capped at 1 + cispo_eps_high = 5
    beta: float = 0.0                 # KL coefficient; 0 keeps no reference model
    loss_agg: str = "grpo"            # grpo | dapo | dr_grpo
    scale_rewards: bool = True        # divide by the group std (False: Dr. GRPO)
    num_iterations: int = 1           # mu: optimisation passes (optimizer steps) per rollout
    micro_batch_size: int = 16        # sequences per forward/backward
    filter_zero_std: bool = False     # drop groups whose rewards all agree (DAPO dynamic sampling)
    max_rollout_attempts: int = 3     # rollouts to fill a filtered batch before giving up
    overlong_buffer: int = 0          # DAPO soft overlong penalty over the last N tokens (0: off)
    overlong_penalty: float = 1.0
    # rewards
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    tool_failure_penalty: float = 0.0  # subtracted from the reward per failed tool call
    # tools (nanoseek.tasks.tool_use): built-ins the prompts of tool_tasks get ("" = off), run in the rollouts
    tools: str = ""
    tool_tasks: str = ""              # task names ("": every built-in task with a tool call)
    describe_tools: bool | str = "full"  # what prompts say of the tools: full, names or none (nanoseek.tasks.tool_use)
    tool_offer: float = 1.0          # share of a partly-calling tool task's problems asked with the tools
    reward_workers: int = 4
    tokenizer: str = ""               # tokenizer directory (default: found next to the checkpoint)
    log_samples: int = 2              # completions written to samples.jsonl per rollout
    seed: int = 0

    def validate(self) -> "GRPOSection":
        def bad(name, why):
            return ValueError(f"{name} = {getattr(self, name)!r}: {why}")

        if self.template not in TEMPLATES:
            raise bad("template", f"must be one of {TEMPLATES}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise bad("loss_agg", f"must be one of {LOSS_AGGREGATIONS}")
        if self.policy_loss not in POLICY_LOSSES:
            raise bad("policy_loss", f"must be one of {tuple(POLICY_LOSSES)}")
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "num_iterations",
                     "micro_batch_size", "max_rollout_attempts"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.group_size < 2:
            raise bad("group_size", "must be >= 2 (advantages are relative to the group)")
        for prefix in ("", "gspo_", "cispo_"):      # CISPO's weight may go down to 0 (no lower bound)
            low, high = f"{prefix}eps_low", f"{prefix}eps_high"
            if not (0 <= getattr(self, low) <= 1 if prefix == "cispo_" else 0 <= getattr(self, low) < 1):
                raise bad(low, "must be in [0, 1]" if prefix == "cispo_" else "must be in [0, 1)")
            if not getattr(self, high) >= 0:
                raise bad(high, "must be >= 0")
        if self.beta < 0:
            raise bad("beta", "must be >= 0")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise bad("overlong_buffer", f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        if not GREEDY_BELOW <= self.temperature <= TEMPERATURE_MAX:
            raise bad("temperature", f"must be in [{GREEDY_BELOW}, {TEMPERATURE_MAX:g}] (below it sampling is greedy; "
                                     "GRPO needs diverse samples)")
        if self.tool_failure_penalty < 0:
            raise bad("tool_failure_penalty", "must be >= 0 (it is subtracted per failed call)")
        if self.tool_use.enabled and self.template not in ("chat", "chat-think"):
            raise bad("tools", f"tools need a chat template (chat or chat-think), not template = {self.template!r}")
        return self

    @property
    def tool_use(self):
        """The tools and the tasks that get them (:class:`~nanoseek.tasks.tool_use.ToolUse`); ValueError naming a bad name."""
        from nanoseek.tasks.tool_use import ToolUse

        try:
            return ToolUse.of(self.tools, self.tool_tasks, self.describe_tools, self.tool_offer)
        except ValueError as e:
            raise ValueError(f"tools = {self.tools!r}, tool_tasks = {self.tool_tasks!r}: {e}") from None

    def check_sources(self) -> None:
        """The prompt source, checked without a model (:func:`~nanoseek.post.stage.parse_stage_config`
        calls it): a DataError ``prompts: why`` / ``level: why`` for what ``load_rl_prompts`` would refuse."""
        with source_key("prompts"):
            specs = check_rl_source(self.prompts)
        with source_key("level"):
            check_task_level(specs, self.level)
        with source_key("prompt_weights"):
            check_prompt_weights(self.prompts, self.prompt_weights)

    @property
    def eval_mode(self) -> str:
        """The prompt template the trained model answers in (recorded in stage.json): the one it was trained in."""
        return self.template if self.template in TEMPLATES else "chat"

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high) of the chosen policy loss: its own keys (``eps_*``, ``gspo_eps_*``, ``cispo_eps_*``)."""
        prefix = "" if self.policy_loss == "clip" else f"{self.policy_loss}_"
        return getattr(self, f"{prefix}eps_low"), getattr(self, f"{prefix}eps_high")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.group_size


# ----------------------------------------------------------------------------- rollouts


@dataclass
class RolloutBatch:
    """One rollout, ready for the optimisation passes (rows group-contiguous)."""

    input_ids: torch.Tensor           # [N, T] prompt + completion, right-padded
    targets: torch.Tensor             # [N, T] next token where it is a completion token, else -100
    advantages: torch.Tensor          # [N]
    old_logp: torch.Tensor | None     # [N, T] pi_old (None when num_iterations == 1)
    ref_logp: torch.Tensor | None     # [N, T] pi_ref (None when beta == 0)
    lengths: torch.Tensor | None = None  # [N] prompt + completion tokens per row
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


class GRPOTask:
    """GRPO as a task of the shared trainer (``batches()`` / ``loss(model, batch)``).

    ``model`` is the policy the trainer optimises (the rollouts sample from it); ``reward_fn``
    defaults to the rule-based rewards of the section's template and weights (:func:`build_reward_fn`);
    ``engine`` defaults to the inference engine over ``model`` (its decode step compiled with
    ``compile``, the stage's ``[train] compile``); ``out_dir`` receives ``samples.jsonl``.
    """

    rank_sharded = True           # each rank samples its own share of the step's prompts
    independent_forwards = True   # rollouts: a different number of forwards on each rank (no EP / FSDP)

    def __init__(self, model, tokenizer, prompts: list[RLPrompt], cfg: GRPOSection,
                 reward_fn: RewardFn | None = None, engine=None, out_dir: str | Path | None = None,
                 compile: bool = False):
        self.cfg = cfg.validate()
        self.compile = compile
        if not prompts:
            raise ValueError("GRPO needs at least one prompt")
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.reward_fn = reward_fn or build_reward_fn(RewardConfig.for_template(
            cfg.template, accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight), cfg.reward_workers)
        self.out_dir = Path(out_dir) if out_dir else None
        self.tool_use = cfg.tool_use
        self.toolbox = self.tool_use.toolbox()
        if self.toolbox is not None:
            from nanoseek.tasks.tool_use import require_tool_tokens

            require_tool_tokens(tokenizer, f"[grpo] tools = {cfg.tools!r}")
        use = self.tool_use
        with_tools = [use.offers(p) for p in prompts]      # offered: described or named in the prompt, run in rollouts
        ids = [render_prompt(tokenizer, p, cfg.template, **(use.prompt_tools(p.task) if offered else {}))
               for p, offered in zip(prompts, with_tools)]
        keep = fit_prompts(model, ids, cfg.max_new_tokens, "grpo.prompts")   # before any rollout
        self.dropped = len(prompts) - len(keep)    # too long for the context with max_new_tokens
        self.prompts = prompts = [prompts[i] for i in keep]
        self.prompt_ids = [ids[i] for i in keep]
        self.with_tools = [with_tools[i] for i in keep]
        self.max_prompt_len = max(len(p) for p in self.prompt_ids)
        self.engine = engine
        self.ref_model = None
        if cfg.beta > 0:  # frozen copy of the initial policy; none at all when beta == 0
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.rollouts = 0         # rollouts done (the resumable position in the prompt stream)
        self.cursor = 0           # next prompt index

    # ------------------------------------------------------------------ sampling
    def _engine(self):
        if self.engine is None:
            from nanoseek.infer.engine import Engine

            self.engine = Engine(self.model, self.tokenizer, max_batch_size=self.cfg.rollout_size,
                                 max_seq_len=self.max_prompt_len + self.cfg.max_new_tokens + 1,
                                 compile=self.compile)
        return self.engine

    def _sampling_params(self, seed: int, tools: bool = False):
        c = self.cfg
        return sampling_params(self.tokenizer, c.template, n=c.group_size, seed=seed, max_new_tokens=c.max_new_tokens,
                               temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, tools=tools)

    def _next_prompts(self) -> list[int]:
        idx = [(self.cursor + k) % len(self.prompts) for k in range(self.cfg.prompts_per_step)]
        self.cursor = (self.cursor + self.cfg.prompts_per_step) % len(self.prompts)
        return idx

    def _rank_world(self) -> tuple[int, int]:
        from nanoseek.train.distributed import rank_world

        rank, world = rank_world()
        if world > self.cfg.prompts_per_step:
            raise ValueError(f"[grpo] prompts_per_step = {self.cfg.prompts_per_step} is smaller than the number of "
                             f"ranks ({world}): every rank needs at least one whole group of prompts")
        return rank, world

    @torch.no_grad()
    def sample(self, prompt_idx: list[int]) -> tuple[list[list[int]], list[str], list[bool], float]:
        """G completions per prompt: (token ids, texts, truncated flags) group-contiguous, seconds.

        The engine runs the model in eval mode (prefill on the naive MLA path, decoding on the
        absorbed one) and restores its training mode and attention path afterwards. The token ids
        include the EOS that ended a completion: the policy learns to stop. The prompts that get
        tools run through the engine's tool loop; :attr:`last_masks` / :attr:`last_tools` hold
        each completion's model mask and (calls, failed calls).
        """
        c = self.cfg
        rank, world = self._rank_world()
        seed = (c.seed * 1_000_003 + self.rollouts) * world + rank
        samples = sample_mixed(self._engine(), [self.prompt_ids[i] for i in prompt_idx],
                               [self.with_tools[i] for i in prompt_idx], self._sampling_params(seed),
                               self._sampling_params(seed, tools=True) if self.toolbox is not None else None,
                               c.template, toolbox=self.toolbox, tokenizer=self.tokenizer)
        ids, truncated, self.last_masks, self.last_tools = [], [], [], []
        for group in samples.groups:
            if len(group) != c.group_size:
                raise RuntimeError(f"engine returned {len(group)} completions for a prompt, expected {c.group_size}")
            for comp in group:
                ids.append(list(comp.token_ids))
                truncated.append(comp.finish_reason == "length")
                mask = model_mask(comp)
                if len(mask) != len(ids[-1]):
                    raise RuntimeError(f"engine returned a model_mask of {len(mask)} for {len(ids[-1])} tokens")
                self.last_masks.append(mask)
                self.last_tools.append(tool_counts(comp))
        return ids, samples.texts, truncated, samples.seconds

    # ------------------------------------------------------------------ one rollout
    def rollout(self) -> RolloutBatch:
        """Sample, score and batch one GRPO step (with dynamic sampling when filtering)."""
        c, G = self.cfg, self.cfg.group_size
        rank, world = self._rank_world()
        share = len(range(rank, c.prompts_per_step, world)) * G     # this rank's rows of the step
        if self.ref_model is not None:  # follow the policy to the trainer's device
            self.ref_model.to(next(self.model.parameters()).device)
        kept: list[tuple[list[int], list[int], float, list[int]]] = []   # (prompt, completion, advantage, mask)
        stats_acc: dict[str, list[float]] = {}
        all_rows: list[tuple[list[int], list[int], float, list[int]]] = []
        gen_tokens, gen_seconds, attempts = 0, 0.0, 0
        while attempts < (c.max_rollout_attempts if c.filter_zero_std else 1):
            attempts += 1
            pidx = self._next_prompts()[rank::world]
            self.last_masks, self.last_tools = [], []
            comp_ids, texts, truncated, seconds = self.sample(pidx)
            masks = self.last_masks or [[1] * len(x) for x in comp_ids]
            calls = self.last_tools or [(0, 0)] * len(comp_ids)
            items = [self.prompts[i] for i in pidx for _ in range(G)]
            results = self.reward_fn(texts, items)
            lengths = torch.tensor([len(x) for x in comp_ids], dtype=torch.float)
            rewards = torch.tensor([float(r.reward) for r in results])
            rewards = rewards + overlong_penalty(lengths, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
            rewards = rewards - c.tool_failure_penalty * torch.tensor([float(f) for _, f in calls])
            adv = group_advantages(rewards, G, c.scale_rewards)
            zero = zero_std_groups(rewards, G)
            gen_tokens += int(lengths.sum())
            gen_seconds += seconds
            for key, val in (("reward", rewards), ("accuracy", [float(r.correct) for r in results]),
                             ("format", [float(r.format_ok) for r in results]), ("length", lengths),
                             ("truncated", [float(t) for t in truncated]), ("zero_std", zero.float()),
                             ("tool_calls", [float(n) for n, _ in calls]), ("tool_failed", [float(f) for _, f in calls]),
                             ("tool_used", [float(n > 0) for n, _ in calls])):
                stats_acc.setdefault(key, []).extend(torch.as_tensor(val, dtype=torch.float).tolist())
            for g in range(len(pidx)):
                rows = range(g * G, (g + 1) * G)
                group = [(self.prompt_ids[pidx[g]], comp_ids[i], float(adv[i]), masks[i]) for i in rows]
                all_rows += group
                if not (c.filter_zero_std and zero[g]):
                    kept += group
            if rank == 0:
                self._log_samples(pidx, texts, results, calls)
            self.rollouts += 1
            if len(kept) >= share:
                break
        if world > 1:  # keep the prompt cursors in step: advance as far as the rank that sampled most
            from nanoseek.train.distributed import all_reduce_values

            most = int(all_reduce_values([attempts], "max", next(self.model.parameters()).device)[0])
            for _ in range(most - attempts):
                self._next_prompts()
                self.rollouts += 1
        if not kept:  # every group agreed in every attempt: only the KL term can act
            kept = all_rows[-share:]
        kept = kept[:share]
        batch = self._tensors(kept)
        s = stats_acc
        reward = torch.tensor(s["reward"])
        batch.stats = {
            "reward_mean": float(reward.mean()), "reward_std": float(reward.std()) if len(reward) > 1 else 0.0,
            "accuracy": _mean(s["accuracy"]), "format_rate": _mean(s["format"]),
            "response_len_mean": _mean(s["length"]), "response_len_max": max(s["length"]),
            "truncated_frac": _mean(s["truncated"]), "zero_std_frac": _mean(s["zero_std"]),
            "rollout_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9), "rollout_s": gen_seconds,
            "rollout_attempts": attempts, "kept_sequences": len(kept),
        }
        if self.toolbox is not None:
            batch.stats.update({"tool_calls_mean": _mean(s["tool_calls"]), "tool_use_rate": _mean(s["tool_used"]),
                                "tool_failed_mean": _mean(s["tool_failed"])})
        return batch

    def _tensors(self, rows: list[tuple[list[int], list[int], float, list[int]]]) -> RolloutBatch:
        seqs, targets = [], []
        for prompt, comp, _, mask in rows:
            seq = prompt + comp
            # position t predicts seq[t + 1]; the tool loop's tokens (mask 0) are context, never targets
            tgt = [IGNORE] * (len(prompt) - 1) + [t if m else IGNORE for t, m in zip(comp, mask)] + [IGNORE]
            seqs.append(seq)
            targets.append(tgt)
        T = max(len(s) for s in seqs)
        input_ids = pad_rows(seqs, self.tokenizer.pad_id, T)
        tgt = pad_rows(targets, IGNORE, T)
        adv = torch.tensor([row[2] for row in rows], dtype=torch.float)
        lengths = torch.tensor([len(s) for s in seqs])
        old = self._logprobs(self.model, input_ids, tgt, lengths) if self.cfg.num_iterations > 1 else None
        ref = self._logprobs(self.ref_model, input_ids, tgt, lengths) if self.ref_model is not None else None
        return RolloutBatch(input_ids, tgt, adv, old, ref, lengths)

    def _micro_batches(self, lengths: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """The rows of each micro-batch and its length: rows of similar length together, each
        micro-batch cropped to its longest row (less padding through the forward and backward).
        The training passes and the old / reference log-prob passes use the same plan, so a row is
        scored in the same company and padding as it is trained in."""
        n = lengths.shape[0]
        k = math.ceil(n / self.cfg.micro_batch_size)
        bounds = [round(i * n / k) for i in range(k + 1)]
        order = torch.argsort(lengths, stable=True)
        return [(order[a:b], int(lengths[order[a:b]].max())) for a, b in zip(bounds[:-1], bounds[1:])]

    @torch.no_grad()
    def _logprobs(self, model, input_ids: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log pi(target) [N, T] of ``model`` (the policy before the update, or the reference)
        over the micro-batches of :meth:`_micro_batches`; 0 past each row's micro-batch length."""
        device = next(model.parameters()).device
        out = torch.zeros(input_ids.shape, dtype=torch.float)
        with eval_mode(model):  # no MoE load counting, same function as in training (no dropout anywhere)
            for rows, T in self._micro_batches(lengths):
                lp, _ = sequence_logprobs(model, input_ids[rows, :T].to(device), targets[rows, :T].to(device))
                out[rows, :T] = lp.float().cpu()
        return out

    def _log_samples(self, pidx: list[int], texts: list[str], results: list[Any],
                     calls: list[tuple[int, int]] | None = None) -> None:
        if not self.out_dir or self.cfg.log_samples <= 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from nanoseek.atomic import open_append

        with open_append(self.out_dir / "samples.jsonl") as fh:
            for k in range(min(self.cfg.log_samples, len(texts))):
                item = self.prompts[pidx[k // self.cfg.group_size]]
                fh.write(json.dumps({"rollout": self.rollouts, "prompt": item.prompt, "answer": item.answer,
                                     "completion": texts[k], "reward": float(results[k].reward),
                                     "correct": bool(results[k].correct),
                                     **({"tool_calls": calls[k][0], "tool_failed": calls[k][1]} if calls and calls[k][0]
                                        else {})}, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ the trainer's interface
    def passes(self, batch: RolloutBatch) -> Iterator[list[dict[str, Any]]]:
        """The ``num_iterations`` passes over ``batch``: each is one optimizer step, a list of
        micro-batches of at most ``micro_batch_size`` rows (the trainer takes a list as a whole step)."""
        n = batch.input_ids.shape[0]
        # micro-batches of rows of similar length, each cropped to its longest (every micro-batch
        # loss is normalised by the whole step, so which rows share one changes nothing but the
        # order of the gradient's sums)
        plan = self._micro_batches(batch.lengths)
        from nanoseek.train.distributed import all_reduce_values

        # normalisers of the whole step, over all ranks (one process: this batch's)
        total_seq, total_tok = all_reduce_values([n, batch.num_tokens], "sum", next(self.model.parameters()).device)
        norm = {"total_sequences": int(total_seq), "total_tokens": int(total_tok)}
        for it in range(self.cfg.num_iterations):
            step = []
            for rows, T in plan:
                step.append({"input_ids": batch.input_ids[rows, :T], "targets": batch.targets[rows, :T],
                             "advantages": batch.advantages[rows], "rows": rows,
                             "old_logp": None if batch.old_logp is None else batch.old_logp[rows, :T],
                             "ref_logp": None if batch.ref_logp is None else batch.ref_logp[rows, :T],
                             "iteration": it, "stats": batch.stats, **norm})
            yield step

    def batches(self):
        return _Batches(self)

    # every micro-batch loss is already normalised by the whole step (see grpo_loss.aggregate)
    micro_batch_reduction = "sum"

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        device = next(model.parameters()).device
        targets = batch["targets"].to(device)
        logp, entropy = sequence_logprobs(model, batch["input_ids"].to(device), targets, with_entropy=True)
        mask = targets != IGNORE
        old = batch["old_logp"].to(device) if batch["old_logp"] is not None else logp.detach()
        ref = batch["ref_logp"].to(device) if batch["ref_logp"] is not None else None
        eps_low, eps_high = c.clip_range
        out = grpo_loss(logp, old, batch["advantages"].to(device), mask, ref_logp=ref, beta=c.beta,
                        eps_low=eps_low, eps_high=eps_high, loss_agg=c.loss_agg, max_len=c.max_new_tokens,
                        total_sequences=batch["total_sequences"], total_tokens=batch["total_tokens"],
                        policy_loss=c.policy_loss)
        n = mask.sum().clamp(min=1)
        metrics = {**batch["stats"], "clip_frac": float(out.clip_frac), "clip_low_frac": float(out.clip_low_frac),
                   "clip_high_frac": float(out.clip_high_frac), "kl": float(out.kl),
                   "ratio_mean": float(out.ratio_mean), "entropy": float((entropy * mask).sum() / n),
                   "tokens": int(mask.sum())}
        return out.loss, metrics

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, int]:
        return {"rollouts": self.rollouts, "cursor": self.cursor, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_prompts") != len(self.prompts):
            raise ValueError(f"GRPO state is for {state.get('num_prompts')} prompts, this run has {len(self.prompts)}")
        self.rollouts, self.cursor = int(state["rollouts"]), int(state["cursor"])


class _Batches:
    """Endless optimizer steps (lists of micro-batches): a new rollout whenever the
    ``num_iterations`` passes over the previous one are done.

    The checkpointed state is the rollout position; resuming mid-rollout starts a fresh rollout
    (the old one's samples are not stored), so a resumed run sees new samples, not the same ones.
    """

    def __init__(self, task: GRPOTask):
        self.task = task
        self._current: Iterator[list[dict[str, Any]]] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        while True:
            if self._current is None:
                self._current = self.task.passes(self.task.rollout())
            try:
                return next(self._current)
            except StopIteration:
                self._current = None

    def state_dict(self) -> dict:
        return self.task.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state)
        self._current = None


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def train_grpo(cfg, *, model=None, tokenizer=None, prompts: list[RLPrompt] | None = None,
               reward_fn: RewardFn | None = None, engine=None, resume: bool | str = False, quiet: bool = False,
               progress: bool | None = None):
    """Run a GRPO stage (a StageConfig of kind "grpo"; ``[grpo]`` is a :class:`GRPOSection`).

    ``[train] max_steps`` counts optimizer steps: ``num_iterations`` per rollout. ``model`` /
    ``tokenizer`` / ``prompts`` / ``reward_fn`` / ``engine`` override what the config names.
    Returns the StageResult (its history holds the per-step rollout and loss metrics).
    """
    from .datasets import load_rl_prompts
    from .stage import check_vocab, load_model, load_tokenizer_for, run_trainer

    g = cfg.algo
    ckpt = None
    if model is None:
        model, ckpt = load_model(cfg.model, cfg.train.device)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(ckpt, getattr(g, "tokenizer", ""))
    check_vocab(model, tokenizer)
    if prompts is None:
        prompts = load_rl_prompts(g.prompts, g.num_prompts, "train", g.seed, g.level, g.prompt_weights)
    model.use_mtp = False  # the policy-gradient loss only
    run_dir = Path(cfg.train.out_dir or "runs/grpo")
    task = GRPOTask(model, tokenizer, prompts, g, reward_fn=reward_fn, engine=engine, out_dir=run_dir,
                    compile=cfg.train.compile)
    if task.dropped and not quiet:
        print(f"grpo: {task.dropped} of {len(prompts)} prompts dropped: longer than the model's context "
              f"({model.config.max_position_embeddings} tokens) less max_new_tokens={g.max_new_tokens}", flush=True)
    return run_trainer(model, task, cfg, tokenizer, resume=resume, quiet=quiet, progress=progress,
                       extra={"prompts": len(task.prompts), "prompts_dropped": task.dropped})


__all__ = ["GRPOSection", "train_grpo", "GRPOTask", "RolloutBatch"]
