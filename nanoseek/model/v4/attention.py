"""DeepSeek-V4 attention: one shared K=V head, sliding window + compressed entries, attention sinks.

Per token x [d] (HF names in brackets), H heads of dim D (``head_dim``), r = qk_rope_head_dim:

  q_latent = RMSNorm(W_qa x)                         [q_lora_rank]  (``q_a_proj``, ``q_a_norm``)
  q_h      = RoPE(RMSNorm_unweighted(W_qb q_latent)_h)   [H, D]     (``q_b_proj``; rope on last r dims)
  kv       = RoPE(RMSNorm(W_kv x))                   [D]            (``kv_proj``, ``kv_norm``): key AND value
  keys     = kv of the last ``sliding_window`` positions (the query's own included)
             + for compressed layers the compressor's entries (``compressor``, see compressor.py):
               HCA every visible entry, CSA the indexer's top-k of them
  o_h      = softmax([q_h . k / sqrt(D) ; sink_h]) without the sink column  @ values   (``sinks`` [H])
  o_h      = RoPE^-1(o_h)                             undo the values' rotation at the query position
  out      = W_ob [W_oa^g (o_{heads of group g})]_g   grouped low-rank output (``o_a_proj`` [g*r_o, H*D/g],
                                                       ``o_b_proj`` [d, g*r_o]), g = ``o_groups``

Layer kinds (``config.layer_types``): ``sliding_attention`` (main RoPE, no compressor),
``compressed_sparse_attention`` (m = 4 with the lightning indexer) and
``heavily_compressed_attention`` (m' = 128, every entry); the compressed kinds use the
"compress" RoPE for everything. The sink is a learned per-head logit that absorbs probability
mass (like gpt-oss). Softmax in fp32.

While the CSA indexer trains (``dsa_stage`` set by the model's ``set_dsa_stage``, see
compressor.py) the layer also leaves the indexer's KL in ``indexer_loss``; without a stage the
forward is the inference forward, unchanged.

Without a cache the window keys are the sequence itself under a sliding causal mask (training,
prefill without cache); with a :class:`~.cache.V4Cache` they are the layer's window ring (older
positions) plus this step's keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..fp32 import keep_fp32
from ..kmajor import Linear
from .compressor import Compressor, FP32RMSNorm, compressed_kl
from .config import DeepseekV4Config
from .hyper import unweighted_rms_norm
from .rope import Rope, rope_tail


class GroupedLinear(nn.Linear):
    """HF ``o_a_proj``: block-diagonal ``[g*r_o, in/g]``; group i of x [..., g, in/g] -> [..., g, r_o]."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])                    # [g, r_o, in/g]
        return torch.einsum("...gi,gri->...gr", x, w)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T, K] bool: key at k_pos visible to the query at q_pos iff 0 <= q_pos - k_pos < window."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    return (delta >= 0) & (delta < window)


def attend(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor, scale: float,
           return_probs: bool = False):
    """q [B, T, H, D], keys = values [B, K, D], visible [B, T, K] -> [B, T, H, D]; one sink logit per head.
    ``return_probs``: also the fp32 probabilities [B, H, T, K] (sink column dropped, not renormalised)."""
    B, T, H, _ = q.shape
    logits = torch.matmul(q.transpose(1, 2), keys.unsqueeze(1).transpose(-1, -2)) * scale          # [B, H, T, K]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    sink = sinks.to(logits.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    logits = torch.cat([logits, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    p32 = torch.softmax(logits.float(), dim=-1)[..., :-1]
    out = torch.matmul(p32.to(keys.dtype), keys.unsqueeze(1)).transpose(1, 2)                     # [B, T, H, D]
    return (out, p32) if return_probs else out


class Attention(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.kind = c.layer_type(layer_idx)
        self.rope_label = "main" if self.kind == "sliding_attention" else "compress"
        self.n_heads, self.head_dim, self.window = c.num_attention_heads, c.head_dim, c.sliding_window
        self.o_groups, self.eps, self.scale = c.o_groups, c.rms_norm_eps, c.head_dim ** -0.5
        H, D = c.num_attention_heads, c.head_dim
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = FP32RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = Linear(c.q_lora_rank, H * D, bias=False)
        self.kv_proj = Linear(c.hidden_size, D, bias=False)
        self.kv_norm = FP32RMSNorm(D, c.rms_norm_eps)
        self.o_a_proj = GroupedLinear(H * D // c.o_groups, c.o_groups * c.o_lora_rank, c.o_groups)
        self.o_b_proj = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.compressor = Compressor(c, self.kind) if self.kind != "sliding_attention" else None
        self.dsa_stage: str | None = None   # "dense" / "sparse" while a CSA indexer trains (set_dsa_stage)
        self.indexer_loss: torch.Tensor | None = None

    @property
    def indexer(self):
        """The CSA layer's lightning indexer (None for sliding-window and HCA layers)."""
        return None if self.compressor is None else self.compressor.indexer

    def _apply(self, fn, recurse=True):   # the sinks stay fp32, children follow fn
        if recurse:
            for child in self.children():
                child._apply(fn)
        return super()._apply(keep_fp32(fn), recurse=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict[str, Rope], cache=None,
                rows: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                length: int | None = None) -> torch.Tensor:
        """x [B, T, d], positions [B, T]; ``cache`` a per-layer view of a V4Cache (or None);
        ``length``: max(positions) + 1 when the caller knows it (the compressors read no position back)."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        rope = ropes[self.rope_label]
        cos, sin = rope(positions, length)                                                # [B, T, r/2]
        q_latent = self.q_a_norm(self.q_a_proj(x))                                        # [B, T, q_lora]
        q = unweighted_rms_norm(self.q_b_proj(q_latent).view(B, T, H, D), self.eps)
        q = rope_tail(q, cos, sin)                                                        # [B, T, H, D]
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)                           # [B, T, D]

        if cache is None:
            keys, visible = kv, window_mask(positions, positions, self.window)           # [B, T, T]
        else:
            ring, ring_pos = cache.window.read(rows)                                      # [B, W, D], [B, W]
            keys = torch.cat([ring.to(kv.dtype), kv], dim=1)
            older = (ring_pos >= 0) & (ring_pos < positions[:, :1])                       # written by earlier steps
            k_pos = torch.cat([ring_pos, positions], dim=1)
            k_ok = torch.cat([older, torch.ones_like(positions, dtype=torch.bool) if valid is None else valid], dim=1)
            visible = window_mask(positions, k_pos, self.window) & k_ok[:, None, :]
            cache.window.write(kv, positions, rows, valid)
        train = None
        self.indexer_loss = None
        if self.compressor is not None:
            entries, chosen, train = self.compressor(x, q_latent, positions, rope, cache, rows, valid,
                                                     stage=self.dsa_stage if self.indexer is not None else None,
                                                     length=length)
            keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
            visible = torch.cat([visible, chosen], dim=-1)

        if train is None:
            o = attend(q, keys, visible, self.sinks, self.scale)                          # [B, T, H, D]
        else:   # the CSA indexer trains: its KL against this attention over the compressed entries
            o, probs = attend(q, keys, visible, self.sinks, self.scale, return_probs=True)
            scores, keep = train
            self.indexer_loss = compressed_kl(scores, probs[..., -keep.shape[-1]:], keep)
        o = rope_tail(o, cos, -sin)
        o = self.o_a_proj(o.reshape(B, T, self.o_groups, -1)).flatten(2)                  # [B, T, g*r_o]
        return self.o_b_proj(o)


__all__ = ["Attention", "GroupedLinear", "attend", "window_mask"]
