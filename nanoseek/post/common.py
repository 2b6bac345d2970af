"""Pieces shared by the post-training trainers: tokenised chat rows, padding, log-probs, batching.

* :func:`chat_row` turns a conversation into ``(input_ids, labels)`` with next-token labels on
  the assistant tokens only (``-100`` elsewhere), from the tokenizer's ``encode_chat`` mask.
* :func:`response_row` does the same with targets on the final response only (DPO).
* :func:`pad_rows` right-pads rows into a batch. Right padding needs no attention mask: the model
  is causal, so padding after a sequence never changes the logits of the sequence's own tokens.
* :func:`sequence_logprobs` runs the model and gathers log pi(target) per position (SFT, DPO
  and GRPO all score sequences this way); :func:`eval_mode` holds a model in eval mode for a
  rollout or a scoring pass.
* :class:`IndexStream` is a resumable, seeded, epoch-shuffled stream of example indices with
  ``state_dict``/``load_state_dict``, what the shared trainer checkpoints to resume exactly.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

IGNORE = -100


def chat_row(tokenizer, messages: Sequence[dict[str, Any]], max_len: int | None = None,
             tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one chat; labels[t] is the target of position t.

    labels[t] = ids[t + 1] when token t + 1 was written by the assistant (``encode_chat``'s
    mask: a tool's output is never a target), else -100; the last position has no target.
    ``max_len`` truncates on the right; ``tools``: the function definitions the system turn
    describes (:func:`nanoseek.tasks.reply.encode_chat_tools`).
    """
    from nanoseek.tasks.reply import encode_chat_tools

    ids, mask = encode_chat_tools(tokenizer, messages, tools)
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, mask = ids[:max_len], mask[:max_len]
    labels = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, labels, truncated


def response_row(tokenizer, prompt: Sequence[dict[str, Any]], response: dict[str, Any],
                 max_len: int | None = None) -> tuple[list[int], list[int], bool]:
    """:func:`chat_row` of ``prompt + [response]`` with targets on the final response only (earlier
    assistant turns of a multi-turn prompt are context here, as DPO scores one response)."""
    ids, labels, truncated = chat_row(tokenizer, list(prompt) + [response], max_len)
    # the response's first token: where the prompt with its generation prompt parts from the chat
    # (its length for templates whose generation prompt is the start of the turn; R1's ends in
    # "<think>\n" where the answer follows "<｜Assistant｜>" directly)
    head = tokenizer.encode_chat(list(prompt), add_generation_prompt=True)[0]
    start = next((k for k, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
    labels = [IGNORE if t < start - 1 else lab for t, lab in enumerate(labels)]
    return ids, labels, truncated


def pad_rows(rows: Sequence[Sequence[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """Right-pad integer rows to ``length`` (default: the longest) -> [B, length] long tensor."""
    n = length or max(len(r) for r in rows)
    out = torch.full((len(rows), n), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def sequence_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(targets[t] | input_ids[:t+1]) per position [B, T] (targets -100 give 0), and
    optionally the per-position entropy (detached; 0 where the target is -100).

    The output head and its log-softmax run at the target positions only: the model returns its
    final hidden states, ``lm_head`` and one fp32 ``log_softmax`` (shared by the entropy) see the
    [N, d] rows that have a target (prompt and padding positions make no logits at all), and the
    results are scattered back to [B, T]. For a GRPO rollout a third of the positions are prompt
    or padding; the [B, T, V] logits were the largest tensors of the update. When ``model`` is a
    compiled module (the training step of ``[train] compile = true``) the head is compiled too
    (:func:`head_for`)."""
    keep = targets != IGNORE                                                  # [B, T]
    h = model(input_ids, logits_to_keep=1, return_hidden=True).hidden         # [B, T, d] final (normed)
    lp, ent = head_for(model)(model.lm_head, h[keep], targets[keep], with_entropy)
    logp = lp.new_zeros(targets.shape)
    logp[keep] = lp
    entropy = None
    if with_entropy:
        entropy = lp.new_zeros(targets.shape)
        entropy[keep] = ent
    return logp, entropy


def head_logprobs(lm_head, h: torch.Tensor, targets: torch.Tensor,
                  with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows h [N, d] with their targets [N] -> (log pi(target) [N] fp32, entropy [N] detached or None)."""
    lp = torch.log_softmax(lm_head(h).float(), dim=-1)
    logp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(lp.exp() * lp).sum(-1)
    return logp, entropy


_compiled_head = None


def head_for(model):
    """:func:`head_logprobs`, compiled (one process-wide ``torch.compile``, dynamic row counts) when
    ``model`` is a compiled module: a compiled training step's log-softmax, gather and entropy then
    run as fused kernels forward and backward, not as passes over the [N, V] logits (GRPO's compiled
    update 1.4x faster in its head, benchmarks/bench_grpo.py). The eager model (the step's fallback
    after a compiler failure, scoring passes, DDP) keeps the eager head."""
    global _compiled_head
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")        # imported by any torch.compile
    if eval_frame is None or not isinstance(model, eval_frame.OptimizedModule):
        return head_logprobs
    if _compiled_head is None:
        _compiled_head = torch.compile(head_logprobs, dynamic=True)
    return _compiled_head


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Inside, ``model`` is in eval mode (no MoE load counting: sampling and scoring are not
    training); its mode is restored on exit. One switch around a whole rollout or scoring pass,
    not one per engine step (a mode switch walks every module)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class IndexStream:
    """Endless stream of batches of example indices, reshuffled every epoch; resumable.

    The order of epoch e is a fixed permutation seeded by (seed, e), so the state is just
    (epoch, position) and resuming reproduces the exact same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError("IndexStream needs at least one example")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.pos)
            out += self._order[self.pos:self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise ValueError(f"data stream state is for {state.get('n')} examples / seed {state.get('seed')}, "
                             f"this run has {self.n} / seed {self.seed}: the data changed since the checkpoint")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)


class StreamBatches:
    """The trainer's batch iterator over an :class:`IndexStream`: ``make_batch(indices)`` builds
    each micro-batch; the state checkpointed is the stream's position."""

    def __init__(self, stream: IndexStream, make_batch):
        self.stream, self.make_batch = stream, make_batch

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self):
        return self.make_batch(self.stream.next_indices())

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


__all__ = ["IGNORE", "chat_row", "response_row", "pad_rows", "sequence_logprobs", "eval_mode", "IndexStream", "StreamBatches"]
