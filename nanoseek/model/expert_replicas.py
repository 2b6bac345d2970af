"""Serving from redundant experts: an EPLB placement applied to an expert-parallel model.

:mod:`nanoseek.train.eplb` decides where the routed experts go: ``phy2log`` [layers, slots] (the
expert each physical slot holds; slot s lives on EP rank s // (slots / ep)), ``log2phy`` [layers,
experts, max replicas] and ``logcnt`` [layers, experts]. :func:`apply_redundant_experts` makes an
expert-parallel model serve that placement: each MoE layer's ``Experts`` becomes a
:class:`ReplicatedExperts` holding the weights of this rank's slots (a hot expert's weights on
several ranks), and its forward sends each (token, expert) pair to one replica of the expert:

    replica = (token index + EP rank) mod logcnt[expert]      round robin over the replicas
    slot    = log2phy[expert, replica]

then dispatches to the slot's rank exactly as :class:`~nanoseek.model.expert_parallel.ExpertParallelExperts`
does for experts (its forward runs on slot ids: all-to-all of the split sizes, dispatch, the
grouped expert MLP, combine). Every replica holds the same weights, so the output equals the
single-device model's; only where the work happens changes. The token counts returned (the MoE
load) stay per logical expert.

Inference only, on purpose: a replica's gradient would have to be summed into its expert's, so a
forward that needs gradients is refused. The main model's MoE layers take the placement, one row
per layer (the order of ``model.moe_layers()``, the order ``expert_load`` is logged in); the MTP
module's MoE keeps all its experts on every rank (speculative decoding only; no collectives).
The round robin is blind to the replicas' current load; DeepSeek does not publish its choice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import ExpertParallelExperts
from .moe import Experts


class ReplicatedExperts(ExpertParallelExperts):
    """This EP rank's physical expert slots of one layer's placement (see the module docstring).

    ``phy2log`` [slots], ``log2phy`` [experts, max replicas] (-1 padded), ``logcnt`` [experts]:
    one layer's rows of an EPLB placement; ``slots`` must be a multiple of the EP size.
    """

    def __init__(self, experts: Experts, group, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor):
        nn.Module.__init__(self)
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        E, P = experts.n_experts, int(phy2log.numel())
        _check_layer(phy2log, log2phy, logcnt, E, self.ep_size)
        self.n_logical, self.intermediate = E, experts.intermediate
        self.n_experts, self.n_local = P, P // self.ep_size      # the dispatch runs on slot ids
        self.first = self.ep_rank * self.n_local
        mine = phy2log[self.first:self.first + self.n_local].to(experts.gate_up_proj.device)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[mine].clone(), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.detach()[mine].clone(), requires_grad=False)
        dev = experts.gate_up_proj.device
        self.register_buffer("phy2log", phy2log.to(dev, torch.long), persistent=False)
        self.register_buffer("log2phy", log2phy.to(dev, torch.long), persistent=False)
        self.register_buffer("logcnt", logcnt.to(dev, torch.long), persistent=False)

    def extra_repr(self) -> str:
        held = self.phy2log[self.first:self.first + self.n_local].tolist()
        return (f"slots {self.first}..{self.first + self.n_local - 1} of {self.n_experts} holding experts {held} "
                f"of {self.n_logical} (EP rank {self.ep_rank} of {self.ep_size})")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
            raise RuntimeError("redundant experts serve inference only: run the forward under torch.no_grad() "
                               "(a replica's gradient would have to be summed into its expert's)")
        N = idx.shape[0]
        pos = torch.arange(N, device=idx.device).unsqueeze(1)                   # [N, 1]
        replica = (pos + self.ep_rank) % self.logcnt[idx]                       # [N, k] round robin
        slot = self.log2phy[idx, replica]                                       # [N, k] physical slot ids
        y, _ = super().forward(x, weights, slot)
        return y, torch.bincount(idx.reshape(-1), minlength=self.n_logical)   # the load per logical expert


def _check_layer(phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, E: int, ep: int) -> None:
    """A layer's placement is consistent with E experts and ``ep`` ranks, or a ValueError saying how not."""
    if phy2log.dim() != 1 or logcnt.shape != (E,) or log2phy.dim() != 2 or log2phy.shape[0] != E:
        raise ValueError(f"placement for {E} experts: expected phy2log [slots], log2phy [{E}, R], logcnt [{E}], "
                         f"got {tuple(phy2log.shape)}, {tuple(log2phy.shape)}, {tuple(logcnt.shape)}")
    P = phy2log.numel()
    if P and log2phy.shape[1] < int(logcnt.max()):
        raise ValueError(f"log2phy holds {log2phy.shape[1]} replicas per expert; logcnt asks for {int(logcnt.max())}")
    if P % ep:
        raise ValueError(f"{P} physical expert slots do not split evenly over {ep} expert-parallel ranks")
    if ((phy2log < 0) | (phy2log >= E)).any():
        raise ValueError(f"phy2log names experts outside 0..{E - 1}")
    if not torch.equal(torch.bincount(phy2log.long(), minlength=E).cpu(), logcnt.long().cpu()) or (logcnt < 1).any():
        raise ValueError("logcnt is not the replica count of phy2log (every expert needs at least one slot)")
    for e in range(E):
        slots = log2phy[e, :int(logcnt[e])]
        if ((slots < 0) | (slots >= P)).any() or not (phy2log[slots.clamp(0, P - 1)] == e).all():
            raise ValueError(f"log2phy[{e}] does not list the slots phy2log gives expert {e}")


def apply_redundant_experts(model: nn.Module, group, phy2log: torch.Tensor, log2phy: torch.Tensor,
                            logcnt: torch.Tensor) -> list[ReplicatedExperts]:
    """Give every main-model MoE layer of ``model`` (all experts on every rank, identical weights)
    its row of the placement (``phy2log`` [layers, slots], ``log2phy`` [layers, experts, R],
    ``logcnt`` [layers, experts]), in place. Returns the new expert modules."""
    layers = model.moe_layers()
    if phy2log.shape[0] != len(layers):
        raise ValueError(f"the placement has {phy2log.shape[0]} layers; the model has {len(layers)} MoE layers")
    out = []
    for i, moe in enumerate(layers):
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError(f"MoE layer {i} is already expert-parallel: apply the placement to the full model")
        moe.experts = ReplicatedExperts(moe.experts, group, phy2log[i], log2phy[i], logcnt[i])
        out.append(moe.experts)
    return out


__all__ = ["ReplicatedExperts", "apply_redundant_experts"]
