"""The foundation of post-training: one stage as a config, its model and tokenizer, the trainer hook-up.

Every post-training stage (``sft``, ``dpo``, ``grpo``, ``distill``) is one TOML file with the
tables of the shared trainer plus one table named after the stage::

    [model]   init_from = "runs/pretrain/final"   # the checkpoint to start from (a run folder works)
              # or, for a student trained from scratch (distill): preset = "tiny" + HF config fields
    [sft]     the stage's own knobs (SFTSection, DPOSection, GRPOSection or DistillSection)
    [optim]   lr, schedule, micro_batch_size, grad_accum, seq_len (the max tokens per row) ...
    [train]   max_steps, out_dir, save_every, mtp_lambda, bias_update_gamma ...
    [spike]   the loss-spike guard

This module knows no algorithm: :func:`parse_stage_config` is given the ``[kind]`` section class,
and the algorithm modules (``sft``, ``dpo``, ``grpo``, ``distill``) import it, never the other way
round. Which kind has which section and train function is the registry's
(:mod:`nanoseek.post.registry`, with ``stage_config_from_dict`` and ``load_stage_config`` by kind).

Parsing and ``--set table.key=value`` overrides are the trainer's (``nanoseek.train.config``):
every key is checked and errors name the file, table and key. Each kind has defaults suited to
post-training, set in one typed place (a :class:`StageDefaults` per kind, in the registry:
small learning rates, no weight decay, and for GRPO the statistical spike tests off, since a
policy-gradient loss is not a curve that should go down; DPO and GRPO optimise their own objective
only: no MTP loss and no sequence-wise balance loss, the experts staying balanced by the
aux-loss-free bias update after every step). A key the stage's TOML does not write takes the
kind's value, else the trainer's; shipped TOMLs write only what they choose differently.

:func:`run_trainer` wires a task into :class:`nanoseek.train.loop.Trainer` with the expert-bias
hook, saves the tokenizer into the run folder (so every checkpoint finds it) and into ``final/``,
and returns a :class:`StageResult` with the final checkpoint and the logged step records. The run
folder is claimed and locked first (:mod:`nanoseek.outdir`): another command's folder, a second
writer, and a fresh run over existing checkpoints are refused with one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Collection
from pathlib import Path
from typing import Any

from nanoseek import limits
from nanoseek.errors import UserError
from nanoseek.errors import ConfigError
from nanoseek.train.config import (ModelSection, OptimSection, SpikeSection, TrainConfig, TrainSection,
                                   dumps_toml, no_effect_keys, parse_sections, read_toml)

CHAIN_REFS = ("previous", "base")   # a recipe's checkpoint placeholders (the stage before, the recipe's base)


@dataclass(frozen=True)
class StageDefaults:
    """A post-training kind's defaults for the trainer's tables: the one place they are set.

    Every key a stage's TOML (or ``--set``) does not write takes its value from here; a key not
    named in these instances keeps the trainer's own default (:mod:`nanoseek.train.config`, the
    pre-training values). Shipped stage TOMLs write only what they choose differently."""
    optim: OptimSection
    train: TrainSection
    spike: SpikeSection = field(default_factory=SpikeSection)

    def tables(self) -> dict[str, Any]:
        return {"optim": self.optim, "train": self.train, "spike": self.spike}


@dataclass
class StageConfig:
    kind: str                                   # sft | dpo | grpo | distill
    model: ModelSection
    algo: Any                                   # the [kind] table's dataclass
    optim: OptimSection
    train: TrainSection
    spike: SpikeSection
    source: str = "<defaults>"
    defaults: StageDefaults | None = field(default=None, repr=False, compare=False)  # the kind's, for re-reading

    def to_dict(self) -> dict[str, dict[str, Any]]:
        model = dataclasses.asdict(self.model)
        model.update(model.pop("fields"))
        return {"model": model, self.kind: dataclasses.asdict(self.algo), "optim": dataclasses.asdict(self.optim),
                "train": dataclasses.asdict(self.train), "spike": dataclasses.asdict(self.spike)}

    def to_toml(self) -> str:
        """The resolved config as TOML; keys that have no effect are left out, as in
        :func:`~nanoseek.train.config.config_to_toml`, or reading it back would refuse them."""
        doc = self.to_dict()
        for k in no_effect_keys(TrainConfig(optim=self.optim))["optim"]:
            doc["optim"].pop(k, None)
        return dumps_toml(doc, header=f"Resolved nanoseek {self.kind} config (from {self.source})")


@dataclass
class StageResult:
    kind: str
    run_dir: Path
    final_dir: Path | None                      # RUN/final: the HF checkpoint the next stage starts from
    status: str
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)   # logged step records
    extra: dict[str, Any] = field(default_factory=dict)           # stage-specific results

    def last(self, key: str, default: Any = None) -> Any:
        """The last logged value of a metric."""
        for rec in reversed(self.history):
            if key in rec:
                return rec[key]
        return default


def parse_stage_config(kind: str, section: type, raw: dict[str, Any], source: str = "<dict>", *,
                       defaults: StageDefaults, init_required: bool = True,
                       init_pending: bool = False, check_sources: bool = True) -> StageConfig:
    """A raw TOML dict -> validated :class:`StageConfig` whose ``[kind]`` table is a ``section``.

    The registry (:func:`nanoseek.post.registry.stage_config_from_dict`) looks ``section`` and
    ``defaults`` and ``init_required`` up by kind; this module knows no algorithm. ``init_pending``: the checkpoint
    is written by an earlier stage that has not run yet, so ``[model]`` may lack ``init_from`` (a
    recipe or the speedrun checked before it trains). ``check_sources``: the section's
    ``check_sources()`` (its data files, task specs, teacher: checked without a model, so a missing
    file fails before anything loads or trains) runs too; an error names ``source``, the table and
    the key.
    """
    from nanoseek.model.registry import all_field_names
    from nanoseek.train.config import check_optim_keys, check_train_config

    schema = {"model": ModelSection, kind: section, "optim": OptimSection, "train": TrainSection,
              "spike": SpikeSection}
    given_optim = raw.get("optim") if isinstance(raw.get("optim"), dict) else {}
    parts = parse_sections(raw, schema, source, extra_keys={"model": set(all_field_names())},
                           defaults=defaults.tables())
    check_optim_keys(parts["optim"], given_optim, source)
    cfg = StageConfig(kind=kind, model=parts["model"], algo=parts[kind], optim=parts["optim"], train=parts["train"],
                      spike=parts["spike"], source=source, defaults=defaults)
    if cfg.model.init_from:
        from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

        try:  # a run folder means its final (or latest) checkpoint
            cfg.model.init_from = str(resolve_checkpoint(cfg.model.init_from))
        except LoadError as e:
            raise ConfigError(f"{source}: [model] init_from: {e}") from None
    if cfg.model.init_from and cfg.model.fields:
        raise ConfigError(f"{source}: [model] sets both init_from and config fields {sorted(cfg.model.fields)}; a "
                          "trained checkpoint's architecture cannot change (drop the fields)")
    if init_required and not cfg.model.init_from and not init_pending:
        raise ConfigError(f"{source}: [model] init_from is required: the checkpoint {kind} starts from")
    # optim/train/spike checks are the trainer's own (the [data] table is not used here)
    check_train_config(TrainConfig(model=cfg.model, optim=cfg.optim, train=cfg.train, spike=cfg.spike,
                                   source=source), source)
    validate = getattr(cfg.algo, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{source}: [{kind}] {e}") from None
    check = getattr(cfg.algo, "check_sources", None)
    if check_sources and check is not None:
        try:
            check()
        except ValueError as e:                 # a DataError "key: why"
            raise ConfigError(f"{source}: [{kind}] {e}") from None
    return cfg


# ----------------------------------------------------------------------------- model and tokenizer


def load_model(model_section: ModelSection, device: str = "cpu"):
    """(model, checkpoint dir or None): the ``init_from`` checkpoint (a run folder or HF directory),
    or a fresh random init of ``preset`` + fields (a distillation student from scratch); fp32, in
    train mode, on ``device`` ("auto": cuda when available)."""
    from nanoseek.train.loop import resolve_device

    device = resolve_device(device)
    import torch

    from nanoseek.train.checkpoint import LoadError, resolve_checkpoint
    from nanoseek.model.registry import build_model, from_pretrained

    if model_section.init_from:
        try:
            ckpt = resolve_checkpoint(model_section.init_from)
        except LoadError as e:
            raise UserError(f"[model] init_from: {e}") from None
        limits.check_checkpoint_fits(ckpt)
        return from_pretrained(ckpt, dtype=torch.float32, device=device).train(), ckpt
    config = model_section.build_config()
    limits.check_model_fits(config, "[model]")
    return build_model(config).to(device).train(), None


def load_tokenizer_for(checkpoint: Path | None, explicit: str = ""):
    """The tokenizer at ``explicit``, else the one found next to ``checkpoint``."""
    from nanoseek.infer.loading import find_tokenizer, load_tokenizer, no_tokenizer_hint

    if explicit:
        return load_tokenizer(explicit)
    found = find_tokenizer(checkpoint) if checkpoint is not None else None
    if found is None:
        raise UserError(f"no tokenizer.json found for {checkpoint} (nor in its parent folders); set the stage's "
                        "'tokenizer' key to a tokenizer directory" + (no_tokenizer_hint(checkpoint) if checkpoint else ""))
    return load_tokenizer(found)


def check_vocab(model, tokenizer, what: str = "model") -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the {what} only "
                        f"{model.config.vocab_size}: they do not belong together")


# ----------------------------------------------------------------------------- running


def run_trainer(model, task, cfg: StageConfig, tokenizer, *, resume: bool | str = False, quiet: bool = False,
                progress: bool | None = None, extra_hooks=(), extra: dict[str, Any] | None = None) -> StageResult:
    """Train ``task`` with the shared trainer under ``cfg``; returns the stage's result.

    The run folder is claimed and locked like every output folder (:mod:`nanoseek.outdir`): a
    non-empty folder that is not this stage's run is refused, so is a second writer, and a
    folder with checkpoints is only continued with ``resume`` (the refusal names the settings
    that differ from its config.toml).
    """

    from nanoseek.model.checkpoint import CheckpointError, check_model_dir_writable
    from nanoseek.outdir import claim
    from nanoseek.train.pretrain import check_rerun

    run_dir = Path(cfg.train.out_dir or f"runs/{cfg.kind}")
    with claim(run_dir, cfg.kind, flag="--out", own=lambda p: is_stage_run(p, cfg.kind)):
        changed = check_rerun(run_dir, cfg.to_dict(), resume, "--out",
                              load_old=lambda p: _reparse(cfg, p), model_config=getattr(model, "config", None))
        try:
            check_model_dir_writable(run_dir / "final")
        except CheckpointError as e:
            raise ConfigError(f"{e} (the stage writes its trained model there)") from None
        if changed and not quiet:
            print(f"resuming {run_dir} with changed settings: {', '.join(changed)}")
        return _run_trainer(model, task, cfg, tokenizer, run_dir, resume=resume, quiet=quiet, progress=progress,
                            extra_hooks=extra_hooks, extra=extra, changed=changed)


def _reparse(cfg: StageConfig, path: Path) -> dict[str, Any]:
    """The run folder's own config.toml as a dict comparable to ``cfg.to_dict()``: parsed with the
    same ``[kind]`` section class (it was validated when the run wrote it, so the init_from
    requirement is not asked again, nor are its data sources: the new config's are the ones used)."""
    return parse_stage_config(cfg.kind, type(cfg.algo), read_toml(path), str(path), defaults=cfg.defaults,
                              init_required=False, check_sources=False).to_dict()


def read_stage_json(path: Path, kinds: Collection[str]) -> dict[str, Any] | None:
    """``path/stage.json`` (a stage folder's record) of one of ``kinds``, checked; None where there is none.

    A file of that name that is not such a record (not JSON, or without ``kind``, ``status``,
    ``steps``) raises one ConfigError line naming it. Every registered kind:
    :func:`nanoseek.post.registry.read_stage_record`.
    """
    import json

    from nanoseek.atomic import read_record

    f = Path(path) / "stage.json"
    if not f.exists() and not f.is_symlink():
        return None
    try:
        data = json.loads(read_record(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f}: not a readable stage record ({e}); move it away or choose another --out") from None
    if not (isinstance(data, dict) and data.get("kind") in kinds and isinstance(data.get("status"), str)
            and isinstance(data.get("steps"), int) and not isinstance(data.get("steps"), bool)):
        raise ConfigError(f"{f}: not a nanoseek stage record (needs kind one of {sorted(kinds)}, status, "
                          "steps); move it away or choose another --out")
    return data


def is_stage_run(path: Path, kind: str) -> bool:
    """A stage folder of ``kind`` from before the ``.nanoseek.lock`` marker: a valid ``stage.json``
    of that kind (of any registered kind: :func:`nanoseek.post.registry.is_any_stage_run`).

    A pre-training run (``config.toml`` + checkpoints) is not a stage's: a stage never takes it.
    """
    try:
        return read_stage_json(path, (kind,)) is not None
    except ConfigError:
        return False


def _run_trainer(model, task, cfg: StageConfig, tokenizer, run_dir: Path, *, resume, quiet, progress, extra_hooks,
                 extra, changed) -> StageResult:
    import json
    import tempfile

    from nanoseek.atomic import read_record, write_atomic
    from nanoseek.train.loop import ExpertBalanceHook, Trainer
    from nanoseek.train.metrics import read_metrics

    tokenizer.save(run_dir)                     # checkpoints under RUN/checkpoints find it here
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        final_files = {name: (Path(tmp) / name).read_text(encoding="utf-8")
                       for name in ("tokenizer.json", "tokenizer_config.json")}
    if hasattr(model, "set_seq_aux_alpha"):
        model.set_seq_aux_alpha(cfg.train.seq_aux_alpha)
    hooks = [ExpertBalanceHook(cfg.train.bias_update_gamma, load_every=cfg.train.expert_load_every), *extra_hooks]
    trainer = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, run_dir=run_dir, hooks=hooks,
                      config={"kind": cfg.kind, **cfg.to_dict()}, final_files=final_files, progress=progress,
                      quiet=quiet)
    if changed and resume:
        write_atomic(run_dir / "config.previous.toml", read_record(run_dir / "config.toml"))
    write_atomic(run_dir / "config.toml", cfg.to_toml())
    result = trainer.fit(resume=resume)
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    history = [r for r in records if "step" in r and "event" not in r]
    out = StageResult(kind=cfg.kind, run_dir=run_dir, final_dir=result.final_dir, status=result.status,
                      steps=result.step, history=history, extra=dict(extra or {}))
    write_atomic(run_dir / "stage.json", json.dumps({"kind": out.kind, "status": out.status, "steps": out.steps,
                                                    "final_dir": str(out.final_dir) if out.final_dir else None,
                                                    "eval_mode": cfg.algo.eval_mode, **_tool_record(cfg.algo),
                                                    **{k: v for k, v in out.extra.items()
                                                       if isinstance(v, (int, float, str, bool))}}, indent=1))
    return out


def _tool_record(algo: Any) -> dict[str, str]:
    """stage.json's record of the stage's tools, so commands serve the model as it was trained
    (:func:`nanoseek.tasks.tool_use.describe_for`): the built-ins and what the prompts said of them."""
    use = getattr(algo, "tool_use", None)
    if use is None or not use.enabled:
        return {}
    return {"tools": use.tools, "describe_tools": use.describe}


__all__ = ["CHAIN_REFS", "StageDefaults", "StageConfig", "StageResult", "parse_stage_config", "is_stage_run",
           "read_stage_json",
           "load_model", "load_tokenizer_for", "check_vocab", "run_trainer"]
