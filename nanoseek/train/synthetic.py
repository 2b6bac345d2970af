"""A synthetic token stream with :class:`~nanoseek.data.loader.PackedLoader`'s interface.

``[data] source = "synthetic"`` trains on generated documents instead of prepared shards: for
throughput benchmarks (``bench-moe``), for smoke-testing a recipe before preparing data, and in
tests. Each document is ``[BOS]`` followed by an arithmetic progression over the non-special
token ids (random start, stride 1..7, length 8..64): after two tokens the rest is predictable in
context, so the loss falls well below ln(vocab) within a few hundred steps, and a model that
learns nothing stays at ln(vocab).

Batch ``g`` of a split is generated from its own seeded generator ``(seed, split, g)``, so the
stream is deterministic, random-access and its whole state is the batch index; rank ``k`` of
``world_size`` takes rows ``k*B .. k*B+B-1`` of each global batch. Documents are packed back to back
(no padding), with next-token labels across document boundaries, like the real loader.
Bits-per-byte on synthetic data counts one byte per token.
"""

from __future__ import annotations

from typing import Any

import torch

N_SPECIAL = 7                 # ids 0..6 are the tokenizer's special tokens (BOS = 0)
_SPLIT_CODE = {"train": 1, "val": 2}


class SyntheticLoader:
    """Iterator of ``(input_ids [B,T], labels [B,T], doc_ids: list of B lists)``."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 rank: int = 0, world_size: int = 1, num_batches: int | None = None):
        if vocab_size <= N_SPECIAL + 8:
            raise ValueError(f"synthetic data needs vocab_size > {N_SPECIAL + 8}, got {vocab_size}")
        if split not in _SPLIT_CODE:
            raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        self.num_batches = num_batches        # None: infinite
        self.index = 0                        # the next global batch

    def __iter__(self) -> "SyntheticLoader":
        return self

    def _row(self, g: torch.Generator, n: int, doc_base: int) -> tuple[list[int], list[int]]:
        """n tokens of back-to-back documents and the id of each token's document."""
        span = self.vocab_size - N_SPECIAL
        tokens: list[int] = []
        docs: list[int] = []
        j = 0
        while len(tokens) < n:
            start, stride, length = (int(v) for v in (torch.randint(0, span, (1,), generator=g),
                                                      torch.randint(1, 8, (1,), generator=g),
                                                      torch.randint(8, 65, (1,), generator=g)))
            tokens += [0] + [N_SPECIAL + (start + i * stride) % span for i in range(length)]
            docs += [doc_base + j] * (length + 1)
            j += 1
        return tokens[:n], docs[:n]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        if self.num_batches is not None and self.index >= self.num_batches:
            raise StopIteration
        B, T = self.batch_size, self.seq_len
        xs, ys, ids = [], [], []
        for r in range(self.rank * B, (self.rank + 1) * B):
            g = torch.Generator().manual_seed(hash((self.seed, _SPLIT_CODE[self.split], self.index, r)) % 2**62)
            toks, docs = self._row(g, T + 1, doc_base=(self.index * B * self.world_size + r) * 1000)
            xs.append(toks[:-1])
            ys.append(toks[1:])
            ids.append(list(dict.fromkeys(docs[:-1])))
        self.index += 1
        return torch.tensor(xs), torch.tensor(ys), ids

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "split": self.split, "source": "synthetic"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") != "synthetic" or state.get("seed") != self.seed or state.get("split") != self.split:
            raise ValueError(f"loader state {state} is not a synthetic {self.split!r} stream with seed {self.seed}")
        self.index = int(state["index"])


__all__ = ["SyntheticLoader", "N_SPECIAL"]
