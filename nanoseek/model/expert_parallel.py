"""Expert parallelism applied from outside the model: routed experts sharded over an EP group.

The model stays single-device (``moe.py``); :func:`apply_expert_parallel` rewires a built
model the way torchtitan does it, without touching the model's code: the ``Experts`` module of
every MoE layer (MTP's too) is swapped for an :class:`ExpertParallelExperts` (a subclass of ``Experts`` that replaces only the
dispatch/combine around the expert MLP) that holds only this
rank's contiguous block of ``E / ep`` experts, under the same parameter names
(``mlp.experts.gate_up_proj [E/ep, 2I, d]``, ``mlp.experts.down_proj [E/ep, d, I]``), and whose
forward dispatches tokens to the ranks that own their experts. Expert ``j`` lives on EP rank
``j // (E / ep)``. The gate, the shared experts and attention are untouched: they stay
replicated (data parallel).

One MoE forward on EP rank r, N local tokens, top-k routing (the gate already ran, replicated):

1. the N*k (token, expert) pairs are sorted by expert id, which also sorts them by destination
   rank; ``counts [E]`` is how many pairs go to each expert (also the load for the bias update);
2. every rank tells every other how many rows it will send to each of its local experts: an
   ``all_to_all_single`` of ``counts.view(ep, E/ep)``; the row totals are the uneven
   input/output split sizes of the next exchange;
3. **dispatch**: ``all_to_all_single`` of the token rows ``[N*k, d]``; rank r receives the rows
   for its experts from every source rank (source-major, expert-minor), reorders them by local
   expert and runs the expert MLP (``Experts.expert_mlp``: the two grouped GEMMs of SwiGLU), the
   very code of the single-device module, with whatever ``gemm`` it has (simulated FP8 too);
4. **combine**: the results go back with the inverse ``all_to_all_single``, are multiplied by
   the gate weights on the source rank (so the gate's gradient stays local) and summed per
   token with ``index_add``.

Gradients flow through both exchanges: :class:`AllToAll` is an autograd Function whose backward
is the all-to-all with the split sizes swapped. Every EP rank must run the same number of MoE
forwards (the exchanges are collectives), which training does: each rank does the same number of
micro-batches. No token is dropped and no capacity factor is used: the splits are whatever the
router decided.

Simplifications, on purpose: one row travels per (token, expert) pair, so a token whose k
experts include two on the same rank is sent twice (DeepSeek sends it once per destination GPU
and, across nodes, once per node, in FP8); rows travel in the activation dtype; the exchanges
are not overlapped with compute (DeepSeek's DualPipe hides them behind another micro-batch).
The split sizes are read on the host (``tolist``), a device sync per layer on GPUs.

:data:`COMM` counts the bytes this rank sends to *other* ranks (rows kept on the rank itself
are not network traffic), forward and backward, for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .moe import Experts, MoE, combine, sort_by_expert


@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks in expert all-to-alls (dispatch, combine, their backward)."""
    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent, self.calls = 0, 0


COMM = CommCounter()


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single of the rows of x: ``in_splits[j]`` rows go to rank j, ``out_splits[j]`` come back."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    me = dist.get_rank(group)
    row_bytes = x.element_size() * int(torch.Size(x.shape[1:]).numel())
    COMM.bytes_sent += (sum(in_splits) - in_splits[me]) * row_bytes
    COMM.calls += 1
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows of ``x`` [sum(in_splits), ...] exchanged over ``group``; autograd-aware."""
    return AllToAll.apply(x, list(out_splits), list(in_splits), group)


class ExpertParallelExperts(Experts):
    """This EP rank's block of routed experts, with the all-to-all dispatch/combine forward.

    Same interface as :class:`~nanoseek.model.moe.Experts`: ``forward(x [N, d], weights [N, k],
    idx [N, k]) -> (out [N, d], counts [E])`` where ``counts`` is the number of this rank's
    (token, expert) pairs routed to each of the E global experts. The expert MLP (and its
    ``gemm``) is inherited; only the dispatch and combine around it differ.
    """

    def __init__(self, experts: Experts, group):
        nn.Module.__init__(self)               # the weights are a slice of ``experts``', not new ones
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        E = experts.n_experts
        if E % self.ep_size:
            raise ValueError(f"{E} routed experts cannot be split evenly over an expert-parallel group of "
                             f"{self.ep_size} ranks ([parallel] ep must divide n_routed_experts)")
        self.n_experts, self.intermediate = E, experts.intermediate
        self.n_local = E // self.ep_size
        self.first = self.ep_rank * self.n_local            # global id of the first local expert
        sl = slice(self.first, self.first + self.n_local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[sl].clone())   # [E/ep, 2I, d]
        self.down_proj = nn.Parameter(experts.down_proj.detach()[sl].clone())         # [E/ep, d, I]

    def extra_repr(self) -> str:
        return (f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts} "
                f"(EP rank {self.ep_rank} of {self.ep_size})")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ep, n_local = self.ep_size, self.n_local
        order, counts, token = sort_by_expert(idx, self.n_experts)   # pairs by expert = by destination rank
        # 2. split sizes: send_counts[j, e] rows to local expert e of rank j; recv_counts[j, e] from rank j
        send_counts = counts.view(ep, n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        in_splits = send_counts.sum(dim=1).tolist()
        out_splits = recv_counts.sum(dim=1).tolist()
        # 3. dispatch, then sort the received rows (source-major) by local expert
        recv = all_to_all(x[token], out_splits, in_splits, self.group)             # [R, d]
        local_expert = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(ep),
                                               recv_counts.reshape(-1))          # [R]
        perm = local_expert.argsort(stable=True)
        y = self.expert_mlp(recv[perm], recv_counts.sum(dim=0))                    # [R, d]
        y = y[perm.argsort()]                                  # back to the received (source-major) order
        # 4. combine: back to the source ranks, weight by the gate, sum per token
        back = all_to_all(y, in_splits, out_splits, self.group)                    # [N*k, d]
        return combine(x, back, weights, order, token), counts


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, module) of every MoE block, MTP's included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, group) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every MoE layer of ``model`` over ``group``, in place.

    Call it on the full model (every rank holding all experts, identical weights); each rank
    keeps its block and frees the rest. Returns the new expert modules. Idempotent per layer is
    not supported: applying it twice is an error.
    """
    sharded = []
    for name, moe in moe_modules(model):
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError(f"{name}.experts is already expert-parallel")
        moe.experts = ExpertParallelExperts(moe.experts, group)
        sharded.append(moe.experts)
    return sharded


def expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Qualified name -> module of the expert-parallel blocks of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def gather_experts(local: torch.Tensor, module: ExpertParallelExperts) -> torch.Tensor:
    """All EP ranks' shards of one expert tensor ``[E/ep, ...]`` -> the full ``[E, ...]`` (collective)."""
    parts = [torch.empty_like(local) for _ in range(module.ep_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=module.group)
    return torch.cat(parts, dim=0)


def shard_experts(full: torch.Tensor, module: ExpertParallelExperts, name: str = "tensor") -> torch.Tensor:
    """This rank's block ``[E/ep, ...]`` of a full expert tensor ``[E, ...]``."""
    if full.shape[0] != module.n_experts:
        raise ValueError(f"{name}: expected {module.n_experts} experts in dim 0, got shape {tuple(full.shape)}")
    return full[module.first:module.first + module.n_local]


__all__ = ["AllToAll", "all_to_all", "ExpertParallelExperts", "apply_expert_parallel", "expert_parallel_modules",
           "gather_experts", "shard_experts", "moe_modules", "COMM", "CommCounter"]
