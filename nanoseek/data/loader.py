"""Packed, deterministic, resumable pre-training batches from token shards.

Packing is document-aligned in DeepSeek's sense: every document starts with its BOS token, the
documents of an epoch are concatenated in a seeded random order into one token stream, and
sequences are cut from that stream back to back, without cross-document attention masks (the
model sees where a document starts from the BOS). No token is padded or thrown away.

Positions: the stream of epoch ``e`` is the documents in the order ``permutation(seed, e)``
(document granularity, a fresh order each epoch); epochs follow one another seamlessly, so the
loader is infinite. Global batch ``g`` covers stream tokens ``[P, P + R*T]`` with
``R = batch_size * world_size`` rows of ``T = seq_len``; row ``r`` is the ``T + 1`` tokens from
``P + r*T``: ``input_ids`` the first ``T``, ``labels`` the last ``T`` (the next token of each
input, across document boundaries too). Rank ``k`` takes rows ``k*B .. k*B + B - 1``, a disjoint
slice of every global batch, and reads only its own tokens.

The whole position is ``(epoch, offset)`` of the next global batch: :meth:`PackedLoader.state_dict`
returns it (with the seed and a fingerprint of the data to refuse resuming on other data), and
after :meth:`~PackedLoader.load_state_dict` the loader yields exactly the batches an uninterrupted
run would have. Batch size, sequence length and world size may change on resume; the stream
simply continues from the same token.

Each batch also reports, per row, the ids of the documents its tokens come from (the loss-spike
guard logs them; :meth:`ShardSet.origin` maps an id to ``file:line``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.shards import ShardError, ShardSet


class PackedLoader:
    """Iterator of ``(input_ids [B,T] int64, labels [B,T] int64, doc_ids: list of B lists)``.

    ``data``: a prepared data directory or its ``manifest.json``; ``split``: "train" or "val";
    ``tokenizer``: the Tokenizer (or hash) the model uses, checked against the manifest;
    ``shuffle=False`` keeps documents in stored order (every epoch); ``infinite=False`` stops
    before the first batch that would run past the end of epoch 0 (for a fixed validation pass).
    """

    def __init__(self, data: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Any = None, shuffle: bool = True,
                 infinite: bool = True, verify: str = "sha256"):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = ShardSet(data, split, tokenizer=tokenizer, verify=verify)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle, self.infinite = rank, world_size, shuffle, infinite
        self.epoch, self.offset = 0, 0
        self._order_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ positions
    @property
    def tokens_per_epoch(self) -> int:
        return self.shards.n_tokens

    @property
    def global_batch_tokens(self) -> int:
        """Stream tokens one global batch advances by (inputs of all rows of all ranks)."""
        return self.batch_size * self.world_size * self.seq_len

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end offset of each of those documents in the epoch's stream)."""
        if epoch not in self._order_cache:
            n = self.shards.n_docs
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            ends = np.cumsum(self.shards.doc_lengths[order])
            self._order_cache = {k: v for k, v in self._order_cache.items() if k >= epoch - 1}
            self._order_cache[epoch] = (order, ends)
        return self._order_cache[epoch]

    def _read(self, epoch: int, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` stream tokens from (epoch, offset) and the document id of each, crossing epochs."""
        tokens = np.empty(n, dtype=np.int64)
        docs = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            order, ends = self._order(epoch)
            if offset >= ends[-1]:
                epoch, offset = epoch + 1, 0
                continue
            i = int(np.searchsorted(ends, offset, side="right"))
            doc = int(order[i])
            start_in_doc = offset - (int(ends[i]) - int(self.shards.doc_lengths[doc]))
            piece = self.shards.document(doc, start_in_doc, start_in_doc + n - filled)
            tokens[filled:filled + len(piece)] = piece
            docs[filled:filled + len(piece)] = doc
            filled += len(piece)
            offset += len(piece)
        return tokens, docs

    def _advance(self, epoch: int, offset: int, n: int) -> tuple[int, int]:
        offset += n
        while offset >= self.tokens_per_epoch:
            epoch, offset = epoch + 1, offset - self.tokens_per_epoch
        return epoch, offset

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        B, T = self.batch_size, self.seq_len
        if not self.infinite and (self.epoch > 0 or self.offset + self.global_batch_tokens + 1 > self.tokens_per_epoch):
            raise StopIteration
        epoch, offset = self._advance(self.epoch, self.offset, self.rank * B * T)
        tokens, docs = self._read(epoch, offset, B * T + 1)
        rows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)[::T]      # [B, T+1]
        row_docs = np.lib.stride_tricks.sliding_window_view(docs, T + 1)[::T]
        x = torch.from_numpy(rows[:, :-1].copy())                                # [B, T]
        y = torch.from_numpy(rows[:, 1:].copy())                                 # [B, T]
        doc_ids = [list(dict.fromkeys(r.tolist())) for r in row_docs]
        self.epoch, self.offset = self._advance(self.epoch, self.offset, self.global_batch_tokens)
        return x, y, doc_ids

    def __len__(self) -> int:
        """Whole global batches in one epoch (what a finite pass yields; an infinite loader simply
        continues into the next epoch, so no token is lost)."""
        return (self.tokens_per_epoch - 1) // self.global_batch_tokens

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch; small and JSON-serialisable, saved with checkpoints."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "split": self.split,
                "shuffle": self.shuffle, "data_fingerprint": self.shards.fingerprint,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved with another seed, split or data."""
        mine = {"seed": self.seed, "split": self.split, "shuffle": self.shuffle,
                "data_fingerprint": self.shards.fingerprint}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ShardError(f"loader state has {key}={state.get(key)!r} but this loader has {value!r}; "
                                 "resume with the same data, split and seed")
        if not (0 <= int(state["offset"]) < self.tokens_per_epoch and int(state["epoch"]) >= 0):
            raise ShardError(f"loader state position (epoch {state['epoch']}, offset {state['offset']}) "
                             f"is outside the data ({self.tokens_per_epoch} tokens per epoch)")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
