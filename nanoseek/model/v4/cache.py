"""The DeepSeek-V4 decoding cache: a sliding-window ring, compressor rings and compressed entries.

Per layer, preallocated, never reallocated, addressed by (cache row, absolute position):

* ``window``: the last ``sliding_window`` keys (= values) in a ring, slot ``p % W``, each slot
  tagged with the position it holds (-1: empty);
* per compressor (``compressor``; for CSA also the indexer's ``indexer``):
  - a ring of the projected candidates and gates of the last ``span + 1`` tokens (span = m, or
    2m with CSA's overlap; one spare slot for a speculative draft written a position ahead),
  - ``entries`` [rows, max_len // m + 2, dim]: compressed entry w at index w (the indexer's are its
    keys), then a slot for discarded writes and a spare that a compiled step reads (masked).

A step (positions [B, T], consecutive per row; rows of different lengths share a step) attends
over the ring's positions older than its first position plus its own keys, and pools exactly
the windows it completes (their tokens come from the ring or from the step) into ``entries``;
then its tokens go into the rings. Re-running a position (a rejected speculative draft)
overwrites its slot and re-pools its window, so the cache never needs rolling back. ``valid``
[B, T] marks padding (False): padded tokens are never cached and windows holding them are never
pooled. ``copy_rows`` copies rows (n samples sharing one prefill).

Per token and layer the persistent state is one entry of ``head_dim`` every m tokens (plus the
indexer's ``index_head_dim`` for CSA); the rings are of fixed size (W keys, 2m + 1 candidates).
"""

from __future__ import annotations

import torch

from .config import CSA, HCA, DeepseekV4Config


def _keep_last(positions: torch.Tensor, valid: torch.Tensor | None, n: int) -> torch.Tensor:
    """[B, T] bool: the last n valid tokens of each row (the ones a ring of n slots keeps)."""
    if valid is None:
        T = positions.shape[1]
        return (torch.arange(T, device=positions.device) >= T - n).expand_as(positions)
    after = valid.flip(1).long().cumsum(1).flip(1)          # valid tokens at or after t
    return valid & (after <= n)


class WindowRing:
    def __init__(self, batch: int, window: int, dim: int, dtype, device):
        self.W = window
        self.kv = torch.zeros(batch, window + 1, dim, dtype=dtype, device=device)      # slot W: discarded writes
        self.pos = torch.full((batch, window + 1), -1, dtype=torch.long, device=device)

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keys [B, W, D], their positions [B, W] (-1 empty)."""
        return self.kv[rows, :self.W], self.pos[rows, :self.W]

    def write(self, kv: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, valid) -> None:
        slot = torch.where(_keep_last(positions, valid, self.W), positions % self.W, self.W)
        r = rows[:, None].expand_as(positions)
        self.kv[r, slot] = kv.to(self.kv.dtype)
        self.pos[r, slot] = positions

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv, self.pos]


class CompressorStore:
    """One compressor's token ring and entries (see the module docstring)."""

    def __init__(self, batch: int, rate: int, overlap: bool, dim: int, max_len: int, dtype, device):
        self.rate, self.overlap, self.dim = rate, overlap, dim
        width = 2 * dim if overlap else dim
        self.R = (2 * rate if overlap else rate) + 1
        self.kv = torch.zeros(batch, self.R + 1, width, dtype=dtype, device=device)    # slot R: discarded
        self.gate = torch.zeros(batch, self.R + 1, width, dtype=dtype, device=device)
        self.pos = torch.full((batch, self.R + 1), -1, dtype=torch.long, device=device)
        self.n_entries = max_len // rate
        # slot n_entries: discarded writes; one more, so that a compiled step can always read two
        # entries more than it sees (CompressorStore.read)
        self.entries = torch.zeros(batch, self.n_entries + 2, dim, dtype=dtype, device=device)

    def read(self, n: int, rows: torch.Tensor) -> torch.Tensor:
        """The first n entries of the rows [B, n, dim]; under torch.compile n + 2 (the two beyond
        the visible ones are masked by every reader), so the entry count is never 0 or 1: a
        compiled graph would be specialised to each of those sizes (one graph per count)."""
        return self.entries[rows, :n + 2 if torch.compiler.is_compiling() else n]

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv, self.gate, self.pos, self.entries]

    def update(self, comp, kv: torch.Tensor, gate: torch.Tensor, positions: torch.Tensor, rope, rows: torch.Tensor,
               valid: torch.Tensor | None, length: int | None = None) -> None:
        """Pool the windows completed by this step (kv, gate [B, T, width] of its tokens), then ring
        them. ``length``: max(positions) + 1 when known (bounds the windows' rotary positions)."""
        B, T = positions.shape
        m, R, dev = self.rate, self.R, positions.device
        p0, p_last = positions[:, 0], positions[:, -1]
        w_first = (p0 + m) // m - 1                          # first window ending at or after p0
        n_new = ((p_last + 1) // m - w_first).clamp(min=0)   # windows ending inside the step
        if torch.compiler.is_compiling():   # no read back: T consecutive positions end at most ceil(T / m)
            N = -(-T // m)                  # windows; the rows' others are not `complete` (pooled, discarded)
        else:
            N = int(n_new.max()) if B else 0
        if N > 0:
            widx = w_first[:, None] + torch.arange(N, device=dev)                        # [B, N]
            offsets = torch.arange(-m if self.overlap else 0, m, device=dev)             # L slots per entry
            L = offsets.numel()
            tpos = widx[..., None] * m + offsets                                         # [B, N, L]
            rel = tpos - p0[:, None, None]
            from_step = rel >= 0
            idx = rel.clamp(0, T - 1).reshape(B, N * L)
            c = kv.shape[-1]

            def from_tokens(t: torch.Tensor) -> torch.Tensor:
                return torch.gather(t, 1, idx[..., None].expand(-1, -1, c)).view(B, N, L, c)

            slot = tpos.remainder(R).reshape(B, N * L)
            ring_kv, ring_gate, ring_pos = self.kv[rows], self.gate[rows], self.pos[rows]

            def from_ring(t: torch.Tensor) -> torch.Tensor:
                return torch.gather(t, 1, slot[..., None].expand(-1, -1, c)).view(B, N, L, c)

            step_ok = rel < T
            if valid is not None:
                step_ok = step_ok & torch.gather(valid, 1, idx).view(B, N, L)
            ring_ok = (tpos >= 0) & (torch.gather(ring_pos, 1, slot).view(B, N, L) == tpos)
            present = torch.where(from_step, step_ok, ring_ok)                           # [B, N, L]
            sel = from_step[..., None]
            kv_w = torch.where(sel, from_tokens(kv), from_ring(ring_kv).to(kv.dtype))
            gate_w = torch.where(sel, from_tokens(gate), from_ring(ring_gate).to(gate.dtype))
            gate_w = gate_w + comp.position_bias[offsets.remainder(m)]
            if self.overlap:   # slots -m..-1 read the a-halves (previous window), 0..m-1 the b-halves
                d = self.dim
                kv_w = torch.cat([kv_w[:, :, :m, :d], kv_w[:, :, m:, d:]], dim=2)
                gate_w = torch.cat([gate_w[:, :, :m, :d], gate_w[:, :, m:, d:]], dim=2)
            kv_w = kv_w.masked_fill(~present[..., None], 0.0)
            gate_w = gate_w.masked_fill(~present[..., None], float("-inf"))
            complete = (torch.arange(N, device=dev) < n_new[:, None]) & present[:, :, -m:].all(dim=-1)
            gate_w = gate_w.masked_fill(~complete[..., None, None], 0.0)                 # no all -inf rows
            entries = comp.pool(kv_w, gate_w, w_first, rope, length)                      # [B, N, dim]
            dest = torch.where(complete, widx, self.n_entries)
            self.entries[rows[:, None].expand(B, N), dest] = entries.to(self.entries.dtype)
        slot = torch.where(_keep_last(positions, valid, R), positions % R, R)
        r = rows[:, None].expand_as(positions)
        self.kv[r, slot] = kv.to(self.kv.dtype)
        self.gate[r, slot] = gate.to(self.gate.dtype)
        self.pos[r, slot] = positions


class LayerCache:
    def __init__(self, config: DeepseekV4Config, kind: str, batch: int, max_len: int, dtype, device):
        c = config
        self.window = WindowRing(batch, c.sliding_window, c.head_dim, dtype, device)
        self.stores: dict[str, CompressorStore] = {}
        if kind in (CSA, HCA):
            m = c.compress_rates[kind]
            self.stores["compressor"] = CompressorStore(batch, m, kind == CSA, c.head_dim, max_len, dtype, device)
        if kind == CSA:
            self.stores["indexer"] = CompressorStore(batch, c.compress_rates[CSA], True, c.index_head_dim, max_len,
                                                     dtype, device)

    def store(self, name: str) -> CompressorStore:
        return self.stores[name]

    def tensors(self) -> list[torch.Tensor]:
        return self.window.tensors() + [t for s in self.stores.values() for t in s.tensors()]


class V4Cache:
    def __init__(self, config: DeepseekV4Config, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_layers: int | None = None):
        self.config, self.batch_size, self.max_len, self.dtype = config, batch_size, max_len, dtype
        n = config.num_hidden_layers if num_layers is None else num_layers
        self.layers = [LayerCache(config, config.layer_type(i), batch_size, max_len, dtype, device) for i in range(n)]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def check_positions(self, positions: torch.Tensor) -> int:
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {top} exceeds the cache length {self.max_len}")
        return top + 1

    def copy_rows(self, src, dst, length: int | None = None) -> None:
        """Copy rows src to rows dst (the whole state: rings are not addressed by length)."""
        dev = self.layers[0].window.kv.device
        src, dst = torch.as_tensor(src, device=dev), torch.as_tensor(dst, device=dev)
        for layer in self.layers:
            for t in layer.tensors():
                t[dst] = t[src]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


__all__ = ["V4Cache", "LayerCache", "WindowRing", "CompressorStore"]
