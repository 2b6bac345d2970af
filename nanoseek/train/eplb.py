"""EPLB: DeepSeek's expert-parallel load balancer (redundant experts), as a pure function.

Under expert parallelism every GPU holds a few routed experts; the slowest GPU of each MoE layer
sets the pace, so a popular expert makes its GPU the straggler. DeepSeek-V3 (§3.4) serves with
*redundant experts*: the heaviest experts get extra copies ("replicas"), a token of an expert goes
to one of its replicas, and the replicas are placed so that every GPU gets a similar load.
:func:`rebalance` computes such a placement from per-expert loads, with DeepSeek's two policies
(its open EPLB describes them; this is nanoseek's own code):

* **hierarchical** (when the number of nodes divides the number of expert groups): the expert
  groups are packed onto nodes so that every node gets the same number of groups and a similar
  load (group-limited routing then keeps a token's traffic on few nodes); inside each node the
  node's experts are replicated into the node's slots, and the replicas packed onto its GPUs;
* **global**: the experts are replicated regardless of groups and packed onto all GPUs.

The two steps, used by both policies:

* **replication** (:func:`replicate`): start with one replica per expert, then repeatedly give one
  more replica to the expert with the highest load per replica. This greedy minimises the largest
  load per replica max_e w_e / c_e over all replica counts c with sum c = slots (an exchange
  argument; ``tests/test_eplb.py`` checks it against a brute force);
* **packing** (:func:`balanced_packing`): items heaviest first, each to the lightest pack that is
  not yet full, every pack getting exactly items / packs items (greedy, not optimal; the tests
  show a case where it loses to another placement).

A replica's load is its expert's load divided by the expert's replica count (the tokens are spread
evenly over the replicas). The result, per MoE layer: ``phy2log`` [layers, slots] (the logical
expert of each physical slot; slot s lives on GPU s // (slots / gpus)), ``log2phy`` [layers,
experts, max count] (the slots of each expert, padded with -1) and ``logcnt`` [layers, experts]
(replica counts). :func:`gpu_loads` and :func:`imbalance` measure a placement (max / mean GPU load
per layer); :func:`contiguous_loads` is the baseline without replicas (expert e on GPU e // per).

:func:`nanoseek.model.expert_replicas.apply_redundant_experts` serves a placement on an
expert-parallel model (inference). Left out: the migration-cost variant (keeping experts where
they already are when the loads change), and re-placing periodically while serving.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import torch

from ..errors import ConfigError

POLICIES = ("auto", "hierarchical", "global")


class Placement(NamedTuple):
    phy2log: torch.Tensor     # [layers, slots] int64: the logical expert held by each physical slot
    log2phy: torch.Tensor     # [layers, experts, max replicas] int64: each expert's slots, -1 padded
    logcnt: torch.Tensor      # [layers, experts] int64: replicas per expert (>= 1, sums to slots)


# ---------------------------------------------------------------------------- the two greedy steps
def replicate(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate the experts of each row of ``weight`` [rows, E] into ``num_slots`` >= E slots.

    Slot i < E holds expert i; every further slot goes to the expert with the highest load per
    replica at that moment (ties: the lower index). Returns (slot2exp [rows, slots], replica rank
    of each slot [rows, slots], counts [rows, E])."""
    rows, E = weight.shape
    slot2exp = torch.empty(rows, num_slots, dtype=torch.int64)
    rank = torch.empty(rows, num_slots, dtype=torch.int64)
    cnt = torch.ones(rows, E, dtype=torch.int64)
    w = weight.tolist()
    for r in range(rows):
        heap = [(-w[r][e], e) for e in range(E)]     # (-load per replica, expert)
        heapq.heapify(heap)
        slots, ranks, c = list(range(E)), [0] * E, [1] * E
        for _ in range(num_slots - E):
            _, e = heapq.heappop(heap)
            slots.append(e)
            ranks.append(c[e])
            c[e] += 1
            heapq.heappush(heap, (-w[r][e] / c[e], e))
        slot2exp[r], rank[r], cnt[r] = torch.tensor(slots), torch.tensor(ranks), torch.tensor(c)
    return slot2exp, rank, cnt


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the items of each row of ``weight`` [rows, n] into ``num_packs`` packs of exactly
    n / num_packs items: heaviest first, each to the lightest pack with room (ties: the lower pack).
    Returns (pack of each item [rows, n], position of the item inside its pack [rows, n])."""
    rows, n = weight.shape
    per = n // num_packs
    pack = torch.empty(rows, n, dtype=torch.int64)
    pos = torch.empty(rows, n, dtype=torch.int64)
    w = weight.tolist()
    for r in range(rows):
        order = sorted(range(n), key=lambda i: (-w[r][i], i))
        heap = [(0.0, p, 0) for p in range(num_packs)]   # (pack load, pack, items in it); all start empty
        for i in order:
            load, p, k = heapq.heappop(heap)
            pack[r, i], pos[r, i] = p, k
            if k + 1 < per:                               # a full pack leaves the heap
                heapq.heappush(heap, (load + w[r][i], p, k + 1))
    return pack, pos


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation [rows, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())
    return inv


# ---------------------------------------------------------------------------- the policies
def _hierarchical(weight: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(phy2log, replica rank of each slot), both [layers, slots]; the global policy is this with
    one group and one node."""
    L, E = weight.shape
    group_size, gpus_per_node = E // num_groups, num_gpus // num_nodes
    experts_per_node, slots_per_node = E // num_nodes, num_slots // num_nodes
    slots_per_gpu = num_slots // num_gpus
    # 1. groups -> nodes: node n takes groups_per_node groups; renumber the experts ("node-major
    #    logical ids") so that node n's experts are n * experts_per_node ... + experts_per_node - 1.
    group_load = weight.view(L, num_groups, group_size).sum(-1)                  # [L, groups]
    node, pos = balanced_packing(group_load, num_nodes)
    groups_per_node = num_groups // num_nodes
    group_new = node * groups_per_node + pos                                      # [L, groups]: new group slot
    log2mlog = (group_new.unsqueeze(-1) * group_size + torch.arange(group_size)).view(L, E)
    mlog2log = _inverse(log2mlog)                                                 # node-major id -> expert
    # 2. replicate each node's experts into the node's slots         rows: [L * nodes, experts_per_node]
    node_w = weight.gather(1, mlog2log).view(L * num_nodes, experts_per_node)
    slot2m, rank, cnt = replicate(node_w, slots_per_node)                        # [L * nodes, slots_per_node]
    # 3. pack each node's replicas onto its GPUs                     rows: [L * nodes, slots_per_node]
    replica_w = (node_w / cnt).gather(1, slot2m)
    gpu, pos = balanced_packing(replica_w, gpus_per_node)
    where = gpu * slots_per_gpu + pos                                             # replica -> slot in node
    at = _inverse(where)                                                          # slot in node -> replica
    slot2m, rank = slot2m.gather(1, at), rank.gather(1, at)
    # back to global slots and logical experts
    offset = (torch.arange(num_nodes) * experts_per_node).repeat(L).unsqueeze(1)   # [L * nodes, 1]
    phy2mlog = (slot2m + offset).view(L, num_slots)
    return mlog2log.gather(1, phy2mlog), rank.view(L, num_slots)


def check(shape: tuple[int, int], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int,
          policy: str = "auto") -> str:
    """The policy :func:`rebalance` uses for these sizes ("hierarchical" or "global"); a
    :class:`ConfigError` naming the setting when they do not fit together."""
    L, E = shape
    for name, v in (("experts", E), ("slots", num_slots), ("groups", num_groups), ("nodes", num_nodes),
                    ("gpus", num_gpus)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"EPLB: {name} must be a positive integer, got {v!r}")
    if policy not in POLICIES:
        raise ConfigError(f"EPLB: policy {policy!r} is not one of {', '.join(POLICIES)}")
    if E % num_groups:
        raise ConfigError(f"EPLB: {E} experts do not split into {num_groups} equal groups")
    if num_gpus % num_nodes:
        raise ConfigError(f"EPLB: {num_gpus} GPUs do not split evenly over {num_nodes} nodes")
    if num_slots % num_gpus:
        raise ConfigError(f"EPLB: {num_slots} physical expert slots do not split evenly over {num_gpus} GPUs")
    if num_slots < E:
        raise ConfigError(f"EPLB: {num_slots} physical expert slots cannot hold {E} experts (need at least {E})")
    fits = num_groups % num_nodes == 0
    if policy == "hierarchical" and not fits:
        raise ConfigError(f"EPLB: the hierarchical policy needs the {num_nodes} nodes to divide the "
                          f"{num_groups} expert groups; use the global policy")
    return "hierarchical" if policy == "hierarchical" or (policy == "auto" and fits) else "global"


def rebalance(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
              policy: str = "auto") -> Placement:
    """A redundant-expert placement of ``num_replicas`` physical slots (experts + redundant ones,
    a multiple of ``num_gpus``) for the loads ``weight`` [layers, experts] (tokens per expert;
    a 1-D load is one layer). ``policy`` "auto" is DeepSeek's rule: hierarchical when
    ``num_nodes`` divides ``num_groups``, else global. See the module docstring."""
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.numel() == 0:
        raise ConfigError(f"EPLB: the loads must be a [layers, experts] table, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError("EPLB: the loads must be finite and non-negative")
    used = check(tuple(w.shape), num_replicas, num_groups, num_nodes, num_gpus, policy)
    groups, nodes = (num_groups, num_nodes) if used == "hierarchical" else (1, 1)
    phy2log, rank = _hierarchical(w, num_replicas, groups, nodes, num_gpus)
    L, E = w.shape
    logcnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    log2phy = torch.full((L, E, int(logcnt.max())), -1, dtype=torch.int64)
    width = log2phy.shape[2]
    log2phy.view(L, -1).scatter_(1, phy2log * width + rank, torch.arange(num_replicas).expand(L, -1).contiguous())
    return Placement(phy2log, log2phy, logcnt)


# ---------------------------------------------------------------------------- measuring a placement
def gpu_loads(weight: torch.Tensor, placement: Placement, num_gpus: int) -> torch.Tensor:
    """Load of every GPU [layers, gpus]: each replica carries its expert's load / replica count."""
    phy2log, _, logcnt = placement                    # a Placement or any (phy2log, log2phy, logcnt)
    w = torch.as_tensor(weight, dtype=torch.float64).reshape(logcnt.shape)
    per_replica = (w / logcnt).gather(1, phy2log)                                  # [L, slots]
    return per_replica.view(w.shape[0], num_gpus, -1).sum(-1)


def contiguous_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The baseline without replicas: experts in order, ceil(E / gpus) per GPU (expert e on GPU
    e // per; with fewer experts than GPUs the last GPUs stay empty). Returns [layers, gpus]."""
    w = torch.as_tensor(weight, dtype=torch.float64)
    w = w.unsqueeze(0) if w.dim() == 1 else w
    per = math.ceil(w.shape[1] / num_gpus)
    gpu = torch.arange(w.shape[1]) // per
    return torch.zeros(w.shape[0], num_gpus, dtype=torch.float64).index_add_(1, gpu, w)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """Max / mean GPU load of each layer (1 = perfectly balanced; a layer without load counts as 1)."""
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp_min(1e-300), torch.ones_like(mean))


__all__ = ["Placement", "POLICIES", "rebalance", "check", "replicate", "balanced_packing", "gpu_loads",
           "contiguous_loads", "imbalance"]
