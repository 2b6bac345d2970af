"""Expert-parallel all-to-all: bytes per token per MoE layer and time on the GPU's links.

With expert parallelism over ``ep`` GPUs, each token's hidden state is *dispatched* to the GPUs
holding its ``K`` routed experts and their outputs are *combined* back. As in the DeepSeek-V3
report, dispatch is sent in FP8 (1 byte per value plus one fp32 scale per 128 values) and combine
in BF16 (2 bytes). The backward pass moves the same volume again (FP8 activation gradients to the
experts, BF16 back), so training traffic is twice the forward traffic reported here.

A token is sent once per destination GPU (several of its experts on one GPU share the copy).
Across nodes, DeepSeek's node-limited routing sends each token over InfiniBand once per
destination node, at most ``topk_group`` nodes when expert groups line up with nodes
(``n_group`` a multiple of the node count); within a node NVLink forwards it to the expert GPUs.
Without that alignment the expected number of nodes under uniform routing is used. Network and
NVLink transfers run concurrently, so the time is the slower of the two, against the layer's
forward compute time at the training MFU. A ratio under 1 means the all-to-all can be hidden
behind compute (DualPipe overlaps one micro-batch's communication with another's compute).

The H100 and H800 share FLOP/s; the H800's NVLink is 400 GB/s instead of 900, which is the whole
difference when the EP group fits in one node, and none when InfiniBand is the bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..model.config import ModelConfig
from .flops import DEFAULT_SEQ_LEN, EstimateError, layer_forward_flops_per_token
from .gpus import GPUS, GPUSpec

FP8_SCALE_BYTES_PER_VALUE = 4 / 128      # one fp32 scale per 1x128 tile


@dataclass
class EPComm:
    gpu: str
    ep: int
    nodes: int                              # nodes the EP group spans
    gpus_per_node: int                      # EP ranks per node
    top_k: int
    dispatch_bytes: float                   # K copies in FP8 + scales, before de-duplication
    combine_bytes: float                    # K copies in BF16
    node_limited: bool
    nodes_per_token: float                  # destination nodes per token (expected)
    remote_nodes_per_token: float
    network_bytes_per_token: float         # forward, dispatch + combine, per MoE layer
    nvlink_bytes_per_token: float
    network_time_us: float                  # per token per MoE layer, forward
    nvlink_time_us: float
    comm_time_us: float                     # the slower of the two
    layer_flops_per_token: float            # forward, first MoE layer
    compute_time_us: float                  # at the training MFU on this GPU's BF16 peak
    comm_to_compute: float                  # forward; < 1 can be hidden
    train_comm_to_compute: float            # forward + backward: 2x traffic, 3x compute


@dataclass
class CommEstimate:
    chosen: EPComm
    by_gpu: list[EPComm] = field(default_factory=list)      # the same layout on each built-in GPU


def ep_all_to_all(cfg: ModelConfig, gpu: GPUSpec, ep: int, *, seq_len: int = DEFAULT_SEQ_LEN,
                  mfu: float = 0.4) -> EPComm:
    if not cfg.n_routed_experts or not cfg.num_moe_layers:
        raise EstimateError("expert-parallel communication needs a config with MoE layers")
    if ep < 1 or cfg.n_routed_experts % ep:
        raise EstimateError(f"ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
    G = gpu.gpus_per_node
    if ep > G and ep % G:
        raise EstimateError(f"ep={ep} spans nodes of {G} GPUs ({gpu.name}): it must be a multiple of {G}")
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    g, n = min(ep, G), math.ceil(ep / G)
    disp = d * (1 + FP8_SCALE_BYTES_PER_VALUE)
    comb = d * 2.0

    node_limited = False
    if n == 1:
        m = 1.0
    else:
        ng, tg = cfg.n_group or 1, cfg.topk_group or (cfg.n_group or 1)
        if cfg.topk_method in ("noaux_tc", "group_limited_greedy") and ng % n == 0 and tg < ng:
            node_limited = True        # topk_group groups of ng // n per node: hypergeometric
            per_node = ng // n
            miss = math.comb(ng - per_node, tg) / math.comb(ng, tg)
            m = n * (1 - miss)
        else:
            m = n * (1 - (1 - 1 / n) ** k)
    remote_nodes = m * (n - 1) / n
    # In each destination node, the K/m experts land on distinct GPUs; all but the receiving one
    # are reached over NVLink.
    distinct = g * (1 - (1 - 1 / g) ** (k / m))
    nvlink_copies = m * distinct * (g - 1) / g
    net_bytes = remote_nodes * (disp + comb)
    nvl_bytes = nvlink_copies * (disp + comb)
    t_net = net_bytes / gpu.network_bytes_s * 1e6
    t_nvl = nvl_bytes / gpu.nvlink_bytes_s_per_direction * 1e6
    comm = max(t_net, t_nvl)
    first_moe = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    flops = layer_forward_flops_per_token(cfg, first_moe, seq_len)
    compute = flops / (mfu * gpu.bf16_flops) * 1e6
    return EPComm(gpu=gpu.name, ep=ep, nodes=n, gpus_per_node=g, top_k=k, dispatch_bytes=k * disp,
                  combine_bytes=k * comb, node_limited=node_limited, nodes_per_token=m,
                  remote_nodes_per_token=remote_nodes, network_bytes_per_token=net_bytes,
                  nvlink_bytes_per_token=nvl_bytes, network_time_us=t_net, nvlink_time_us=t_nvl,
                  comm_time_us=comm, layer_flops_per_token=flops, compute_time_us=compute,
                  comm_to_compute=comm / compute, train_comm_to_compute=2 * comm / (3 * compute))


def comm_estimate(cfg: ModelConfig, gpu: GPUSpec, ep: int, *, seq_len: int = DEFAULT_SEQ_LEN,
                  mfu: float = 0.4) -> CommEstimate | None:
    """The all-to-all for ``ep`` on ``gpu`` and on every built-in GPU; None for a dense model or
    ep=1 (no all-to-all)."""
    if not cfg.n_routed_experts or not cfg.num_moe_layers or ep == 1:
        return None
    chosen = ep_all_to_all(cfg, gpu, ep, seq_len=seq_len, mfu=mfu)
    others = []
    for spec in GPUS.values():
        if ep <= spec.gpus_per_node or ep % spec.gpus_per_node == 0:
            others.append(ep_all_to_all(cfg, spec, ep, seq_len=seq_len, mfu=mfu))
    return CommEstimate(chosen=chosen, by_gpu=others)
