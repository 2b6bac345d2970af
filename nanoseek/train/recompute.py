"""Activation recomputation (``[train] recompute``), applied from outside the model.

The backward pass needs tensors the forward computed; keeping them all is "none". Recomputation
keeps fewer and re-runs part of the forward during the backward (``torch.utils.checkpoint``,
non-reentrant). The model code stays as it is: :func:`apply_recompute` turns every decoder layer
(MTP's too) into a checkpointed region by giving the module a subclass whose ``forward`` runs the
layer's own forward under ``checkpoint`` (the way FSDP2's ``fully_shard`` re-classes a module), so
parameter names, state dicts, FSDP2 / expert-parallel wrapping and ``isinstance`` checks are
unchanged. The policies (:data:`POLICIES`, one default):

* ``none``: nothing recomputed (the default).
* ``full``: each layer keeps only its input; its whole forward is re-run in the backward
  (expert all-to-alls included under expert parallelism).
* ``selective``: DeepSeek-V3's choice (report section 3.2.3: "recompute all RMSNorm operations
  and MLA up-projections during back-propagation"), as a torch selective-checkpoint policy
  (``create_selective_checkpoint_contexts``) over the same layer regions: the outputs of the
  expensive ops are kept (the matmuls, i.e. the down-projections ``q_a_proj`` /
  ``kv_a_proj_with_mqa``, ``o_proj``, the router and the expert / shared-expert / dense SwiGLU
  GEMMs, and attention's SDPA output) and everything else is re-run from them: every RMSNorm,
  the MLA up-projections ``q_b_proj`` / ``kv_b_proj`` (their matmuls are deliberately NOT kept,
  so the per-head queries, keys and values are rebuilt from the latents ``c_Q`` / ``c_KV`` and
  never stored), RoPE and the other elementwise ops (SwiGLU's activation, residual adds, the
  MoE's routing and dispatch). The regions are drawn with module hooks: inside an attention
  module a matmul is recomputed unless it runs in one of its kept projections (``q_a_proj``,
  ``kv_a_proj_with_mqa``, ``o_proj``, V3.2's indexer projections); attention computed op by op
  (the CPU's math path, when MLA's key and value head sizes differ) is then recomputed too, where
  a fused kernel's output is kept. Per DeepSeek-V3 MoE layer (bf16) it keeps ~34% of the bytes of
  ``none`` (``nanoseek.estimate.activations``); the time it adds is the elementwise work, the
  routing and the up-projections, which on a CPU cost nearly as much as the matmuls it keeps
  (``benchmarks/bench_recompute.py``: between ``none`` and ``full``, noisy on a shared machine);
  on a GPU the matmuls dominate more (not measured here).

Side effects of a layer's forward must happen once per step, not again in the recompute: the
MoE load counter (``MoE.load``, the aux-loss-free bias update's input) and the losses a layer
leaves on its modules (``aux_loss``, V3.2's ``indexer_loss``) are restored after each recompute.
Inference (no grad, or a KV cache) never recomputes.

:func:`held_activation_bytes` measures what a forward leaves alive for the backward, by module
and op; ``nanoseek.estimate.activations`` counts the same per token analytically for each mode
(``kernels="eager"``; the tests hold the two equal), and with fused kernels for the estimate.

Left out: recomputation policies per layer kind (e.g. only MoE layers), offloading activations
to host memory, and DeepSeek-V4 models (refused in one line: their blocks carry
hyper-connection state this module does not know).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import ConfigError
from ..model.attention import MLA, MHA
from ..model.cache import KVCache
from ..model.moe import MoE
from ..model.registry import require
from ..model.transformer import DecoderLayer

aten = torch.ops.aten

# ops whose outputs the selective policy keeps: matmuls of projections (not the up-projections)
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
if hasattr(aten, "_grouped_mm"):
    _MATMULS.add(aten._grouped_mm.default)
# ...and fused attention (its output and log-sum-exp); attention computed op by op (the CPU's math
# path, taken when MLA's key and value head sizes differ) is recomputed instead: its matmuls run
# inside the attention module itself, not in a projection
_ATTENTION = {getattr(aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(aten, n)}


@dataclass(frozen=True)
class Policy:
    name: str
    doc: str
    context_fn: Callable[[], tuple[Any, Any]] | None    # None: plain checkpoint (or no recompute)
    active: bool = True


class _Zone:
    """Whether the innermost running module of a selective layer is one whose matmuls are
    recomputed (attention's core, an MLA up-projection: True) or a kept projection (False)."""
    stack: list[bool] = []


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _ATTENTION or (op in _MATMULS and not (_Zone.stack and _Zone.stack[-1])):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def _mark_zones(block: nn.Module) -> None:
    """Hooks telling :func:`_selective_policy` where a selective layer's forward is."""
    def push(flag):
        return lambda module, args: _Zone.stack.append(flag)

    def pop(module, args, output):
        _Zone.stack.pop()

    for m in block.modules():
        if isinstance(m, (MLA, MHA)):
            ups = {id(getattr(m, "q_b_proj", None)), id(getattr(m, "kv_b_proj", None))}
            m.register_forward_pre_hook(push(True))
            m.register_forward_hook(pop, always_call=True)
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    sub.register_forward_pre_hook(push(id(sub) in ups))
                    sub.register_forward_hook(pop, always_call=True)


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("none", "keep every activation (no recomputation)", None, active=False),
    Policy("selective", "DeepSeek-V3: re-run RMSNorms and the MLA up-projections (and cheap elementwise ops); "
                        "keep matmul and attention outputs", _selective_contexts),
    Policy("full", "keep each layer's input only; re-run the layer in the backward", None),
)}
DEFAULT = "none"


def policy(name: str, where: str = "[train] recompute") -> Policy:
    if name not in POLICIES:
        raise ConfigError(f"{where} = {name!r}: unknown recomputation; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


# ---------------------------------------------------------------------------- applying it
@contextlib.contextmanager
def _side_effects_once(block: nn.Module):
    """Undo, after a recompute, what a layer's forward leaves behind: MoE load counts, losses."""
    moes = [m for m in block.modules() if isinstance(m, MoE)]
    attn = [m for m in block.modules() if isinstance(m, (MLA, MHA))]
    loads = [m.load.clone() for m in moes]
    aux = [m.aux_loss for m in moes]
    kl = [getattr(m, "indexer_loss", None) for m in attn]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, load in zip(moes, loads):
                m.load.copy_(load)
        for m, a in zip(moes, aux):
            m.aux_loss = a
        for m, k in zip(attn, kl):
            if hasattr(m, "indexer_loss"):
                m.indexer_loss = k


class _Recompute:
    """The context a recompute runs in: the policy's own, and the side effects undone after."""

    def __init__(self, policy_context, block: nn.Module):
        self.policy_context, self.block = policy_context, block
        self.stack = contextlib.ExitStack()

    def __enter__(self):   # (again for each backward that recomputes the region)
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(_side_effects_once(self.block))
        self.stack.enter_context(self.policy_context)                 # the policy innermost
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _has_cache(args, kwargs) -> bool:
    return any(isinstance(a, KVCache) for a in (*args, *kwargs.values()))


_CLASSES: dict[tuple[type, str], type] = {}


def _recompute_class(parent: type, pol: Policy) -> type:
    key = (parent, pol.name)
    if key in _CLASSES:
        return _CLASSES[key]

    def forward(self, *args, **kwargs):
        own = functools.partial(parent.forward, self)
        if not torch.is_grad_enabled() or _has_cache(args, kwargs):
            return own(*args, **kwargs)

        def contexts():
            fwd, rec = pol.context_fn() if pol.context_fn else (contextlib.nullcontext(), contextlib.nullcontext())
            return fwd, _Recompute(rec, self)

        return checkpoint(own, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    cls = type(f"Recompute{parent.__name__}", (parent,), {"forward": forward, "recompute": pol.name,
                                                          "__module__": __name__})
    _CLASSES[key] = cls
    return cls


def apply_recompute(model: nn.Module, mode: str = DEFAULT) -> nn.Module:
    """Make every decoder layer (MTP's too) of ``model`` recompute in the backward per ``mode``.

    Call on the built model, before or after FSDP2 / expert parallelism; returns the model. A
    second call with another mode is refused (one policy per model).
    """
    pol = policy(mode)
    if not pol.active:
        return model
    require(model, "recompute", f"[train] recompute = {mode!r}")
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if not blocks:
        raise ConfigError(f"[train] recompute = {mode!r}: the model has no decoder layers to recompute")
    for block in blocks:
        done = getattr(type(block), "recompute", None)
        if done is not None:
            if done != pol.name:
                raise ConfigError(f"[train] recompute: the model already recomputes with {done!r}, not {mode!r}")
            continue
        block.__class__ = _recompute_class(type(block), pol)
        if pol.name == "selective":
            _mark_zones(block)
    return model


def recompute_mode(model: nn.Module) -> str:
    """The policy ``model``'s layers recompute with ("none" when not applied)."""
    for m in model.modules():
        if isinstance(m, DecoderLayer):
            return getattr(type(m), "recompute", DEFAULT)
    return DEFAULT


# ---------------------------------------------------------------------------- measuring it
class _Held(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every new storage an op creates (by the module running it) and whether it lives."""

    def __init__(self, known: set[int], tag: Callable[[], str]):
        super().__init__()
        self.known, self.tag = known, tag
        self.made: dict[int, tuple[Any, int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if st.nbytes() == 0 or ptr in inputs or ptr in self.known:
                continue
            old = self.made.get(ptr)
            if old is None or old[0].expired():
                name = func.overloadpacket.__name__
                self.made[ptr] = (StorageWeakRef(st), st.nbytes(), f"{self.tag()}:{name}")
        return out

    def alive(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ref, nbytes, tag in self.made.values():
            if not ref.expired():
                out[tag] = out.get(tag, 0) + nbytes
        return out


def held_activation_bytes(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    """Run ``fn()`` (a forward returning the loss) and measure what it leaves alive for the backward.

    Returns (fn's result, {"<module path>:<op>": bytes}): the storages created during ``fn`` that
    are still alive once it returned (held by autograd's saved tensors, by checkpoint regions'
    inputs and selective caches, or by the result), each under the module whose forward created
    it. Parameters and buffers are not counted. Keep the result alive while reading the figures;
    run the backward after.
    """
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    def enter(module, args):
        stack.append(names.get(module, type(module).__name__))

    def leave(module, args, output):
        stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    mode = _Held(known, lambda: stack[-1] if stack else "")
    try:
        with mode:
            result = fn()
    finally:
        pre.remove()
        post.remove()
    return result, mode.alive()


def saved_tensor_bytes(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and sum the distinct storages autograd packs for the backward (saved-tensor
    hooks). Inside a checkpointed region checkpoint's own hooks take over, so this sees only
    what is saved outside recomputed regions (all of it without recomputation). Parameters and
    buffers are not counted."""
    known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in known:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


__all__ = ["POLICIES", "DEFAULT", "Policy", "policy", "apply_recompute", "recompute_mode",
           "held_activation_bytes", "saved_tensor_bytes"]
