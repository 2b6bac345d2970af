"""DeepSeek-V3.2's two-stage indexer training, as the one training loop runs it.

The model side (:mod:`nanoseek.model.dsa`, ``model.set_dsa_stage``) computes, while a stage is
set, each lightning indexer's KL divergence from its layer's attention distribution; this module
decides the stage of every optimizer step and what the step's objective is. The paper's two
stages of continued pre-training (DeepSeek-V3.2):

1. **Dense warm-up**, the first ``[train] dsa_warmup_steps`` optimizer steps: MLA attends to
   every visible key, the model is frozen and only the indexers train, to match the dense
   attention distribution (``dsa_warmup_freeze = false``: the model trains too, see below). The
   objective is ``indexer_loss_weight x KL`` alone. The task's own loss (cross-entropy, ...) is still computed, logged as ``loss`` and watched by the spike
   guard, but not backpropagated: every other parameter gets no gradient, so AdamW leaves it and
   its moments untouched (weight decay included), and the expert biases of the aux-loss-free
   balancing do not move either (:class:`~nanoseek.train.loop.ExpertBalanceHook`).
2. **Sparse training**, every later step: MLA attends to its indexer's top-k keys and the
   objective is ``task loss + indexer_loss_weight x KL`` over the selected keys. The indexer's
   input is detached and its selection carries no gradient, so the two terms reach disjoint
   parameters: the task's loss trains the model, the KL the indexers.

The paper warms up from a trained dense model (DeepSeek-V3.1): here ``[model] init_from`` a
DeepSeek-V3 run plus the ``index_*`` fields, whose indexers start fresh
(:func:`~nanoseek.train.checkpoint.load_model_weights`). Measured on the tiny model (the slow test
of ``tests/test_train_dsa.py``): the validation loss with sparse attention over fresh indexers'
choice is 0.050 nats above the dense model's, 0.004 after a 50-step warm-up, whose KL falls from
0.42 to 0.09. A run from scratch has nothing worth matching yet (a random model attends almost
uniformly, and so does a random indexer: their KL is ~1e-4), so ``[train] dsa_warmup_freeze =
false`` makes the warm-up dense pre-training of everything instead: objective ``task loss +
indexer_loss_weight x KL`` over every visible key, the indexers following the model's attention
as it forms, until sparse training begins (the ``v32-tiny`` recipe).

DeepSeek-V4's compressed-sparse-attention (CSA) layers train their lightning indexers the same
way, over the compressed entries instead of the keys (:mod:`nanoseek.model.v4.compressor`): the
dense stage attends to every visible compressed entry (the sliding window as always), the sparse
stage to the indexer's top-k, and the KL's target is the attention's distribution over those
entries alone. V4's heavily-compressed and sliding-window layers have no indexer. The same keys,
stages and refusals apply; the ``v4-tiny`` recipe, from scratch, warms up unfrozen as ``v32-tiny``
does (its toml has the measured choice).

The stage is a function of the step alone, so a run resumed on either side of the boundary
continues exactly. A model without indexers (DeepSeek-V3) has no stage and trains as before;
``indexer_loss_weight = 0`` freezes the indexers in sparse training (no KL is computed at all:
attention then runs without explicit probabilities). Outside a training step (validation, the
spike guard's reference batches, GRPO's and DPO's sampling and reference log-probs) the model has
no stage: sparse attention with no KL, the model as it is served. Post-training stages run the
same trainer, so SFT, DPO, GRPO and distillation of a V3.2 model train its indexers in the
sparse stage (their ``dsa_warmup_steps`` defaults to 0).

The KL of a micro-batch is collected from every forward the task runs with gradient (pre-training's
forward with labels, DPO's chosen-and-rejected forward, GRPO's policy forward without labels): a
forward hook on each indexed attention module takes the KL its forward computed, so no task
needs code for it; the micro-batch's KL is their mean (over layers, MTP's included when it ran,
and forwards). Its term is averaged over the step's micro-batches and ranks whatever the task's
``micro_batch_reduction``; ``indexer_loss`` in the step record is that mean.

Deliberately left out: the paper's separate learning rate for the warm-up (1e-3 there, against
7.3e-6 for sparse training): one run has one schedule, which counts the warm-up's steps. To
reproduce the paper, run the warm-up as its own run (``dsa_warmup_steps = max_steps`` at its own
lr) and continue from its ``final/`` with ``[model] init_from`` and ``dsa_warmup_steps = 0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .config import TrainSection

DENSE, SPARSE = "dense", "sparse"
DEFAULT_WEIGHT = TrainSection.indexer_loss_weight     # the paper has no weight: 1


def indexed_attention(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` whose lightning indexer trains in stages: DeepSeek-V3.2's
    MLA, DeepSeek-V4's compressed-sparse attention (its indexer over the compressed entries:
    ``nanoseek.model.v4.compressor``); none in a DeepSeek-V3 model."""
    return [m for m in model.modules() if getattr(m, "indexer", None) is not None and hasattr(m, "dsa_stage")]


def check_dsa_settings(warmup_steps: int, weight: float, has_indexer: bool, where: str = "",
                       freeze: bool = True, family=None) -> None:
    """The ``[train]`` DSA keys against the model: a setting with no effect is one ConfigError line
    (``family``: the model's :class:`nanoseek.model.registry.Family`, when it may not train indexers)."""
    if not has_indexer:
        written = ([f"dsa_warmup_steps = {warmup_steps}"] * bool(warmup_steps) + ["dsa_warmup_freeze = false"] * (not freeze)
                   + [f"indexer_loss_weight = {weight}"] * (weight != DEFAULT_WEIGHT))
        if written:
            drop = " ".join(f"--set train.{w.split(' =')[0]}=null" for w in written)
            why = family.unsupported.get("indexer_training") if family is not None else None
            if why:
                raise ConfigError(f"{where}[train] {', '.join(written)}: not supported for model_type "
                                  f"'{family.model_types[0]}' ({family.name}): {why}; drop the "
                                  f"key{'s' * (len(written) > 1)} ({drop})")
            raise ConfigError(f"{where}[train] {', '.join(written)} would have no effect: the model has no lightning "
                              "indexer (DeepSeek-V3.2's sparse attention needs index_n_heads > 0, DeepSeek-V4's "
                              "compressed_sparse_attention layers); drop the "
                              f"key{'s' * (len(written) > 1)} ({drop}) or train a V3.2 or V4 model (e.g. [model] "
                              "preset = \"v32-tiny\" or \"v4-tiny\")")
        return
    if not freeze and not warmup_steps:
        raise ConfigError(f"{where}[train] dsa_warmup_freeze = false would have no effect with dsa_warmup_steps = 0 "
                          "(there is no warm-up); set dsa_warmup_steps > 0 or drop the key")
    if warmup_steps and weight == 0:
        raise ConfigError(f"{where}[train] dsa_warmup_steps = {warmup_steps} trains the indexers, which "
                          "indexer_loss_weight = 0 freezes: set indexer_loss_weight > 0 or dsa_warmup_steps = 0")


class IndexerTraining:
    """The DSA side of the trainer: the stage of each step, the KL of its forwards, its objective."""

    def __init__(self, model: nn.Module, warmup_steps: int = 0, weight: float = DEFAULT_WEIGHT, freeze: bool = True):
        self.modules = indexed_attention(model)
        check_dsa_settings(warmup_steps, weight, bool(self.modules), freeze=freeze)
        self.warmup_steps, self.weight, self.freeze = warmup_steps, weight, freeze
        self._found: list[torch.Tensor] = []

    def frozen(self, stage: str | None) -> bool:
        """Whether a step of ``stage`` trains only the indexers (the paper's dense warm-up)."""
        return stage == DENSE and self.freeze

    def stage(self, step: int) -> str | None:
        """The stage of the optimizer step with 0-based index ``step`` (None: no indexer training)."""
        if not self.modules or self.weight == 0:
            return None
        return DENSE if step < self.warmup_steps else SPARSE

    @contextlib.contextmanager
    def step(self, model: nn.Module, stage: str | None) -> Iterator[None]:
        """Inside, the model trains in ``stage`` and :meth:`take` returns the KL of its forwards;
        on exit the model has no stage again (however the step ended)."""
        if stage is None:
            yield
            return
        model.set_dsa_stage(stage)
        handles = [m.register_forward_hook(self._collect) for m in self.modules]
        self._found = []
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            model.set_dsa_stage(None)
            self._found = []

    def _collect(self, module: nn.Module, args, output) -> None:
        kl = module.indexer_loss
        if kl is not None and kl.requires_grad:     # a forward under no_grad trains nothing
            self._found.append(kl)

    def take(self) -> torch.Tensor | None:
        """The mean KL of the forwards since the last call (None: no forward computed one)."""
        found, self._found = self._found, []
        return torch.stack(found).mean() if found else None

    def objective(self, loss: torch.Tensor, kl: torch.Tensor | None, stage: str | None,
                  kl_scale: float) -> torch.Tensor:
        """What one micro-batch backpropagates: ``loss`` (already scaled for the step) and
        ``weight x kl_scale x kl``; the KL term alone in the paper's dense warm-up (``freeze``)."""
        if stage is None:
            return loss
        if kl is None:
            if stage == DENSE:
                raise RuntimeError("DSA dense warm-up: the task's forward computed no indexer loss (did the model "
                                   "run without gradient, or on the absorbed MLA path?)")
            return loss
        term = kl * (self.weight * kl_scale)
        return term if self.frozen(stage) else loss + term


__all__ = ["DENSE", "SPARSE", "IndexerTraining", "check_dsa_settings", "indexed_attention"]
