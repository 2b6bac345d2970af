"""DeepSeek-V4's MoE: hash-routed and learned routers, ``sqrtsoftplus`` scores, clamped SwiGLU.

Every V4 layer's feed-forward is an MoE (HF ``mlp``): ``n_routed_experts`` routed experts (top
``num_experts_per_tok``) plus ONE shared expert of width ``moe_intermediate_size``. Per token x:

  s = score(x W_g^T)       score = sqrt(softplus(.)) ("sqrtsoftplus", V4), sigmoid or softmax
  learned layers (``moe``):     chosen = top-k of s + e_score_correction_bias (bias for choice only)
  hash layers (``hash_moe``):   chosen = tid2eid[token id]   (a fixed token -> k experts table)
  w = s[chosen] / sum s[chosen] * routed_scaling_factor      (always normalised)
  y = sum_k w_k Expert_k(x) + Shared(x)

No group-limited routing (V4 has no n_group). The experts are SwiGLU with the pre-activations
clamped (``swiglu_limit`` L): silu(min(gate, L)) * clamp(up, -L, L), the shared expert too.
The routed experts are nanoseek's stacked :class:`~nanoseek.model.moe.Experts` (``gate_up_proj
[E, 2I, d]``, ``down_proj [E, d, I]``, grouped GEMMs, swappable from outside) with the clamp as
their activation. A hash table may name one expert twice for a token; both picks count.

Learned layers keep DeepSeek-V3's auxiliary-loss-free balancing (``update_bias``) and its optional
sequence-wise balance loss (``seq_aux_alpha``, V3's formula); hash layers have neither (their
routing is fixed). ``tid2eid`` is a persistent buffer (it comes with the checkpoint); a fresh model
draws it uniformly at random (transformers leaves it zero, i.e. every token on expert 0).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..fp32 import fp32_linear, keep_fp32
from ..kmajor import Linear
from ..moe import Experts, top_k
from ..moe import MoE as _V3MoE
from .config import DeepseekV4Config

SCORE_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: x.softmax(dim=-1),
}


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class ClampedMLP(nn.Module):
    """The shared expert (HF ``shared_experts``): down(silu(min(gate(x), L)) * clamp(up(x), -L, L))."""

    def __init__(self, hidden_size: int, intermediate_size: int, limit: float, bias: bool = False):
        super().__init__()
        self.limit = limit
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedExperts(Experts):
    """nanoseek's stacked routed experts with V4's clamped SwiGLU."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config)
        self.limit = config.swiglu_limit

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate, up, self.limit)


class Router(nn.Module):
    """HF ``mlp.gate``: ``weight [E, d]``; learned layers also ``e_score_correction_bias [E]``,
    hash layers ``tid2eid [vocab, k]`` (int64). Scores and weights in fp32."""

    def __init__(self, config: DeepseekV4Config, hashed: bool):
        super().__init__()
        c = config
        self.hashed, self.top_k, self.n_experts = hashed, c.num_experts_per_tok, c.n_routed_experts
        self.score = SCORE_FUNCS[c.scoring_func]
        self.routed_scaling_factor = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        if hashed:
            self.register_buffer("tid2eid", torch.randint(0, c.n_routed_experts, (c.vocab_size, c.num_experts_per_tok)))
            self.e_score_correction_bias = None
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32)."""
        scores = self.score(fp32_linear(x, self.weight))
        if self.hashed:
            if input_ids is None:
                raise ValueError("a hash-routed MoE layer needs the input token ids")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            idx = top_k(scores + self.e_score_correction_bias, self.top_k, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor, idx, scores


class MoE(nn.Module):
    """HF ``mlp``: ``gate`` (Router), ``experts`` (stacked, clamped), ``shared_experts``."""

    def __init__(self, config: DeepseekV4Config, hashed: bool):
        super().__init__()
        c = config
        self.gate = Router(c, hashed)
        self.experts = ClampedExperts(c)
        self.shared_experts = ClampedMLP(c.hidden_size, c.moe_intermediate_size, c.swiglu_limit, c.mlp_bias)
        self.n_experts, self.top_k, self.seq_aux_alpha = c.n_routed_experts, c.num_experts_per_tok, 0.0
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("load", torch.zeros(c.n_routed_experts), persistent=False)

    _seq_aux_loss = _V3MoE._seq_aux_loss     # one formula for V3 and V4

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        return super()._apply(keep_fp32(fn), recurse=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat, input_ids)
        out, counts = self.experts(flat, weights, idx)
        self.aux_loss = None
        if self.training:
            self.load += counts.to(self.load.dtype)
            if self.seq_aux_alpha > 0 and not self.gate.hashed:
                self.aux_loss = self._seq_aux_loss(scores, idx, B, T)
        return (out + self.shared_experts(flat)).view(B, T, d)

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Aux-loss-free step (learned layers): bias += gamma * sign(mean load - load); returns the load."""
        load = self.load.clone()
        bias = self.gate.e_score_correction_bias
        if gamma and bias is not None and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


__all__ = ["MoE", "Router", "ClampedExperts", "ClampedMLP", "clamped_swiglu", "SCORE_FUNCS"]
