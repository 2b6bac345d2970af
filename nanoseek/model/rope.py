"""Rotary position embedding with DeepSeek's YaRN context extension.

RoPE rotates only the ``qk_rope_head_dim`` dims of each query head and the single shared key
head (MLA's decoupled RoPE). DeepSeek lays those dims out as interleaved pairs ``(x0, x1), (x2,
x3), ...`` (``rope_interleave: true``, the reference code's complex-number view); HF's
``rotate_half`` layout (halves) is supported for configs that set ``rope_interleave: false``.

YaRN (``rope_scaling.type == "yarn"``): frequencies of dims whose wavelength falls in the
correction range [low, high] (from ``beta_fast`` / ``beta_slow`` at
``original_max_position_embeddings``) are blended between interpolated (``freq / factor``) and
original frequencies; cos/sin are multiplied by mscale(factor, mscale) / mscale(factor,
mscale_all_dim) (1 for the released configs); the softmax-scale correction mscale^2 lives in
``ModelConfig.softmax_scale``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_get_mscale
from .fp32 import keep_fp32


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_pos: int) -> tuple[int, int]:
    """Indices of the rotary pairs in the interpolation ramp (floor/ceil, clamped to the dims)."""
    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [rope_dim/2] and the cos/sin scale ("attention factor")."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = config.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
        return freq.float(), 1.0
    factor = float(rs["factor"])
    low, high = yarn_correction_range(rs.get("beta_fast") or 32, rs.get("beta_slow") or 1, dim, base,
                                      rs["original_max_position_embeddings"])
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    freq = freq / factor * (1 - smooth) + freq * smooth
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    return freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_pos, rope_dim/2] in fp32, grown on demand; indexed by absolute positions.

    ``inv_freq`` stays fp32 when the model is cast to bf16 (see ``fp32.py``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave
        self._cos = self._sin = None

    def _apply(self, fn, recurse=True):
        self._cos = self._sin = None  # rebuilt from inv_freq on the next call
        return super()._apply(keep_fp32(fn), recurse)

    def _table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 256 if self._cos is None else 2 * self._cos.shape[0])
            # never an inference tensor, even when first built by generation under inference_mode:
            # a compiled training forward reads the table as a graph input and may save it for its
            # backward, which autograd refuses for inference tensors (GRPO updates after rollouts)
            with torch.inference_mode(False):
                t = torch.arange(size, device=device, dtype=torch.float32)
                angles = torch.outer(t, self.inv_freq.to(device))
                self._cos = angles.cos() * self.attention_factor
                self._sin = angles.sin() * self.attention_factor
        return self._cos, self._sin

    def reserve(self, n: int, device: torch.device | str) -> None:
        """Build the tables for positions 0..n-1 now: a compiled forward whose positions stay below n
        never grows them (each growth inside it would be a new graph)."""
        self._table(n, torch.device(device))

    def forward(self, positions: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (or [T]) -> cos, sin [B, T, rope_dim/2] in fp32. ``length``: a bound on
        max(positions) + 1 the caller already knows (saves reading the positions back from the device)."""
        cos, sin = self._table(int(positions.max()) + 1 if length is None else length, positions.device)
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x [B, T, H, rope_dim] (or [B, T, rope_dim]) by cos/sin [B, T, rope_dim/2]."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    dtype = x.dtype
    x = x.float()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)
