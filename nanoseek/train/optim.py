"""AdamW with DeepSeek-V3's settings, and the learning-rate schedules (WSD, cosine, constant).

Optimizer: AdamW (beta1 0.9, beta2 0.95, weight decay 0.1 in the V3 report). Weight decay
applies to matrices only (every parameter with ``ndim >= 2``: projections, experts, the router,
the embedding and the output head); RMSNorm weights and biases are not decayed. The
``e_score_correction_bias`` of the aux-loss-free balancing is a buffer, not a parameter: the
optimizer never touches it (it moves by ``model.update_expert_bias``).

Schedule, a pure function of the step and of the run's progress in [0, 1] (the fraction of
max_steps, max_tokens or max_minutes done, whichever is furthest), so it has no state to
checkpoint beyond the step and the progress the trainer saves:

* ``wsd`` (warmup-stable-decay, what DeepSeek-V3 does: warm up to 2.2e-4, hold it, decay to
  2.2e-5): linear warm-up over ``warmup_steps`` steps, constant, then the last
  ``decay_fraction`` of the run (or the last ``decay_steps`` steps) decays to ``min_lr``,
  cosine- or linearly-shaped. Because the decay is placed by progress, a *time* budget
  (``max_minutes``) still ends at ``min_lr``: the speedrun decays during its last minutes.
* ``cosine``: warm-up, then cosine from ``lr`` to ``min_lr`` over the whole run.
* ``constant``: warm-up, then ``lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and vectors (norm weights, biases; not decayed)."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels on CUDA, foreach elsewhere."""
    device = next(model.parameters()).device
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


class LRSchedule:
    """``lr(step, progress)``; ``total_steps`` (when known) places ``decay_steps``."""

    def __init__(self, cfg: OptimSection, total_steps: int | None = None):
        self.cfg = cfg
        self.total_steps = total_steps

    def factor(self, step: int, progress: float) -> float:
        """Multiplier of the peak lr for the step with 0-based index ``step`` (min_lr/lr..1)."""
        c = self.cfg
        floor = c.min_lr / c.lr
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        p = min(max(progress, 0.0), 1.0)
        if c.schedule == "constant":
            return warm
        if c.schedule == "cosine":
            return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        # wsd
        if c.decay_steps is not None and self.total_steps:
            start = max(self.total_steps - c.decay_steps, 0)
            frac = (step + 1 - start) / c.decay_steps if c.decay_steps else (1.0 if step + 1 >= start else 0.0)
        else:
            df = c.decay_fraction
            frac = (p - (1 - df)) / df if df > 0 else 0.0
        frac = min(max(frac, 0.0), 1.0)
        if frac <= 0:
            return warm
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if c.decay_shape == "cosine" else 1 - frac
        return min(warm, floor + (1 - floor) * shape)

    def lr(self, step: int, progress: float) -> float:
        return self.cfg.lr * self.factor(step, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["param_groups", "build_optimizer", "LRSchedule", "set_lr"]
