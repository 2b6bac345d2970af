"""DeepSeekMoE: shared experts plus fine-grained routed experts with aux-loss-free balancing.

Gate (DeepSeek-V3, ``scoring_func="sigmoid"``, ``topk_method="noaux_tc"``), in fp32:
  1. s = sigmoid(x W_g^T)                                 affinity scores [N, E]
  2. s_b = s + e_score_correction_bias                    for SELECTION only
  3. groups of E/n_group experts scored by the sum of their top-2 s_b; keep topk_group groups
  4. top-k experts by s_b within kept groups
  5. weights = the UNBIASED s of the chosen experts, normalised to sum 1 (norm_topk_prob),
     times routed_scaling_factor
DeepSeek-V2 routing (softmax scores, ``greedy`` / ``group_limited_greedy`` with the group max)
is also supported so V2 checkpoints run. Node-limited routing (``Gate.node_limit = (nodes, M)``,
set by the trainer, never in config.json; :mod:`.routing`) replaces step 3 with the experts'
nodes as groups, scored by the sum of their top ceil(K/M) s_b, keeping M (ties: the lower node).

Experts run as batched work: the N*k (token, expert) pairs are sorted by expert and each
projection is ONE grouped matmul over contiguous per-expert segments (``torch._grouped_mm``
when the installed torch supports it on this device, else a loop over experts, never over
tokens). No token is dropped. :class:`Experts` keeps the two halves apart so each can be
swapped from outside without re-writing the other: the *expert MLP*
(:meth:`Experts.expert_mlp`, SwiGLU over rows already sorted by expert, its GEMMs done by the
module's ``gemm``, :func:`grouped_linear` by default) and the *dispatch/combine* around it
(:meth:`Experts.forward`: sort the pairs, run the expert MLP, weight and sum per token). Simulated
FP8 (``fp8.py``) replaces ``gemm``; expert parallelism (``expert_parallel.py``) replaces the
dispatch/combine with all-to-alls around the same expert MLP. Under ``torch.compile`` the grouped
path has data-dependent segment sizes and ``_grouped_mm`` has no fp32 CPU kernel for the compiler,
so: a compiled *training* forward (``[train] compile``, :mod:`nanoseek.train.compiled`) runs the
same sorted dispatch with each grouped GEMM as one opaque custom operator
(``nanoseek::grouped_linear``, its backward ``nanoseek::grouped_linear_grads``: the eager kernels,
so the arithmetic is the eager step's); the engine's compiled *decode* step (a module in eval
mode) has static shapes instead: each (token, expert) pair gathers its expert's matrices and runs
two batched matrix-vector products (as multiply-and-sum, which inductor fuses with the gather into
one reduction kernel: no gathered copy, checked in its generated CPU code; GPUs untested), reading
only the chosen experts' weights; that while the N k pairs are at most the E experts
(they read no more matrices than running every expert would) or their matrices at most
:data:`GATHER_MAX_BYTES` a layer. Beyond both (a large batch of large experts) every expert runs on
every token, weighted by the routing weights (zero for unchosen experts), as two matmuls that
read each expert once at E/k times the FLOPs. Measured on the project's AMD EPYC host (README,
Performance), the compiled decode step with the experts gathered is 1.14-1.63x the dense one from
4 to 256 rows of bench-moe and 16 to 64 of the speedrun's model, 1.25x with 6 MB experts at 16
rows, and even (1.02x) with those at 64 rows: 1.5 GB of gathered reads a layer.
Expert weights are stacked ``[E, out, in]`` in memory and split into HF's per-expert tensors
(``mlp.experts.{j}.gate_proj.weight``...) on save.

Auxiliary-loss-free balancing: each MoE layer counts the tokens routed to every expert during
training forwards; after the optimizer step, ``update_bias(gamma)`` moves each bias by gamma
towards balance (down if the expert got more than the mean load, up if less) from the load of
the whole batch (all micro-batches; all ranks when a ``load_reduce`` function is given).
An optional complementary sequence-wise balance loss with weight ``seq_aux_alpha``:
L = alpha * mean_seq sum_i f_i P_i with f_i = E / (K T) * (tokens of the sequence routed to i),
P_i = mean over the sequence of s_i / sum_j s_j.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp32 import fp32_linear, keep_fp32
from .kmajor import Linear
from .routing import node_limit_problem, per_node


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# top-k of at most this many, under torch.compile: k rounds of argmax (see top_k)
SMALL_TOPK = 4


def top_k(x: torch.Tensor, k: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dim, largest first (``sorted``
    False: in any order, as ``torch.topk``'s).

    ``torch.topk``, except under ``torch.compile`` for k <= SMALL_TOPK: there k rounds of argmax
    fuse into the graph's own kernels, while ``topk`` stays an external call of 40-75 us on a CPU
    however short the rows (a router's 2-3 calls per layer were ~10% of a compiled decode step at
    batch 64). The same entries for distinct values (ties: the lower index first, where torch.topk
    has an order of its own); each row needs at least k entries above -inf (the routers' configs
    guarantee it), else an index repeats."""
    if k > SMALL_TOPK or not torch.compiler.is_compiling():
        return x.topk(k, dim=-1, sorted=sorted)
    values, indices = [], []
    for _ in range(k):
        i = x.argmax(dim=-1, keepdim=True)
        values.append(x.gather(-1, i))
        indices.append(i)
        x = x.scatter(-1, i, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


class Gate(nn.Module):
    """The router (HF name ``mlp.gate``): weight [E, d] and e_score_correction_bias [E], fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group or 1, c.topk_group or (c.n_group or 1)
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.node_limit: tuple[int, int] | None = None   # (nodes, M): node-limited routing (set_node_limit)

    def set_node_limit(self, nodes: int, max_nodes: int, config: ModelConfig, ep: int = 1) -> None:
        """Route each token to experts on at most ``max_nodes`` of ``nodes`` contiguous expert blocks."""
        why = node_limit_problem(config, nodes, max_nodes, ep)
        if why:
            raise ValueError(why)
        # the config's own group rule already when groups are the nodes and it ranks them by as many
        # top scores as the node rule (noaux_tc: top-2 sums; group_limited_greedy: the top one)
        per_group = {"noaux_tc": 2, "group_limited_greedy": 1}.get(self.topk_method)
        same = (nodes, max_nodes) == (self.n_group, self.topk_group) and per_group == per_node(self.top_k, max_nodes)
        self.node_limit = None if same else (nodes, max_nodes)

    def _apply(self, fn, recurse=True):
        # The router stays exactly fp32 whatever dtype the model is cast to (HF keeps it fp32 too).
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32)."""
        logits = fp32_linear(x, self.weight)                                  # fp32 under autocast too
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.node_limit is not None:
            nodes, m = self.node_limit
            grouped = choice.view(-1, nodes, self.n_experts // nodes)
            node_scores = top_k(grouped, per_node(self.top_k, m))[0].sum(dim=-1)   # [N, nodes]
            keep = node_scores.sort(dim=-1, descending=True, stable=True).indices[:, :m]
            node_mask = torch.zeros_like(node_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~node_mask[..., None], float("-inf")).view(-1, self.n_experts)
        elif self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = top_k(grouped, 2)[0].sum(dim=-1)        # [N, n_group]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = top_k(group_scores, self.topk_group)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(-1, self.n_experts)
        idx = top_k(choice, self.top_k)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:  # also for top_k == 1 (weight 1), as HF and DeepSeek's reference code
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx, scores


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (it depends on torch/device).

    Probed once per (device, dtype), in a thread of its own: none of the caller's thread-local
    state reaches it (``no_grad`` / ``inference_mode`` would cache a spurious False for later
    training; autocast would change its dtype; an activation-checkpoint region's saved-tensor hooks
    and dispatch modes, around a first forward, would capture the probe's own backward).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    result: list[bool] = []
    # the caller's GPU (the current CUDA device is per thread too)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    thread = threading.Thread(target=lambda: result.append(_probe_grouped_mm(device, dtype)))
    thread.start()
    thread.join()
    return bool(result and result[0])


def _probe_grouped_mm(device_type: torch.device, dtype: torch.dtype) -> bool:
    try:
        if device_type.type == "cuda":
            torch.cuda.set_device(device_type)
        with torch.inference_mode(False), torch.enable_grad():
            # fixed values, not torch.randn: probing must not advance the global RNG
            x = (torch.arange(48, dtype=torch.float32, device=device_type).view(6, 8) / 48).to(dtype)
            w = (torch.arange(96, dtype=torch.float32, device=device_type).view(3, 4, 8).cos()).to(dtype)
            x.requires_grad_(True)
            w.requires_grad_(True)
            offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device_type)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            ref = torch.cat([x[:2] @ w[0].T, x[2:6] @ w[2].T])
            y.backward(torch.ones_like(y))
            return bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2)) and w.grad is not None
    except Exception:
        return False


def _grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs x [M, in] against w [E, out, in] here: rows of 16-byte multiples
    (in and out), some rows, and a device / dtype it supports."""
    aligned = (w.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * x.element_size()) % 16 == 0
    return aligned and x.shape[0] > 0 and grouped_mm_supported(x.device.type, x.dtype)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group; group e (counts[e] rows) times w[e]^T. x [M, in], w [E, out, in].

    torch._grouped_mm needs rows of 16-byte multiples (in and out); other widths (an fp32 expert
    10 wide) take the per-expert loop."""
    if _grouped_mm_applies(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(x[start:start + n] @ w[e].T)
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def grouped_linear_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                         counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two backward GEMMs of :func:`grouped_linear`: (dx [M, in], dw [E, out, in]) for dy [M, out].

    The same kernels autograd runs for ``torch._grouped_mm`` (dx = dy_e w[e]; dw[e] = dy_e^T x_e, one
    ragged-K grouped GEMM; zero for an expert without rows), so they equal its gradients bitwise."""
    if _grouped_mm_applies(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(dy, w, offs=offs), torch._grouped_mm(dy.t(), x, offs=offs)
    dx, dw, start = torch.empty_like(x), torch.zeros_like(w), 0
    for e, n in enumerate(counts.tolist()):
        if n:
            dx[start:start + n] = dy[start:start + n] @ w[e]
            dw[e] = dy[start:start + n].t() @ x[start:start + n]
            start += n
    return dx, dw


# grouped_linear as one opaque operator for torch.compile: its row counts per expert are data, which
# a graph cannot hold as shapes, and torch._grouped_mm has no fp32 kernel for the compiler. The op
# runs the eager function above (forward and backward), so a compiled training step computes the
# experts exactly as an eager one.
@torch.library.custom_op("nanoseek::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return grouped_linear(x, w, counts)


@grouped_linear_op.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::grouped_linear_grads", mutates_args=())
def _grouped_linear_grads_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                             counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_linear_grads(dy, x, w, counts)


@_grouped_linear_grads_op.register_fake
def _(dy, x, w, counts):
    return torch.empty_like(x), torch.empty_like(w)


def _op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _op_backward(ctx, dy):
    x, w, counts = ctx.saved_tensors
    dx, dw = _grouped_linear_grads_op(dy.contiguous(), x, w, counts)
    return dx, dw, None


grouped_linear_op.register_autograd(_op_backward, setup_context=_op_setup)


# The most expert weight bytes the compiled decode step gathers per MoE layer (Experts.forward) once
# its N k pairs outnumber the E experts: N k times one expert's matrices. Measured (module
# docstring), gathering beat running every expert on every token up to ~400 MB of such reads a
# layer and drew level at 1.5 GB.
GATHER_MAX_BYTES = 512 * 2**20


# An expert GEMM: (x [M, in] rows sorted by expert, w [E, out, in], counts [E]) -> [M, out].
GroupedGEMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [N, k] -> (order [N*k]: the (token, slot) pairs sorted by expert, stably; counts [E]: pairs
    per expert; token [N*k]: the token of each sorted pair). The dispatch half of every MoE forward."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)                                         # (token, slot) pairs by expert
    counts = torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts, order // k


def combine(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
            token: torch.Tensor) -> torch.Tensor:
    """The combine half: expert outputs y [N*k, d] of the sorted pairs, times their gate weights
    (weights [N, k]), summed per token into [N, d] (x's shape and dtype)."""
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class Experts(nn.Module):
    """E routed SwiGLU experts stacked: gate_up_proj [E, 2I, d], down_proj [E, d, I].

    ``gemm`` is the grouped GEMM both projections run through (a class default; an instance
    attribute set from outside, e.g. by simulated FP8, replaces it and deleting it restores it).
    """

    gemm: GroupedGEMM = staticmethod(grouped_linear)

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, d, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.intermediate = E, inter
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, inter))

    def expert_mlp(self, x: torch.Tensor, counts: torch.Tensor, gemm: GroupedGEMM | None = None) -> torch.Tensor:
        """The experts' SwiGLU on rows sorted by expert: x [M, d], counts [E_here] rows per expert
        (E_here = the experts this module holds) -> [M, d], row for row. ``gemm``: the module's by default."""
        gemm = gemm or self.gemm
        h = gemm(x, self.gate_up_proj, counts)                                # [M, 2I]
        gate, up = h.split(self.intermediate, dim=-1)                         # [M, I] each
        return gemm(self.act(gate, up), self.down_proj, counts)              # [M, d]

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation silu(gate) * up (a subclass may change it, e.g. V4's clamped SwiGLU)."""
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d], weights/idx [N, k] -> (sum_k w_k * expert_k(x) [N, d], tokens per expert [E])."""
        compiling = torch.compiler.is_compiling() and self.gemm is grouped_linear   # (a swapped GEMM: its own)
        if compiling and not self.training:          # the engine's compiled decode: static shapes
            pairs = x.shape[0] * idx.shape[1]
            # the byte budget first: for small experts its guard (rows <= a bound) holds at every
            # batch size, so the rows-vs-experts comparison adds no second graph
            if pairs * self.expert_nbytes() <= GATHER_MAX_BYTES or pairs <= self.n_experts:
                return self.forward_gathered(x, weights, idx)
            return self.forward_dense(x, weights, idx)
        order, counts, token = sort_by_expert(idx, self.n_experts)
        y = self.expert_mlp(x[token], counts, grouped_linear_op if compiling else None)   # [N*k, d]
        return combine(x, y, weights, order, token), counts

    def forward_dense(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same result as ``forward`` (up to rounding) with static shapes: every expert on every token."""
        N, d = x.shape
        E, inter = self.n_experts, self.intermediate
        h = F.linear(x, self.gate_up_proj.view(E * 2 * inter, d))            # [N, E*2I]
        gate, up = h.view(N, E, 2 * inter).split(inter, dim=-1)               # [N, E, I] each
        # 0 for unchosen experts; summed where a token chose an expert twice (V4's hash routing can)
        dense_w = x.new_zeros(N, E).scatter_add_(1, idx, weights.to(x.dtype))
        act = self.act(gate, up) * dense_w[:, :, None]                        # [N, E, I]
        y = torch.bmm(act.transpose(0, 1), self.down_proj.transpose(1, 2))    # [E, N, d]
        return y.sum(dim=0), self._counts(idx)

    def forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same result as ``forward`` (up to rounding) with static shapes, reading only the chosen
        experts: each (token, expert) pair's matrices gathered, two batched matrix-vector products.
        For the compiled decode only: run eagerly it materialises the gathered matrices."""
        N, d = x.shape
        chosen = idx.reshape(-1)                                              # [N*k]
        # products written as multiply-and-sum: compiled, the gather fuses into one reduction kernel
        # and no [N*k, 2I, d] copy is made (inductor's GPU bmm on a gathered operand would make one);
        # measured the same speed as bmm on a CPU, where inductor fuses both forms
        xs = x.repeat_interleave(idx.shape[1], dim=0)[:, None, :]             # [N*k, 1, d]
        gate, up = (self.gate_up_proj[chosen] * xs).sum(-1).split(self.intermediate, dim=-1)
        act = self.act(gate, up) * weights.reshape(-1, 1).to(x.dtype)         # [N*k, I]
        y = (self.down_proj[chosen] * act[:, None, :]).sum(-1).view(N, -1, d)   # [N, k, d]
        return y.sum(dim=1), self._counts(idx)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's matrices (gate/up and down): what each gathered pair reads."""
        return (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.gate_up_proj.element_size()

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Tokens per expert [E] without a scatter (a static-shape comparison)."""
        return (idx.reshape(-1, 1) == torch.arange(self.n_experts, device=idx.device)).sum(dim=0)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.gate = Gate(c)
        self.experts = Experts(c)
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts else None)
        self.seq_aux_alpha = 0.0
        self.register_buffer("load", torch.zeros(c.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # Children follow fn; the load counter (this module's only own tensor) stays exact fp32.
        if recurse:
            for child in self.children():
                child._apply(fn)
        return super()._apply(keep_fp32(fn), recurse=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat)
        out, counts = self.experts(flat, weights, idx)
        self.aux_loss = None  # never left over from an earlier (training) forward
        if self.training:
            self.load += counts.to(self.load.dtype)
            if self.seq_aux_alpha > 0:
                self.aux_loss = self._seq_aux_loss(scores, idx, B, T)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, d)

    def _seq_aux_loss(self, scores: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
        E, K = self.n_experts, self.top_k
        p = scores / scores.sum(dim=-1, keepdim=True)                          # normalised affinities
        P = p.view(B, T, E).mean(dim=1)                                       # [B, E]
        with torch.no_grad():
            f = torch.zeros(B, E, device=scores.device)
            f.scatter_add_(1, idx.view(B, T * K), torch.ones(B, T * K, device=scores.device))
            f = f * E / (K * T)
        return self.seq_aux_alpha * (f * P).sum(dim=1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """One aux-loss-free step from the load since the last call; returns that load."""
        load = self.load.clone()
        if load_reduce is not None:
            load = load_reduce(load)
        bias = self.gate.e_score_correction_bias
        if gamma and bias is not None and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load - 1 (along the last dim)."""
    mean = load.float().mean(dim=-1)
    return load.float().amax(dim=-1) / mean.clamp_min(1e-9) - 1
