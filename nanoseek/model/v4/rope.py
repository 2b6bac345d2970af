"""DeepSeek-V4's two RoPEs, built on nanoseek's rotary tables (``model/rope.py``).

V4 rotates only the LAST ``qk_rope_head_dim = int(head_dim * partial_rotary_factor)`` dims of a
head (``[nope | rope]``), in DeepSeek's interleaved-pair layout, and has two bases
(``config.rope_parameters``): ``main`` (``rope_theta``) for sliding-window layers, ``compress``
(``compress_rope_theta``, plus YaRN in the released configs, with cos/sin unscaled:
``attention_factor`` 1) for the compressed layers' attention, their compressors and the indexer.
Keys equal values in V4, so the attention output's rope dims carry the keys' rotation; it is
undone by rotating the output back at the query position (``rope_tail(o, cos, -sin)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..rope import RotaryEmbedding, apply_rope
from .config import DeepseekV4Config


@dataclass
class _RopeSpec:
    """The fields of ``ModelConfig`` that :class:`RotaryEmbedding` reads."""
    qk_rope_head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rope_interleave: bool = True


class Rope(nn.Module):
    """cos/sin [B, T, rope_dim/2] (fp32) at absolute positions for one ``rope_parameters`` entry."""

    def __init__(self, config: DeepseekV4Config, label: str):
        super().__init__()
        p = config.rope_parameters[label]
        yarn = p["rope_type"] == "yarn"
        self.rotary = RotaryEmbedding(_RopeSpec(config.qk_rope_head_dim, float(p["rope_theta"]), p if yarn else None))
        if yarn and p.get("attention_factor") is not None:
            self.rotary.attention_factor = float(p["attention_factor"])

    def forward(self, positions: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``length``: a bound on max(positions) + 1 the caller knows (else read from the positions)."""
        if positions.numel() == 0:
            r = self.rotary.inv_freq.shape[0]
            empty = torch.zeros(*positions.shape, r, device=positions.device)
            return empty, empty
        return self.rotary(positions, length)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] dims of x [B, T, (H,) D] by cos/sin [B, T, r/2]."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], apply_rope(x[..., -r:], cos, sin, interleave=True)], dim=-1)


__all__ = ["Rope", "rope_tail"]
