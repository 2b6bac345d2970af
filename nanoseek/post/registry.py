"""The stage kinds of post-training, in one table: ``{kind: StageKind(section, train, ...)}``.

Every place that turns a kind name into code goes through :data:`STAGE_KINDS`: the command line
(:mod:`nanoseek.post.cli_common`), the multi-stage recipe (:mod:`nanoseek.post.recipe`), the
speedrun, and the config parser :func:`stage_config_from_dict`. Adding a kind is one entry here
(its section dataclass for the ``[kind]`` table, its ``train(cfg, *, resume, quiet, progress)``
function returning a :class:`~nanoseek.post.stage.StageResult`, and the trainer's defaults under
the kind: the one place a post-training learning rate, schedule or MTP weight is defaulted), plus its command module for
``nanoseek KIND``.

Layers: :mod:`~nanoseek.post.stage` (the foundation, which knows no algorithm) <- the algorithm
modules ``sft``, ``dpo``, ``grpo``, ``distill`` <- this registry <- the CLI, the recipe and the
speedrun. The algorithm modules are imported at the top: nothing imports the registry at start-up
(``nanoseek --help`` and the command modules import it inside their ``run``), so there is no start-up
time to save by importing them lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError
from nanoseek.train.config import (ModelSection, OptimSection, SpikeSection, TrainSection, apply_overrides,
                                   read_toml, resolve_config_path)

from .distill import DistillSection, run_distill
from .dpo import DPOSection, train_dpo
from .grpo import GRPOSection, train_grpo
from .sft import SFTSection, train_sft
from .stage import StageConfig, StageDefaults, StageResult, parse_stage_config, read_stage_json

# The trainer's tables under each kind (StageKind.defaults): small learning rates and no weight
# decay; no checkpoint or validation every N steps unless asked (save_every = eval_every = 0: at the end only). SFT and distillation keep the MTP
# module trained (mtp_lambda 0.1: speculative decoding after SFT); DPO and GRPO optimise their
# own objective only (no MTP, no sequence-wise balance loss: the aux-loss-free bias update keeps
# the experts balanced). GRPO holds its lr constant and turns the statistical spike tests off:
# a policy-gradient loss is not a curve that should go down.
_SFT_LIKE = StageDefaults(
    optim=OptimSection(lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0, schedule="cosine"),
    train=TrainSection(mtp_lambda=0.1, save_every=0, eval_every=0))
_DPO = StageDefaults(
    optim=OptimSection(lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0, schedule="cosine"),
    train=TrainSection(mtp_lambda=0.0, seq_aux_alpha=0.0, save_every=0, eval_every=0))
_GRPO = StageDefaults(
    optim=OptimSection(lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0, schedule="constant"),
    train=TrainSection(mtp_lambda=0.0, seq_aux_alpha=0.0, save_every=0, eval_every=0),
    spike=SpikeSection(enabled=False))


@dataclass(frozen=True)
class StageKind:
    """What a stage kind is made of."""

    section: type                            # the [kind] table's dataclass
    train: Callable[..., StageResult]        # train(cfg, *, resume, quiet, progress) -> StageResult
    defaults: StageDefaults                  # the trainer's [optim]/[train]/[spike] values under this kind
    init_required: bool = True               # [model] init_from must name a checkpoint (else a fresh model)
    teacher: bool = False                    # a recipe chains its [kind] teacher ("previous" | "base" | path)


# Order is the order of DeepSeek-R1's pipeline; error messages list the kinds in it.
STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(SFTSection, train_sft, _SFT_LIKE),
    "dpo": StageKind(DPOSection, train_dpo, _DPO),
    "grpo": StageKind(GRPOSection, train_grpo, _GRPO),
    "distill": StageKind(DistillSection, run_distill, _SFT_LIKE, init_required=False, teacher=True),
}


def stage_kind(kind: str, source: str = "<dict>") -> StageKind:
    """The registry entry of ``kind``; an unknown kind is one ConfigError line naming the kinds."""
    if kind not in STAGE_KINDS:
        raise ConfigError(f"{source}: unknown stage kind {kind!r}; expected one of {sorted(STAGE_KINDS)}")
    return STAGE_KINDS[kind]


def stage_config_from_dict(kind: str, raw: dict[str, Any], source: str = "<dict>", *,
                           init_pending: bool = False) -> StageConfig:
    """A raw TOML dict -> validated :class:`~nanoseek.post.stage.StageConfig` of ``kind``
    (``init_pending``: see :func:`~nanoseek.post.stage.parse_stage_config`)."""
    k = stage_kind(kind, source)
    return parse_stage_config(kind, k.section, raw, source, defaults=k.defaults, init_required=k.init_required,
                              init_pending=init_pending)


def load_stage_config(path: str | Path, kind: str, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """Read a stage TOML (a path or a shipped recipe name like ``sft``), apply ``--set``, validate."""
    path = resolve_config_path(path)
    raw = read_toml(path)
    if "stages" in raw:
        raise ConfigError(f"{path}: is a multi-stage recipe ([stages]); run it with `nanoseek grpo --config {path}`")
    section = STAGE_KINDS[kind].section if kind in STAGE_KINDS else object   # (an unknown kind: refused below)
    schema = {"model": ModelSection, kind: section, "optim": OptimSection, "train": TrainSection,
              "spike": SpikeSection}
    raw = apply_overrides(raw, list(overrides), schema)
    cfg = stage_config_from_dict(kind, raw, source=str(path))
    if not cfg.train.out_dir:
        cfg.train.out_dir = str(Path("runs") / path.stem)
    return cfg


def read_stage_record(path: Path) -> dict[str, Any] | None:
    """``path/stage.json`` of any registered kind, checked (see :func:`~nanoseek.post.stage.read_stage_json`)."""
    return read_stage_json(path, STAGE_KINDS)


def is_any_stage_run(path: Path) -> bool:
    """A stage folder of any registered kind from before the ``.nanoseek.lock`` marker (a valid
    ``stage.json``); a pre-training run is not one."""
    try:
        return read_stage_record(path) is not None
    except ConfigError:
        return False


__all__ = ["StageKind", "STAGE_KINDS", "stage_kind", "stage_config_from_dict", "load_stage_config",
           "read_stage_record", "is_any_stage_run"]
