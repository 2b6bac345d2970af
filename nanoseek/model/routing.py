"""Node-limited routing (DeepSeek-V3 report 2.1.2): the rule's parameters and their checks.

With routed experts spread over ``nodes`` nodes in contiguous blocks (expert parallelism puts
expert ``j`` on rank ``j // (E / ep)``, ranks fill nodes in order), each token may use experts on
at most ``M = max_nodes`` nodes: the nodes with the highest sum of their ``ceil(K_r / M)`` highest
(bias-corrected) affinities, then the top-K_r experts among those nodes' experts. It bounds the
inter-node traffic of a token to M nodes. It is V3's group-limited routing (``noaux_tc``) with
``n_group = nodes``, ``topk_group = M`` when K_r = 2M (V3: K_r = 8, M = 4; HF's group score is the
top-2 sum).

In nanoseek it is a training option (``[train] max_nodes_per_token``, ``expert_nodes``) set on the
gates at run time (``Gate.node_limit``); it never enters config.json, so a checkpoint loads in
transformers unchanged and routes there by its own ``n_group`` / ``topk_group`` (for a model
without group-limited routing: over all experts, a superset of the training choices). A model
whose config already limits routing to groups (``n_group > 1``) accepts it only when it is that
same rule (``nodes = n_group``, ``M = topk_group``): two different groupings are refused.

Pure arithmetic: importing it does not import torch.
"""

from __future__ import annotations


def per_node(top_k: int, max_nodes: int) -> int:
    """How many of a node's highest affinities make its score: ceil(K_r / M)."""
    return -(-top_k // max_nodes)


def node_limit_problem(config, nodes: int, max_nodes: int, ep: int = 1) -> str | None:
    """Why node-limited routing with these numbers cannot apply to ``config`` (None: it can)."""
    E, k = config.n_routed_experts or 0, config.num_experts_per_tok or 0
    if not E:
        return "the model has no routed experts"
    if getattr(config, "topk_method", "noaux_tc") != "noaux_tc":
        return f"node-limited routing is written for topk_method 'noaux_tc', not {config.topk_method!r}"
    if nodes < 1 or E % nodes:
        return f"the {E} routed experts do not split evenly over {nodes} nodes"
    if not 1 <= max_nodes <= nodes:
        return f"must be in [1, {nodes}] (the nodes the experts span)"
    if max_nodes * (E // nodes) < k:
        return (f"{max_nodes} node(s) of {E // nodes} experts cannot hold the {k} experts each token uses "
                "(num_experts_per_tok)")
    if ep > 1 and ep % nodes:
        return f"{nodes} nodes must group whole expert-parallel ranks ([parallel] ep = {ep} is not a multiple)"
    groups = config.n_group or 1
    if groups > 1 and (config.topk_group or groups) < groups and (nodes, max_nodes) != (groups, config.topk_group):
        return (f"the model's config already limits routing to topk_group = {config.topk_group} of n_group = "
                f"{groups} groups; node-limited routing must be that rule (expert_nodes = {groups}, "
                f"max_nodes_per_token = {config.topk_group}) or set n_group = 1 in [model]")
    return None




def layout_nodes(ep: int, ranks_per_node: int) -> int:
    """The nodes an expert-parallel group of ``ep`` ranks spans, ``ranks_per_node`` ranks a node
    (torchrun's LOCAL_WORLD_SIZE); 1 without expert parallelism."""
    return max(1, ep // max(1, ranks_per_node)) if ep > 1 else 1


def set_node_limit(model, nodes: int, max_nodes: int, ep: int = 1) -> int:
    """Node-limited routing on every gate of ``model`` (MTP's too); returns how many gates.
    Raises ValueError with the reason when the numbers do not fit the model."""
    why = node_limit_problem(model.config, nodes, max_nodes, ep)
    if why:
        raise ValueError(why)
    gates = [m for m in model.modules() if hasattr(m, "set_node_limit")]
    if not gates:
        raise ValueError("the model has no router with node-limited routing")
    for g in gates:
        g.set_node_limit(nodes, max_nodes, model.config, ep)
    return len(gates)


__all__ = ["per_node", "node_limit_problem", "layout_nodes", "set_node_limit"]
