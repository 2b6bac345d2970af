"""Bits per byte on held-out text: a loss that compares models across tokenizers.

The trainer's validation metric (``val_bpb``) and ``nanoseek eval --data``'s: it lives with the
trainer, the lower of its two users.

Cross-entropy per token depends on the vocabulary (a tokenizer with longer tokens has fewer,
harder tokens). Bits per byte divides the total loss by the UTF-8 bytes the target tokens stand
for instead: ``bpb = sum(nats) / ln 2 / sum(bytes)``. A token's byte count is the length of its
byte-level string (:func:`token_byte_lengths`, the same table the trainer's
``val_bpb`` uses; 1 for the byte tokenizer's ids 0-255), and special tokens (BOS, EOS, role and
think markers) count 0 bytes: their targets are left out of both sums, so a model is not scored on
predicting document boundaries. :func:`bpb_sums` is that rule, and the one place it lives: the
trainer's ``val_bpb`` (``nanoseek.train.pretrain``) uses it too, so the two figures agree on the
same text. Bits per byte needs a tokenizer: a run on synthetic token ids (no bytes behind them)
reports ``val_loss`` only, never a ``val_bpb``.

Text comes from the ``val`` split of a prepared data directory (``nanoseek data prepare``) or
from token-id documents passed in. Documents (each starting with BOS) are concatenated in order
and cut into rows of ``seq_len + 1`` tokens, back to back, exactly like the pre-training loader
without the shuffle, up to ``max_tokens`` target tokens; the main model's next-token loss only
(no MTP). Deterministic: the same data and budget give the same rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class BpbResult:
    bpb: float            # bits per UTF-8 byte
    loss: float           # mean nats per scored token
    tokens: int           # scored target tokens (special tokens excluded)
    bytes: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of every token id [V]: the length of its byte-level string, 0 for special tokens."""
    n = tokenizer.vocab_size
    out = torch.zeros(n, dtype=torch.long)
    special = set(getattr(tokenizer, "special_ids", ()))
    for i in range(n):
        if i not in special:
            out[i] = len(tokenizer.id_to_token(i) or "")
    return out


def token_bytes_table(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of every token id ``[V]`` (0 for special tokens), padded with 0 to ``vocab_size``."""
    if hasattr(tokenizer, "id_to_token"):
        table = token_byte_lengths(tokenizer)
    else:  # the byte stand-in (nanoseek.data.bytetok): ids 0-255 are single bytes, the rest special
        n = int(tokenizer.vocab_size)
        table = torch.zeros(n, dtype=torch.long)
        table[:min(n, 256)] = 1
    if vocab_size is not None and vocab_size > len(table):
        table = torch.cat([table, torch.zeros(vocab_size - len(table), dtype=torch.long)])
    return table


def bpb_sums(logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int, int]:
    """(nats, tokens, bytes) of next-token predictions, over the targets that stand for text:
    ``logits [..., V]``, ``targets [...]`` (-100: ignored), ``token_bytes [>=V]`` bytes per id;
    targets worth 0 bytes (special tokens) are left out of all three sums."""
    y = targets.reshape(-1)
    valid = y != -100
    b = torch.zeros_like(y)
    b[valid] = token_bytes.to(y.device)[y[valid]]
    keep = b > 0
    if not bool(keep.any()):
        return 0.0, 0, 0
    flat = logits.reshape(-1, logits.shape[-1])[keep].float()
    nll = F.cross_entropy(flat, y[keep], reduction="sum")
    return float(nll), int(keep.sum()), int(b.sum())


def _val_documents(data_dir: str | Path, tokenizer, split: str) -> Iterator[Sequence[int]]:
    from nanoseek.data.shards import ShardSet

    shards = ShardSet(data_dir, split, tokenizer=tokenizer if hasattr(tokenizer, "hash") else None, verify="size")
    return (shards.document(i) for i in range(len(shards)))


@torch.no_grad()
def bits_per_byte(model, source: str | Path | Sequence[Sequence[int]], tokenizer=None,
                  token_bytes: torch.Tensor | None = None, seq_len: int = 256, max_tokens: int = 32768,
                  batch_size: int = 8, split: str = "val") -> BpbResult:
    """Bits per byte of ``model`` on ``source``: a prepared data directory (its ``split``) or a list
    of token-id documents. ``token_bytes`` ([V] bytes per id) defaults to the tokenizer's table."""
    if token_bytes is None:
        if tokenizer is None:
            raise ValueError("bits_per_byte needs a tokenizer or a token_bytes table to count bytes")
        token_bytes = token_bytes_table(tokenizer, model.config.vocab_size)
    if isinstance(source, (str, Path)):
        docs, name = _val_documents(source, tokenizer, split), f"{source} ({split})"
    else:
        docs, name = source, "token documents"
    max_pos = getattr(model.config, "max_position_embeddings", seq_len)
    seq_len = min(seq_len, max_pos)
    want_rows = max(1, max_tokens // seq_len)
    pieces, have = [], 0
    for d in docs:                                  # only as many documents as the budget needs
        if have >= want_rows * seq_len + 1:
            break
        pieces.append(torch.as_tensor(np.asarray(d, dtype=np.int64)))
        have += len(pieces[-1])
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    rows = min((len(stream) - 1) // seq_len, want_rows)
    if rows < 1:
        raise ValueError(f"{name}: {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if int(stream.max()) >= len(token_bytes):
        raise ValueError(f"{name}: token id {int(stream.max())} is outside the byte table of {len(token_bytes)} ids "
                         "(the data was tokenized with another vocabulary)")
    device = next(model.parameters()).device
    was_training, use_mtp = model.training, getattr(model, "use_mtp", False)
    model.eval()
    model.use_mtp = False
    nats, n_tok, n_bytes = 0.0, 0, 0
    try:
        for start in range(0, rows, batch_size):
            r = torch.arange(start, min(rows, start + batch_size))
            idx = r[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]           # [B, T+1]
            chunk = stream[idx]
            x, y = chunk[:, :-1].to(device), chunk[:, 1:]
            logits = model(x).logits.float().cpu()                                     # [B, T, V]
            dn, dt, db = bpb_sums(logits, y, token_bytes)
            nats, n_tok, n_bytes = nats + dn, n_tok + dt, n_bytes + db
    finally:
        model.use_mtp = use_mtp
        model.train(was_training)
    if n_bytes == 0:
        raise ValueError(f"{name}: no target token stands for any byte (only special tokens?)")
    return BpbResult(bpb=nats / math.log(2) / n_bytes, loss=nats / max(n_tok, 1), tokens=n_tok, bytes=n_bytes,
                     source=name)


__all__ = ["bits_per_byte", "bpb_sums", "token_byte_lengths", "token_bytes_table", "BpbResult"]
