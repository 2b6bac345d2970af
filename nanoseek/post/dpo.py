"""Direct Preference Optimisation (Rafailov et al. 2023) against a frozen reference model.

For a prompt x with a chosen response y_w and a rejected one y_l, with the implicit rewards
r(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x)) (log-probs summed over the response tokens):

    L_DPO = -log sigmoid(r(y_w) - r(y_l))

(with ``label_smoothing`` eps, the conservative variant: -(1-eps) log s(z) - eps log s(-z)).
The reference is the policy at the start of training: its log-probs of every pair are computed
once, before the first step, and the reference model is then freed, so training holds one model.
Logged per step: the loss, the mean chosen / rejected rewards, the margin r_w - r_l and the
accuracy (share of pairs with r_w > r_l).

Pairs come from a JSONL file (see :mod:`nanoseek.post.datasets`) or are built from the current
model by :func:`auto_pairs`: G samples per RL prompt (:func:`nanoseek.post.rollout.sample_and_score`,
the sampler GRPO and distillation share), scored by the verifiers; a
correct, well-formed sample becomes ``chosen`` and a wrong one ``rejected`` (prompts where all
samples agree give no pair); a sample's leading ``<think>`` block becomes the message's
``reasoning``, because message content is always text (only the template makes control tokens).

:class:`DPOTask` plugs into the shared trainer (``batches()`` / ``loss(model, batch)``);
:func:`train_dpo` is the whole stage from a config with a ``[dpo]`` table (:class:`DPOSection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .common import IGNORE, IndexStream, StreamBatches, eval_mode, pad_rows, response_row, sequence_logprobs
from .datasets import DataError, PreferenceExample, check_file, check_rl_source, source_key


# ----------------------------------------------------------------------------- the loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over pairs from summed response log-probs [N] each; metrics are detached."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    metrics = {
        "reward_chosen": chosen_reward.detach().mean(),
        "reward_rejected": rejected_reward.detach().mean(),
        "reward_margin": z.detach().mean(),
        "reward_accuracy": (z.detach() > 0).float().mean(),
    }
    return losses.mean(), metrics


# ----------------------------------------------------------------------------- config


@dataclass
class DPOSection:
    """The ``[dpo]`` table. Rows are at most ``[optim] seq_len`` tokens; a micro-batch is
    ``[optim] micro_batch_size`` pairs."""

    data: str = ""                    # preferences JSONL, or "auto:<RL prompt source>" to build pairs
    beta: float = 0.1
    label_smoothing: float = 0.0
    tokenizer: str = ""               # tokenizer directory (default: found next to the checkpoint)
    seed: int = 0
    # automatic pairs ("auto:..."): verifier-labelled samples of the starting model
    auto_prompts: int = 64            # prompts drawn from the source
    auto_samples: int = 8             # samples per prompt
    auto_max_new_tokens: int = 128
    auto_temperature: float = 1.0
    auto_top_p: float = 0.95
    template: str = "chat"            # chat | chat-think (pairs are chats)

    def validate(self) -> "DPOSection":
        if self.beta <= 0:
            raise ValueError(f"beta = {self.beta}: must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing = {self.label_smoothing}: must be in [0, 0.5)")
        if self.template not in ("chat", "chat-think"):
            raise ValueError(f"template = {self.template!r}: must be 'chat' or 'chat-think' (pairs are chats)")
        if not 0 < self.auto_top_p <= 1:
            raise ValueError(f"auto_top_p = {self.auto_top_p}: must be in (0, 1]")
        if self.auto_samples < 2 or self.auto_prompts < 1:
            raise ValueError("auto_samples must be >= 2 and auto_prompts >= 1")
        return self

    @property
    def eval_mode(self) -> str:
        """The prompt template the trained model answers in (recorded in stage.json): the chat template."""
        return "chat"

    def check_sources(self) -> None:
        """The data source, checked without a model (:func:`~nanoseek.post.stage.parse_stage_config`
        calls it): a preferences file that exists, or ``auto:`` with an RL prompt source that loads."""
        if self.data:          # empty: the caller passes the pairs (else train_dpo refuses it)
            with source_key("data"):
                if self.data.startswith("auto:"):
                    check_rl_source(self.data[len("auto:"):])
                else:
                    check_file(self.data)


# ----------------------------------------------------------------------------- data


@dataclass
class PairRows:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def encode_pairs(tokenizer, pairs: list[PreferenceExample], max_seq_len: int) -> tuple[list[PairRows], int]:
    """Tokenise pairs; returns the rows and how many were truncated to ``max_seq_len``.

    A pair whose response is cut away entirely by truncation (its prompt alone is too long)
    raises: it would contribute nothing and distort the statistics.
    """
    rows, truncated = [], 0
    for p in pairs:
        ci, cl, ct = response_row(tokenizer, p.prompt, p.chosen, max_seq_len)
        ri, rl, rt = response_row(tokenizer, p.prompt, p.rejected, max_seq_len)
        if all(x == IGNORE for x in cl) or all(x == IGNORE for x in rl):
            raise DataError(f"{p.where or 'pair'}: the prompt fills max_seq_len={max_seq_len}; no response "
                            "token left (raise max_seq_len or shorten the prompt)")
        truncated += bool(ct or rt)
        rows.append(PairRows(ci, cl, ri, rl))
    return rows, truncated


def _batch(rows: list[PairRows], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]     # chosen first, then rejected
    labels = [r.chosen_labels for r in rows] + [r.rejected_labels for r in rows]
    n = max(len(x) for x in ids)
    return {
        "input_ids": pad_rows(ids, pad_id, n),
        "labels": pad_rows(labels, IGNORE, n),
        "ref_chosen": torch.tensor([r.ref_chosen for r in rows]),
        "ref_rejected": torch.tensor([r.ref_rejected for r in rows]),
    }


@torch.no_grad()
def compute_reference_logps(model, rows: list[PairRows], pad_id: int, micro_batch_size: int) -> None:
    """Fill ``ref_chosen`` / ``ref_rejected`` of every row with the model's summed log-probs."""
    device = next(model.parameters()).device
    with eval_mode(model):
        for i in range(0, len(rows), micro_batch_size):
            chunk = rows[i:i + micro_batch_size]
            b = _batch(chunk, pad_id)
            logp, _ = sequence_logprobs(model, b["input_ids"].to(device), b["labels"].to(device))
            seq = logp.sum(dim=1).float().cpu()
            for k, r in enumerate(chunk):
                r.ref_chosen, r.ref_rejected = float(seq[k]), float(seq[len(chunk) + k])


class DPOTask:
    """DPO as a task of the shared trainer: batches of pairs with cached reference log-probs."""

    def __init__(self, rows: list[PairRows], pad_id: int, micro_batch_size: int, beta: float,
                 label_smoothing: float = 0.0, seed: int = 0):
        self.rows, self.pad_id, self.beta, self.label_smoothing = rows, pad_id, beta, label_smoothing
        self.stream = IndexStream(len(rows), micro_batch_size, seed)

    def batches(self):
        return StreamBatches(self.stream, lambda idx: _batch([self.rows[i] for i in idx], self.pad_id))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        logp, _ = sequence_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device))
        seq = logp.sum(dim=1)
        n = batch["ref_chosen"].shape[0]
        loss, m = dpo_loss(seq[:n], seq[n:], batch["ref_chosen"].to(device), batch["ref_rejected"].to(device),
                           self.beta, self.label_smoothing)
        metrics = {k: float(v) for k, v in m.items()}
        metrics["tokens"] = int((batch["labels"] != IGNORE).sum())
        return loss, metrics


# ----------------------------------------------------------------------------- pairs from verifiers


def pairs_from_scored(prompt_messages: list[dict[str, Any]], samples: list[tuple[str, Any]],
                      meta: dict[str, Any] | None = None) -> PreferenceExample | None:
    """One pair from ``samples`` [(response text, RewardResult)] of one prompt, or None.

    Chosen: the highest-reward sample that is correct and well formed; rejected: the lowest-
    reward sample that is not correct. None when the samples do not contain both kinds.
    """
    good = [(t, r) for t, r in samples if r.correct and r.format_ok]
    bad = [(t, r) for t, r in samples if not (r.correct and r.format_ok)]
    if not good or not bad:
        return None
    chosen = max(good, key=lambda s: s[1].reward)[0]
    rejected = min(bad, key=lambda s: s[1].reward)[0]
    if chosen == rejected:
        return None
    return PreferenceExample(prompt=prompt_messages, chosen=_assistant(chosen), rejected=_assistant(rejected),
                             meta=meta or {}, where="auto")


def _assistant(text: str) -> dict[str, Any]:
    """A sampled response as an assistant message: a leading think block goes to ``reasoning``, so
    the template renders its ``<think>`` tags as the control tokens the model wrote (content is text)."""
    from nanoseek.tasks.reply import split_leading_think

    reasoning, answer = split_leading_think(text)
    return {"role": "assistant", "content": text} if reasoning is None else \
        {"role": "assistant", "reasoning": reasoning, "content": answer}


def auto_pairs(model, tokenizer, a: DPOSection, reward_fn=None) -> tuple[list[PreferenceExample], dict[str, Any]]:
    """Preference pairs from verifier-labelled samples of ``model`` on the prompts of ``a.data``
    (``auto:SOURCE``); ``reward_fn`` defaults to the rule-based verifiers."""
    from .datasets import load_rl_prompts
    from .rollout import sample_and_score

    prompts = load_rl_prompts(a.data[len("auto:"):], a.auto_prompts, seed=a.seed)
    scored, report = sample_and_score(model, tokenizer, prompts, a.auto_samples, template=a.template,
                                      max_new_tokens=a.auto_max_new_tokens, temperature=a.auto_temperature,
                                      top_p=a.auto_top_p, seed=a.seed, reward_fn=reward_fn)
    pairs = []
    for item, samples in zip(prompts, scored):
        p = pairs_from_scored([{"role": "user", "content": item.prompt}], [(s.text, s.result) for s in samples],
                              {"id": item.id, "task": item.task})
        if p is not None:
            pairs.append(p)
    return pairs, {**report.as_dict(), "pairs": len(pairs)}


def train_dpo(cfg, *, model=None, tokenizer=None, pairs: list[PreferenceExample] | None = None, reward_fn=None,
              resume: bool | str = False, quiet: bool = False, progress: bool | None = None):
    """Run a DPO stage (a StageConfig of kind "dpo"); the reference is the starting model, whose
    log-probs of every pair are computed once before training. Returns the StageResult."""
    from .datasets import read_preferences
    from .stage import check_vocab, load_model, load_tokenizer_for, run_trainer

    a, o = cfg.algo, cfg.optim
    ckpt = None
    if model is None:
        model, ckpt = load_model(cfg.model, cfg.train.device)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(ckpt, a.tokenizer)
    check_vocab(model, tokenizer)
    extra: dict[str, Any] = {}
    if pairs is None:
        if a.data.startswith("auto:"):
            pairs, extra["auto"] = auto_pairs(model, tokenizer, a, reward_fn)
            if not quiet:
                print(f"dpo: built {len(pairs)} pairs from {extra['auto']['samples']} verifier-labelled samples")
            if not pairs:
                raise DataError("dpo: no preference pair: the model's samples were all right or all wrong on every "
                                "prompt; use more auto_prompts / auto_samples or other prompts")
        elif a.data:
            pairs = read_preferences(a.data)
        else:
            raise DataError(f"{cfg.source}: [dpo] data is empty: give a preferences JSONL or auto:<prompts>")
    rows, truncated = encode_pairs(tokenizer, pairs, o.seq_len)
    compute_reference_logps(model, rows, tokenizer.pad_id, o.micro_batch_size)
    model.use_mtp = False
    task = DPOTask(rows, tokenizer.pad_id, o.micro_batch_size, a.beta, a.label_smoothing, a.seed)
    extra.update({"pairs": len(rows), "truncated": truncated})
    return run_trainer(model, task, cfg, tokenizer, resume=resume, quiet=quiet, progress=progress, extra=extra)


__all__ = ["dpo_loss", "DPOSection", "auto_pairs", "train_dpo", "DPOTask", "PairRows", "encode_pairs", "compute_reference_logps",
           "pairs_from_scored"]
