"""Preallocated KV cache for generation, addressed by (row, absolute position).

For MLA the cache holds, per layer, only the normalised KV latent ``[B, S, kv_lora_rank]`` and
the rotated shared rope key ``[B, S, qk_rope_head_dim]``: ``kv_lora_rank + qk_rope_head_dim``
values per token per layer (576 for DeepSeek-V3, 1,152 bytes in bf16). Both live side by side in
one buffer per layer, ``kv[layer]`` ``[B, S, kv_lora_rank + qk_rope_head_dim]`` (``a[layer]`` and
``b[layer]`` are views of its two parts): the absorbed decode path uses the whole slot as the
single MQA key ``[c_KV | k_rope]`` and its first part as the value, with no concatenation per
step. For the ``mha`` ablation baseline it holds per-head keys (``a``) and values (``b``).
A DeepSeek-V3.2 model (``index_n_heads > 0``) also keeps each layer's rotated lightning-indexer
key, ``index_k[layer]`` ``[B, S, index_head_dim]`` (see :mod:`nanoseek.model.dsa`).

Every forward step writes its new entries at ``positions`` (per row, so prompts of different
lengths share a batch) and reads slots ``[0, max(positions)]``; attention masks slot ``j`` for a
query at position ``p`` unless ``j <= p``, so stale slots left by an earlier request in a reused
row are never seen. ``rows`` maps the step's batch rows to cache rows (continuous batching).
Nothing is reallocated after construction.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None):
        self.config = config
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        n = config.num_hidden_layers if num_layers is None else num_layers
        self.latent = config.attention_type == "mla"
        if self.latent:
            c, r = config.kv_lora_rank, config.qk_rope_head_dim
            self.kv = [torch.zeros(batch_size, max_len, c + r, dtype=dtype, device=device) for _ in range(n)]
            self.a = [t[..., :c] for t in self.kv]                           # latent c_KV
            self.b = [t[..., c:] for t in self.kv]                           # k_rope (one head)
        else:
            self.kv = None
            shape_a = (batch_size, max_len, config.num_key_value_heads, config.qk_head_dim)  # k
            shape_b = (batch_size, max_len, config.num_key_value_heads, config.v_head_dim)   # v
            self.a = [torch.zeros(shape_a, dtype=dtype, device=device) for _ in range(n)]
            self.b = [torch.zeros(shape_b, dtype=dtype, device=device) for _ in range(n)]
        self.index_k = [torch.zeros(batch_size, max_len, config.index_head_dim, dtype=dtype, device=device)
                        for _ in range(n)] if config.index_n_heads else []

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (the figure the estimate command predicts)."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.a + self.b + self.index_k)

    def check_positions(self, positions: torch.Tensor) -> int:
        """The number of slots a step with these positions attends over (max position + 1)."""
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {top} exceeds the cache length {self.max_len}")
        return top + 1

    def _index(self, positions: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B = positions.shape[0]
        r = torch.arange(B, device=positions.device) if rows is None else rows
        return r[:, None].expand_as(positions), positions

    def write(self, layer: int, positions: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Store a, b [B, T, ...] at cache[rows[i], positions[i, t]]; positions already checked
        (the model checks them once per forward, see ``check_positions``)."""
        index = self._index(positions, rows)
        if self.latent:   # one scatter of the whole slot [c_KV | k_rope]
            self.kv[layer][index] = torch.cat([a, b], dim=-1).to(self.dtype)
        else:
            self.a[layer][index] = a.to(self.dtype)
            self.b[layer][index] = b.to(self.dtype)

    def write_slot(self, layer: int, positions: torch.Tensor, slot: torch.Tensor,
                   rows: torch.Tensor | None = None) -> None:
        """MLA only: store whole slots [c_KV | k_rope] [B, T, c + r]; positions already checked."""
        self.kv[layer][self._index(positions, rows)] = slot.to(self.dtype)

    def read(self, layer: int, length: int, rows: torch.Tensor | None = None,
             batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, length) of the given rows (a view when rows is None)."""
        if rows is None:
            B = self.batch_size if batch is None else batch
            return self.a[layer][:B, :length], self.b[layer][:B, :length]
        if self.latent:
            kv = self.kv[layer][rows, :length]
            c = self.config.kv_lora_rank
            return kv[..., :c], kv[..., c:]
        return self.a[layer][rows, :length], self.b[layer][rows, :length]

    def read_slots(self, layer: int, length: int, rows: torch.Tensor | None = None,
                   batch: int | None = None) -> torch.Tensor:
        """MLA only: slots [0, length) as [B, length, c + r] (a view when rows is None)."""
        if rows is None:
            return self.kv[layer][:self.batch_size if batch is None else batch, :length]
        return self.kv[layer][rows, :length]

    def write_index_keys(self, layer: int, positions: torch.Tensor, keys: torch.Tensor,
                         rows: torch.Tensor | None = None) -> None:
        """V3.2: store the indexer keys [B, T, index_head_dim]; positions already checked."""
        self.index_k[layer][self._index(positions, rows)] = keys.to(self.dtype)

    def read_index_keys(self, layer: int, length: int, rows: torch.Tensor | None = None,
                        batch: int | None = None) -> torch.Tensor:
        """V3.2: indexer keys of slots [0, length) as [B, length, index_head_dim]."""
        if rows is None:
            return self.index_k[layer][:self.batch_size if batch is None else batch, :length]
        return self.index_k[layer][rows, :length]

    def copy_rows(self, src: torch.Tensor | list[int], dst: torch.Tensor | list[int], length: int) -> None:
        """Copy slots [0, length) of rows src to rows dst (n samples sharing one prefill)."""
        src = torch.as_tensor(src, device=self.a[0].device)
        dst = torch.as_tensor(dst, device=self.a[0].device)
        for t in (self.kv if self.latent else self.a + self.b) + self.index_k:
            t[dst, :length] = t[src, :length]
