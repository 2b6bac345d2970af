"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the
learning-rate schedules (WSD, cosine, constant).

Optimizer (``[optim] optimizer``, built by :func:`build_optimizer` through :data:`OPTIMIZERS`,
the one place a trainer's optimizer is made: pre-training and every post-training stage):

* ``adamw`` (DeepSeek-V3: beta1 0.9, beta2 0.95, weight decay 0.1): ``torch.optim.AdamW`` over
  every parameter. Weight decay applies to matrices only (every parameter with ``ndim >= 2``:
  projections, experts, the router, the embedding and the output head); RMSNorm weights and
  biases are not decayed.
* ``muon`` (Moonlight, Kimi K2, DeepSeek-V4): :class:`~nanoseek.train.muon.Muon` for the hidden
  matrices (attention and MLP projections, MTP's ``eh_proj``, and the stacked routed experts,
  each expert's gate, up and down projection a matrix of its own), AdamW for the rest: the
  embedding, the output head and the MoE router (:data:`ADAMW_MATRICES`: decayed), norms and
  biases (not decayed). :class:`MuonAdamW` steps both as one optimizer: one ``param_groups``
  list ("decay", "no_decay", "muon"), one ``state_dict`` indexed like a single optimizer's, so
  checkpoints, resume, rollback and the distributed gather/shard code treat it as they treat
  AdamW. Muon's lr is ``muon_lr`` (default: ``lr``) times the schedule's factor: its group
  carries ``lr_scale = muon_lr / lr`` and :func:`set_lr` applies it. With the default
  ``muon_adjust_lr = "match_rms_adamw"`` the same lr and weight decay suit both (Moonshot).
  FSDP is refused (its shards are not whole matrices).

:func:`configure` writes the config's hyper-parameters into the groups, at build and again after
a checkpoint is loaded (the config in force wins over the saved values). The
``e_score_correction_bias`` of the aux-loss-free balancing is a buffer, not a parameter: no
optimizer touches it (it moves by ``model.update_expert_bias``).

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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import OptimSection
from .muon import Muon

# 2-D parameters that stay with AdamW (decayed) under optimizer = "muon", as in Moonshot's and
# Kimi K2's training: a module or parameter name (one component of the parameter's name) -> why.
ADAMW_MATRICES = {
    "embed_tokens": "the embedding: a lookup table, each row updated only by its own token",
    "lm_head": "the output head (the embedding when tied)",
    "gate": "the MoE router (mlp.gate.weight [E, d]): expert scores, kept on AdamW",
    "position_bias": "a compressor's positional bias [compress_rate, dim] (V4): an additive table",
}
# Fused matrices: a parameter's last name component -> how many matrices its rows stack, each
# orthogonalised on its own (SwiGLU's gate and up projections: [2I, d] = gate [I, d] over up [I, d]).
FUSED_ROWS = {"gate_up_proj": 2}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """optimizer = "adamw": two AdamW groups: matrices (decayed) and vectors (norm weights, biases; not decayed)."""
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


def _adamw(groups: list[dict], cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the config's betas and eps: the fused kernel (one pass over each tensor) on CUDA and
    on the CPU, where it steps the speedrun's model ~5x faster than foreach (benchmarks/bench_train_small.py);
    foreach elsewhere and for FSDP's sharded parameters on the CPU."""
    from .distributed import _is_dtensor
    sharded = any(_is_dtensor(p) for g in groups for p in g["params"])
    fused = device.type == "cuda" or (device.type == "cpu" and not sharded)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def build_adamw(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return _adamw(param_groups(model, cfg.weight_decay), cfg, next(model.parameters()).device)


def optimizer_role(name: str, p: torch.Tensor) -> str:
    """Where a parameter goes under optimizer = "muon": "muon", "decay" (AdamW, decayed) or
    "no_decay" (AdamW: norm weights, biases, any vector)."""
    if p.ndim < 2:
        return "no_decay"
    if set(name.split(".")[-2:]) & ADAMW_MATRICES.keys():
        return "decay"
    return "muon"


def muon_param_groups(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], dict[torch.Tensor, int]]:
    """({role: parameters} of :func:`optimizer_role`, {fused Muon parameter: matrices its rows stack})."""
    roles: dict[str, list[torch.Tensor]] = {"muon": [], "decay": [], "no_decay": []}
    blocks: dict[torch.Tensor, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = optimizer_role(name, p)
        roles[role].append(p)
        if role == "muon" and name.split(".")[-1] in FUSED_ROWS:
            blocks[p] = FUSED_ROWS[name.split(".")[-1]]
    return roles, blocks


def build_muon(model: nn.Module, cfg: OptimSection) -> "MuonAdamW":
    """Muon over the hidden matrices, AdamW over the rest (:func:`muon_param_groups`)."""
    from torch.distributed.tensor import DTensor

    roles, blocks = muon_param_groups(model)
    if any(isinstance(p, DTensor) for p in roles["muon"]):
        raise ConfigError("[optim] optimizer = 'muon' cannot train FSDP-sharded parameters (Newton-Schulz "
                          "orthogonalises whole matrices): set [parallel] fsdp = false, or optimizer = 'adamw'")
    if not roles["muon"]:
        raise ConfigError("[optim] optimizer = 'muon': the model has no hidden matrices for Muon")
    groups = [{"params": roles["decay"], "name": "decay"}]
    if roles["no_decay"]:
        groups.append({"params": roles["no_decay"], "name": "no_decay"})
    adamw = _adamw(groups, cfg, next(model.parameters()).device)
    muon = Muon([{"params": roles["muon"], "name": "muon"}], lr=cfg.lr, row_blocks=blocks)
    optimizer = MuonAdamW(adamw, muon)
    configure(optimizer, cfg)
    return optimizer


class MuonAdamW:
    """AdamW and Muon stepped as one optimizer: what the trainer, checkpoints and the distributed
    runtime use of an optimizer (``param_groups``, ``state``, ``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``), with AdamW's groups first. The state dict is a single
    optimizer's: parameters numbered 0.. across all groups in order."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({int(i) + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        saved = [g.get("name") for g in sd["param_groups"]]
        ours = [g.get("name") for g in self.param_groups]
        if saved != ours:
            raise ValueError(f"the saved optimizer has parameter groups {saved}, this one {ours}")
        state = {int(i): s for i, s in sd["state"].items()}
        first, offset = 0, 0
        for opt in self.optimizers:
            n_groups = len(opt.param_groups)
            groups = sd["param_groups"][first:first + n_groups]
            ids = [int(i) for g in groups for i in g["params"]]
            opt.load_state_dict({"state": {i - offset: state[i] for i in ids if i in state},
                                 "param_groups": [{**g, "params": [int(i) - offset for i in g["params"]]}
                                                  for g in groups]})
            first, offset = first + n_groups, offset + len(ids)

    def __repr__(self) -> str:
        return f"MuonAdamW(\n{self.adamw!r},\n{self.muon!r})"


# optim.optimizer -> builder (the names are nanoseek.train.config.OPTIMIZERS)
OPTIMIZERS: dict[str, Callable[[nn.Module, OptimSection], Any]] = {"adamw": build_adamw, "muon": build_muon}


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW | MuonAdamW:
    """The optimizer ``[optim] optimizer`` names, over ``model``'s trainable parameters."""
    return OPTIMIZERS[cfg.optimizer](model, cfg)


def optimizer_kind(groups: list[dict[str, Any]]) -> str:
    """"muon" or "adamw": which optimizer made these parameter groups (live or saved)."""
    return "muon" if any(g.get("name") == "muon" for g in groups) else "adamw"


def configure(optimizer: torch.optim.Optimizer | MuonAdamW, cfg: OptimSection) -> None:
    """Write ``cfg``'s hyper-parameters into every group (by its name); the lr follows at the next
    :func:`set_lr`. Called at build and after loading a checkpoint: the config in force wins."""
    muon_wd = cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay
    for group in optimizer.param_groups:
        name = group.get("name")
        if name == "muon":
            group.update(weight_decay=muon_wd, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                         ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr,
                         lr_scale=(cfg.muon_lr or cfg.lr) / cfg.lr)
        else:
            group.update(betas=tuple(cfg.betas), eps=cfg.eps,
                         weight_decay=cfg.weight_decay if name == "decay" else 0.0)
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)


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


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """The schedule's lr on every group; a group with ``lr_scale`` (Muon's) gets ``lr * lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = ["param_groups", "muon_param_groups", "optimizer_role", "build_optimizer", "build_adamw", "build_muon",
           "MuonAdamW", "OPTIMIZERS", "ADAMW_MATRICES", "FUSED_ROWS", "configure", "optimizer_kind", "LRSchedule",
           "set_lr"]
