"""K-major weight copies for the compiled decode step on a CPU: the same products, faster kernels.

A linear layer computes ``x W^T`` with ``W`` stored ``[out, in]``. For the few rows of a decode
step (one per sequence) a CPU BLAS runs that transposed product well below the speed it reaches
on the same product with the weight stored ``[in, out]`` ("k-major"): ``[16, 256] x [256, 4,096]``
measured 460 against 352 us on an Intel CPU with AMX (one thread), 563 against 528 us on an AMD
EPYC. The engine's compiled decode step of bench-moe ran 1.16-1.26x faster at batch 4-64 with every
linear layer and the then-dense experts reading k-major copies (Intel), and 1.02-1.05x with the
linear layers alone once the experts gathered their matrices instead (AMD); at batch 1, where one
row's product is a matrix-vector product, 0.97x on the Intel CPU and 1.08-1.28x on the AMD one
(README, Performance). Training keeps the model's own layout (the copies carry no gradient) and a
GPU's BLAS has no such gap, so only the engine's compiled CPU decode uses them, at every batch size.

:class:`Linear` is ``nn.Linear`` that multiplies by ``weight_t`` (``[in, out]``, contiguous) instead
of its weight where the module has one. :class:`KMajorWeights` holds the copies for a model's
:class:`Linear` layers, and :meth:`KMajorWeights.installed` puts them on the modules for one call
only, after copying again any weight that changed since the last call (an optimizer step or
``load_state_dict`` writes in place and moves the weight's version counter; ``.data = ...`` or
``.to()`` moves its storage, though the allocator may hand back the same address).
Outside that call no module has a copy, so an eager or training forward, a ``state_dict``, a
``deepcopy`` or a pickle of the model never sees one; inside it a forward with autograd on (a
training step in another thread: grad mode is per thread) still multiplies by the weights. Some
writes leave no trace a refresh can see (fused optimizer steps do not move the version counter;
writes through ``.data`` or numpy), so the engine copies every weight again whenever a decode run
starts (the engine idle before the step: each ``generate`` call, each GRPO rollout); weights
changed while the engine is mid-run, other than by tracked in-place writes, are not followed.
The copies cost memory: one more copy of the matrices they mirror (``KMajorWeights.nbytes``);
where that would take more than half of the memory the system has available when they are made
(the first compiled step), the engine makes none and decodes with the model's layout.

Modules whose forward was replaced (simulated FP8 rebinds ``forward`` on its linear layers;
subclasses with a forward of their own, such as V4's grouped ``o_a_proj``) and the MTP block (run
only by the eager speculative step) are left alone; the routed experts gather the chosen experts'
matrices in the compiled decode (``moe.py``) and have no copies.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies by a k-major copy of its weight while one is installed."""

    weight_t: torch.Tensor | None = None     # [in, out]; set on the instance by KMajorWeights.installed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None or torch.is_grad_enabled():    # (grad mode is per thread: see the docstring)
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def reads_kmajor(self) -> bool:
        """Whether this module's forward is the one above, which reads a copy: not where a subclass
        has its own or one was rebound on the instance (as simulated FP8 does)."""
        return type(self).forward is Linear.forward and "forward" not in self.__dict__


class KMajorWeights:
    """The k-major copies of a model's plain linear layers (module docstring)."""

    def __init__(self, model: nn.Module):
        mtp = {id(x) for block in getattr(getattr(model, "model", None), "mtp", ()) for x in block.modules()}
        self.layers: list[Linear] = [m for m in model.modules()
                                     if isinstance(m, Linear) and id(m) not in mtp and m.reads_kmajor()]
        self.copies: list[torch.Tensor | None] = [None] * len(self.layers)
        self._keys: list[tuple | None] = [None] * len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes the copies take (once made): the matrices they mirror."""
        return sum(w.numel() * w.element_size() for w in self.weights() if w is not None)

    def weights(self) -> list[torch.Tensor | None]:
        """The parameters mirrored, as the modules hold them now (one may have been replaced; None
        where the module no longer has it as a parameter: pruned, parametrized)."""
        return [m._parameters.get("weight") for m in self.layers]

    def forget(self) -> None:
        """Copy every weight again at the next :meth:`refresh`: what it cannot see may have changed."""
        self._keys = [None] * len(self.layers)

    def refresh(self) -> int:
        """Copy again the weights that may have changed since the last call (all after :meth:`forget`);
        returns how many. What it sees: a weight's version counter (in-place writes by autograd-
        tracked ops: a foreach or for-loop optimizer step, ``load_state_dict``) and its storage
        (``.data`` replaced, ``.to()``, a new parameter set on the module). What it cannot see:
        fused optimizer steps (they leave the version counter alone), writes through ``.data`` or
        numpy, inference tensors (no version counter), so the engine calls :meth:`forget` whenever
        a decode run starts."""
        weights = self.weights()
        keys = [None if w is None else (w.data_ptr(), None if w.is_inference() else w._version) for w in weights]
        if keys == self._keys:                      # a decode step's case: ~10-20 us for 50 weights
            return 0
        n = 0
        with torch.no_grad():
            for i in range(len(self.layers)):
                if keys[i] is not None and keys[i] == self._keys[i]:
                    continue
                self._keys[i] = keys[i]
                if weights[i] is None:              # no parameter to mirror: the module's own forward
                    self.copies[i] = None
                    continue
                src, copy = weights[i].detach().t(), self.copies[i]
                if (copy is not None and copy.shape == src.shape and copy.dtype == src.dtype
                        and copy.device == src.device and (torch.is_inference_mode_enabled() or not copy.is_inference())):
                    copy.copy_(src)                 # the same tensor: a compiled graph that reads it stays valid
                else:
                    self.copies[i] = src.contiguous()
                n += 1
        return n

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The copies, refreshed, on their modules for the calls inside; gone again after."""
        self.refresh()
        for m, copy in zip(self.layers, self.copies):
            if copy is not None:
                object.__setattr__(m, "weight_t", copy)   # a plain attribute (not a buffer): ~0.1 us
        try:
            yield
        finally:
            for m in self.layers:
                m.__dict__.pop("weight_t", None)

