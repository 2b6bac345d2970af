"""Simulated FP8 training (DeepSeek-V3's fine-grained scaling), emulated by quantise-dequantise.

DeepSeek-V3 trains with FP8 (e4m3) inputs for all three GEMMs of every linear layer:

* forward   y  = x W^T      x quantised per **1x128 tile** (one token, 128 channels of the
                            inner dim), W per **128x128 block**;
* dgrad     dx = dy W       dy per 1x128 tile (one token, 128 output channels), W per 128x128 block;
* wgrad     dW = dy^T x     inner dim is the tokens: dy and x per **128x1 tile** (128 tokens, one
                            channel), the report's "1x128 in the forward, 128x1 in the backward";

with one fp32 scale = amax / 448 per tile/block (448 is e4m3's largest finite value) and the
products accumulated in fp32. The embedding, the output head, the MoE router, the norms and the
attention core (softmax(QK^T)V) stay in high precision; so does every elementwise op.

Here the e4m3 rounding is real (``torch.float8_e4m3fn`` exists on the CPU: scale, cast to
float8, cast back, unscale) and the GEMMs run in fp32 on the dequantised values, which is what
an FP8 tensor core computes when it accumulates in fp32. Simplifications, deliberate:

* the H800's limited-precision (~14-bit) accumulation inside a 128-element interval, which
  DeepSeek promote to fp32 every 128 elements, is not emulated: we accumulate in fp32 throughout;
* the linear's output is rounded to bf16 (V3 writes GEMM outputs in bf16); every other
  activation of the model stays fp32, and master weights, gradients and optimizer state are fp32.

``fmt="bf16"`` is the control for an ablation: the same three GEMMs with bf16-rounded inputs and
fp32 accumulation (what a bf16 tensor-core GEMM does), outputs rounded to bf16. Comparing the two
isolates what the report claims: FP8's relative loss difference to bf16 (< 0.25% in V3).

The model is changed from outside, without editing its code: :func:`enable_simulated_precision`
rebinds ``forward`` on every ``nn.Linear`` except ``lm_head``, and replaces the expert GEMM
(``gemm``) of the stacked routed :class:`Experts` by :func:`simulated_grouped_linear`, whose
per-expert GEMMs get per-expert 128x128 weight blocks; the experts' dispatch and combine (and
expert parallelism's, which wraps the same expert MLP) are the model's own. Both are instance
attributes, so :func:`disable_simulated_precision` restores the originals by deleting them. The
router (``Gate``, not an ``nn.Linear``) and the embedding are untouched.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts, grouped_linear

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)    # 448
TILE = 128                                                 # DeepSeek-V3's tile / block edge
FORMATS = ("fp8", "bf16")


# ---------------------------------------------------------------------------- quantisers
def quantize_blockwise(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 quantise-dequantise with one fp32 scale per ``block`` (rows x cols) of the last two dims.

    x [..., R, C] -> (dequantised fp32 [..., R, C], scales [..., ceil(R/br), ceil(C/bc)]); leading
    dims are separate matrices (stacked experts), never sharing a block. The scale of a block is
    its amax / 448, so its largest element maps to e4m3's largest finite value; an all-zero block
    gets scale 1. Edge blocks that do not fill ``block`` are scaled over what they hold.
    """
    if x.dim() < 2:
        raise ValueError(f"quantize_blockwise expects a matrix (or a stack of them), got shape {tuple(x.shape)}")
    *lead, R, C = x.shape
    br, bc = min(block[0], max(R, 1)), min(block[1], max(C, 1))  # a block larger than x is x: skip the padding
    xf = x.float().reshape(-1, R, C)
    pr, pc = (-R) % br, (-C) % bc
    if pr or pc:
        xf = F.pad(xf, (0, pc, 0, pr))
    nr, nc = xf.shape[1] // br, xf.shape[2] // bc
    blocks = xf.view(-1, nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(2, 4), keepdim=True)                       # [B, nr, 1, nc, 1]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale).to(torch.float8_e4m3fn)
    deq = (q.float() * scale).view(-1, nr * br, nc * bc)[:, :R, :C]
    return deq.reshape(*lead, R, C), scale.view(*lead, nr, nc)


def quantize_activation_tiles(x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """x [M, K] quantised per 1 x ``tile`` tile along K (each token's channels, 128 at a time)."""
    return quantize_blockwise(x, (1, tile))[0]


def quantize_token_tiles(x: torch.Tensor, tile: int = TILE, counts: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] quantised per ``tile`` x 1 tile along M (128 tokens of one channel): wgrad's operands.

    ``counts`` [E]: the rows are E consecutive segments (the tokens of each expert); tiles start
    at every segment's first row and never cross into the next segment.
    """
    if counts is None:
        return quantize_blockwise(x, (tile, 1))[0]
    M, K = x.shape
    counts = counts.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts                                # first row of each segment
    seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=M)
    tiles_per_seg = (counts + tile - 1) // tile
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    row_tile = first_tile[seg] + (torch.arange(M, device=x.device) - starts[seg]) // tile     # [M]
    xf = x.float()
    amax = torch.zeros(int(tiles_per_seg.sum()), K, device=x.device).scatter_reduce_(
        0, row_tile[:, None].expand(M, K), xf.abs(), "amax")                 # [n_tiles, K]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))[row_tile]           # [M, K]
    return (xf / scale).to(torch.float8_e4m3fn).float() * scale


def quantize_weight_blocks(w: torch.Tensor, block: int = TILE) -> torch.Tensor:
    """w [N, K] (or stacked [E, N, K]) quantised per ``block`` x ``block`` block of each matrix."""
    return quantize_blockwise(w, (block, block))[0]


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back to fp32 (the control format)."""
    return x.to(torch.bfloat16).float()


# ---------------------------------------------------------------------------- the linear GEMMs
def _operands(fmt: str, block: int):
    """(forward/dgrad activation, weight, wgrad token-tile) quantisers of a format."""
    if fmt == "fp8":
        return (lambda t: quantize_activation_tiles(t, block), lambda w: quantize_weight_blocks(w, block),
                lambda t, counts=None: quantize_token_tiles(t, block, counts))
    if fmt == "bf16":
        return round_bf16, round_bf16, lambda t, counts=None: round_bf16(t)
    raise ValueError(f"unknown simulated format {fmt!r}; expected one of {FORMATS}")


class _SimulatedLinear(torch.autograd.Function):
    """y = x W^T (+ b) with quantised GEMM inputs in forward, dgrad and wgrad; fp32 accumulation."""

    @staticmethod
    def forward(ctx, x, weight, bias, fmt, block, out_dtype):
        act_q, w_q, _ = _operands(fmt, block)
        K = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, K).float()                                      # [M, K]
            wq = w_q(weight.float())                                           # [N, K], reused by dgrad
            y = act_q(x2) @ wq.T                                               # [M, N] fp32 accumulation
            if bias is not None:
                y = y + bias.float()
            y = round_bf16(y)                                                  # GEMM output written in bf16
        ctx.save_for_backward(x, wq, bias)
        ctx.fmt, ctx.block, ctx.weight_dtype = fmt, block, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, wq, bias = ctx.saved_tensors
        act_q, _, tok_q = _operands(ctx.fmt, ctx.block)
        N, K = wq.shape
        grad_x = grad_w = grad_b = None
        with torch.autocast(x.device.type, enabled=False):
            g = grad_out.reshape(-1, N).float()                                # [M, N]
            if ctx.needs_input_grad[0]:
                grad_x = (act_q(g) @ wq).view(*x.shape[:-1], K).to(x.dtype)                   # dgrad
            if ctx.needs_input_grad[1]:
                x2 = x.reshape(-1, K).float()
                grad_w = (tok_q(g).T @ tok_q(x2)).to(ctx.weight_dtype)                          # wgrad [N, K]
            if bias is not None and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class _SimulatedGroupedLinear(torch.autograd.Function):
    """The routed experts' GEMMs: rows of x sorted by expert (counts[e] rows each) times W[e]^T.

    Activation tiles are per token, so one quantisation covers every expert; weights get their
    own 128x128 blocks per expert; wgrad's 128-token tiles restart at every expert's segment.
    """

    @staticmethod
    def forward(ctx, x, weight, counts, fmt, block, out_dtype):
        act_q, w_q, _ = _operands(fmt, block)
        with torch.autocast(x.device.type, enabled=False):
            wq = w_q(weight.float())                                           # [E, N, K]
            y = round_bf16(grouped_linear(act_q(x.float()), wq, counts))        # [M, N]
        ctx.save_for_backward(x, wq, counts)
        ctx.fmt, ctx.block, ctx.weight_dtype = fmt, block, weight.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, wq, counts = ctx.saved_tensors
        act_q, _, tok_q = _operands(ctx.fmt, ctx.block)
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            g = grad_out.float()                                               # [M, N]
            if ctx.needs_input_grad[0]:
                grad_x = grouped_linear(act_q(g), wq.transpose(1, 2).contiguous(), counts).to(x.dtype)   # dgrad
            if ctx.needs_input_grad[1]:
                gq, xq = tok_q(g, counts), tok_q(x.float(), counts)
                grad_w = torch.zeros(wq.shape, dtype=ctx.weight_dtype, device=wq.device)
                start = 0
                for e, n in enumerate(counts.tolist()):                        # wgrad: contract over each expert's tokens
                    if n:
                        grad_w[e] = gq[start:start + n].T @ xq[start:start + n]
                        start += n
        return grad_x, grad_w, None, None, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def simulated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     fmt: str = "fp8", block: int = TILE) -> torch.Tensor:
    """``F.linear`` with the three GEMMs in simulated ``fmt`` ("fp8" e4m3 tiles/blocks, or "bf16")."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown simulated format {fmt!r}; expected one of {FORMATS}")
    return _SimulatedLinear.apply(x, weight, bias, fmt, block, _out_dtype(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block: int = TILE) -> torch.Tensor:
    """DeepSeek-V3's FP8 linear, simulated: e4m3 inputs of all three GEMMs, fp32 accumulation."""
    return simulated_linear(x, weight, bias, "fp8", block)


# ---------------------------------------------------------------------------- applying to a model
def simulated_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                             fmt: str = "fp8", block: int = TILE) -> torch.Tensor:
    """``moe.grouped_linear`` (rows of x sorted by expert times W[e]^T) with the three GEMMs in
    simulated ``fmt``, each expert its own weight blocks: the experts' ``gemm`` under FP8."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown simulated format {fmt!r}; expected one of {FORMATS}")
    return _SimulatedGroupedLinear.apply(x, weight, counts, fmt, block, _out_dtype(x))


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return simulated_linear(x, self.weight, self.bias, self._sim_fmt, self._sim_block)


def enable_simulated_precision(model: nn.Module, fmt: str = "fp8", block: int = TILE,
                               keep: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Simulate ``fmt`` GEMMs in every linear layer of ``model``; returns the modules changed.

    Changed: every ``nn.Linear`` (attention projections, dense MLPs, shared experts, MTP's
    eh_proj) except those whose name ends with an entry of ``keep`` (the output head), and the
    routed experts. Unchanged: embedding, router gate, norms, attention core.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown simulated format {fmt!r}; expected one of {FORMATS}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep):
            mod.forward = types.MethodType(_linear_forward, mod)
        elif isinstance(mod, Experts):
            mod.gemm = functools.partial(simulated_grouped_linear, fmt=fmt, block=block)
        else:
            continue
        mod._sim_fmt, mod._sim_block = fmt, block
        changed.append(name)
    return changed


def disable_simulated_precision(model: nn.Module) -> list[str]:
    """Undo :func:`enable_simulated_precision`; returns the modules restored."""
    restored = []
    for name, mod in model.named_modules():
        if hasattr(mod, "_sim_fmt"):
            del mod._sim_fmt, mod._sim_block
            if isinstance(mod, Experts):
                del mod.gemm                        # back to the class's grouped_linear
            else:
                del mod.forward
            restored.append(name)
    return restored


__all__ = ["E4M3_MAX", "TILE", "FORMATS", "quantize_blockwise", "quantize_activation_tiles", "quantize_token_tiles",
           "quantize_weight_blocks", "round_bf16", "simulated_linear", "simulated_grouped_linear", "fp8_linear", "enable_simulated_precision",
           "disable_simulated_precision"]
