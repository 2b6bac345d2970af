"""Pre-training: next-token CE + lambda x MTP + the sequence-wise balance loss, on packed documents.

:class:`PretrainTask` is the task the shared :class:`~nanoseek.train.loop.Trainer` runs:

* ``batches()``: micro-batches ``LMBatch(input_ids [B,T], labels [B,T], doc_ids)`` from
  :class:`~nanoseek.data.loader.PackedLoader` (``[data] source = "packed"``) or the
  :class:`~nanoseek.train.synthetic.SyntheticLoader`; the loader's position is the state.
* ``loss``: ``CE + mtp_lambda * L_MTP + L_aux``, where L_MTP is the model's (1/D) sum_k CE_k and
  L_aux the MoE layers' sequence-wise balance loss (weight ``seq_aux_alpha``, set on the model).
  The MTP forward is skipped entirely when ``mtp_lambda`` is 0. A DeepSeek-V3.2 model's indexers
  learn from their own KL loss, which the trainer adds (``[train] dsa_warmup_steps``: the dense
  warm-up first; :mod:`nanoseek.train.dsa`).
* ``evaluate``: validation loss (main CE only, no MTP) over the first ``val_batches`` batches of
  the val split, always the same ones, and bits per byte ``val_bpb`` = nats / ln 2 / UTF-8 bytes
  of the target tokens that stand for text (:func:`nanoseek.train.bpb.bpb_sums`, the rule ``nanoseek
  eval --data`` uses). A token's byte count comes from the tokenizer's byte-level vocabulary (the
  length of its byte string; 0 for special tokens such as BOS, whose targets are left out of both
  sums), so bpb compares models with different tokenizers. Synthetic data has no tokenizer and no
  bytes: its runs report ``val_loss`` only.

:func:`pretrain` wires a :class:`~nanoseek.train.config.TrainConfig` into all of it: the model
(random init or ``[model] init_from``), the data (the model's vocab defaults to the tokenizer's
when the recipe does not set ``vocab_size``), the run folder (``config.toml``, metrics,
checkpoints, ``final/`` with the tokenizer files copied in), the expert-bias hook, and fit.
Under torchrun it joins the process group first and every rank reads its own rows of each global
batch (``micro_batch_size`` is per rank); ``[parallel]`` says how the model is split
(``distributed.py``); rank 0 writes the run folder, and holds its lock (:mod:`nanoseek.outdir`):
a folder that is not a pretrain run is refused, a second writer is refused while the run is
live, and a folder with checkpoints is only continued with ``resume``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import limits
from ..atomic import read_record, write_atomic
from .bpb import bpb_sums, token_byte_lengths
from ..errors import ConfigError, UserError
from .config import TrainConfig, config_to_toml
from .dsa import check_dsa_settings
from ..model.registry import family_of, has_indexers
from .loop import ExpertBalanceHook, FitResult, Trainer


@dataclass
class LMBatch:
    input_ids: torch.Tensor           # [B, T]
    labels: torch.Tensor              # [B, T] next tokens (-100: ignored)
    doc_ids: list                     # per row, the documents its tokens come from


class LMBatches:
    """Wraps a ``(input_ids, labels, doc_ids)`` loader; its state is the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self) -> "LMBatches":
        return self

    def __next__(self) -> LMBatch:
        x, y, ids = next(self.loader)
        return LMBatch(x, y, ids)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class PretrainTask:
    """Next-token prediction with MTP; see the module docstring."""

    rank_sharded = True       # the train loader reads this rank's rows of each global batch

    def __init__(self, train_loader, val_loader=None, mtp_lambda: float = 0.3, val_batches: int = 8,
                 token_bytes: torch.Tensor | None = None, origins=None):
        self.train_loader, self.val_loader = train_loader, val_loader
        self.mtp_lambda, self.val_batches = mtp_lambda, val_batches
        self.token_bytes = token_bytes        # [V] bytes per token; None: no bytes (synthetic), no val_bpb
        self.origins = origins                # doc id -> "file:line" (the spike log), optional
        self._val_start = val_loader.state_dict() if val_loader is not None else None

    def batches(self) -> LMBatches:
        return LMBatches(self.train_loader)

    def lm_batch(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of a micro-batch: what a pipeline-parallel step feeds its stages, which
        compute this task's objective themselves (``nanoseek/train/pipeline.py``)."""
        return batch.input_ids, batch.labels

    def loss(self, model, batch: LMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        device = next(model.parameters()).device
        x = batch.input_ids.to(device, non_blocking=True)
        y = batch.labels.to(device, non_blocking=True)
        out = model(x, labels=y)
        loss = out.loss
        metrics: dict[str, Any] = {"ce": out.loss.detach(), "tokens": int(batch.labels.numel())}
        if out.mtp_loss is not None and self.mtp_lambda > 0:
            loss = loss + self.mtp_lambda * out.mtp_loss
            metrics["mtp_loss"] = out.mtp_loss.detach()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            metrics["aux_loss"] = out.aux_loss.detach()
        return loss, metrics

    def doc_origins(self, doc_ids: list[int]) -> list[str]:
        return [self.origins(i) for i in doc_ids] if self.origins else []

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if self.val_loader is None or self.val_batches <= 0:
            return {}
        self.val_loader.load_state_dict(self._val_start)          # the same batches every time
        device = next(model.parameters()).device
        use_mtp = getattr(model, "use_mtp", False)
        model.use_mtp = False
        nats, n_tokens, text_nats, n_bytes = 0.0, 0, 0.0, 0
        try:
            for _ in range(self.val_batches):
                try:
                    x, y, _ = next(self.val_loader)
                except StopIteration:
                    break
                y = y.to(device)
                out = model(x.to(device), labels=y)
                n = int((y != -100).sum())
                nats += float(out.loss) * n
                n_tokens += n
                if self.token_bytes is not None:
                    dn, _, db = bpb_sums(out.logits, y, self.token_bytes)
                    text_nats, n_bytes = text_nats + dn, n_bytes + db
        finally:
            model.use_mtp = use_mtp
        if n_tokens == 0:
            return {}
        res = {"val_loss": nats / n_tokens, "val_tokens": float(n_tokens)}
        if n_bytes:
            res["val_bpb"] = text_nats / math.log(2) / n_bytes
        return res


# ---------------------------------------------------------------------------- wiring
def _packed_data(cfg: TrainConfig):
    """(train loader, val loader, tokenizer, tokenizer dir) of a prepared data directory."""
    from ..data.loader import PackedLoader
    from ..data.shards import ShardError, read_manifest
    from ..data.tokenizer import Tokenizer
    from .distributed import data_rank_world

    d, o, t = cfg.data, cfg.optim, cfg.train
    rank, world = data_rank_world(cfg.parallel)
    try:
        data_dir, manifest = read_manifest(d.dir)
        tok_dir = data_dir / manifest["tokenizer"].get("dir", "tokenizer")
        tokenizer = Tokenizer.load(tok_dir)
        train = PackedLoader(data_dir, d.train_split, o.micro_batch_size, o.seq_len, seed=t.seed, rank=rank,
                             world_size=world, tokenizer=tokenizer)
        val = None
        if d.val_batches > 0:
            val_tokens = int(manifest["splits"][d.val_split]["tokens"]) if d.val_split in manifest["splits"] else 0
            rows = min(o.micro_batch_size, (val_tokens - 1) // o.seq_len)
            if rows < 1:
                raise ConfigError(f"[data] val split '{d.val_split}' of {data_dir} has {val_tokens} tokens, fewer than "
                                  f"seq_len + 1 = {o.seq_len + 1}: prepare with a larger --val-fraction, or set "
                                  "[data] val_batches = 0")
            val = PackedLoader(data_dir, d.val_split, rows, o.seq_len, seed=t.seed, tokenizer=tokenizer,
                               shuffle=False, infinite=False)
    except ShardError as e:
        raise ConfigError(f"[data] dir = {d.dir!r}: {e}") from None
    return train, val, tokenizer, tok_dir


def build_pretraining(cfg: TrainConfig) -> tuple[torch.nn.Module, PretrainTask, dict[str, str]]:
    """(model, task, files for RUN/final) from a config; the model is on the CPU, seeded by train.seed."""
    from ..model.registry import build_model
    from .checkpoint import load_model_weights
    from .distributed import data_rank_world
    from .synthetic import SyntheticLoader

    d, o, t = cfg.data, cfg.optim, cfg.train
    final_files: dict[str, str] = {}
    token_bytes = origins = None
    if d.source == "packed":
        train, val, tokenizer, tok_dir = _packed_data(cfg)
        if "vocab_size" not in cfg.model.fields:
            cfg.model.fields["vocab_size"] = tokenizer.vocab_size       # recorded in RUN/config.toml
        token_bytes = token_byte_lengths(tokenizer)
        origins = train.shards.origin
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok_dir / name).is_file():
                final_files[name] = (tok_dir / name).read_text(encoding="utf-8")
    model_cfg = cfg.model.build_config()
    check_dsa_settings(t.dsa_warmup_steps, t.indexer_loss_weight,
                       has_indexers(model_cfg), f"{cfg.source}: ",
                       freeze=t.dsa_warmup_freeze, family=family_of(model_cfg))
    if d.source == "packed":
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"[model] vocab_size = {model_cfg.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} ({tok_dir}); remove vocab_size from [model] to use the tokenizer's")
    else:
        rank, world = data_rank_world(cfg.parallel)   # validation is the same on every rank; training is sliced
        train = SyntheticLoader(model_cfg.vocab_size, o.micro_batch_size, o.seq_len, seed=t.seed, split="train",
                                rank=rank, world_size=world)
        val = (SyntheticLoader(model_cfg.vocab_size, o.micro_batch_size, o.seq_len, seed=t.seed, split="val",
                               num_batches=d.val_batches) if d.val_batches > 0 else None)
    torch.manual_seed(t.seed)
    limits.check_model_fits(model_cfg, "[model]")   # before allocating the weights
    model = build_model(model_cfg)          # the preset's family (nanoseek.model.registry)
    if cfg.model.init_from:
        load_model_weights(model, cfg.model.init_from)
    model.set_seq_aux_alpha(t.seq_aux_alpha)
    model.use_mtp = model.use_mtp and t.mtp_lambda > 0
    task = PretrainTask(train, val, t.mtp_lambda, d.val_batches, token_bytes, origins)
    return model, task, final_files


# keys a run fills in and records when its config leaves them out: the same run again leaves them
# out too ([model] vocab_size: the packed data's tokenizer's, build_pretraining)
FILLED_IN = {("model", "vocab_size")}


def _changed_keys(old: dict, new: dict) -> list[str]:
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                and not ((section, k) in FILLED_IN and k not in b)]
    return out


def is_pretrain_run(path: Path) -> bool:
    """A run folder from before the ``.nanoseek.lock`` marker: ``checkpoints/step-*`` and a
    ``config.toml`` that loads as a nanoseek pre-training config (a file of that name is not enough)."""
    import tomllib

    from .config import config_from_dict

    ckpts = path / "checkpoints"
    if not ((path / "config.toml").is_file() and ckpts.is_dir() and any(ckpts.glob("step-*"))):
        return False
    if (path / "stage.json").exists():
        return False                          # a post-training stage's run: never pretrain's
    try:
        config_from_dict(tomllib.loads(read_record(path / "config.toml")), str(path / "config.toml"))
    except (ConfigError, ValueError, OSError, TypeError, KeyError):
        return False
    return True


def check_rerun(run_dir: Path, new: dict, resume: bool | str, flag: str, load_old=None,
                model_config=None) -> list[str]:
    """Refuse a fresh run into a folder that holds checkpoints; the keys a resume changes.

    A folder with checkpoints is only ever continued (``--resume``); the refusal names the
    settings that differ from the run's ``config.toml`` (read by ``load_old(path) -> dict``, by
    default as a pre-training config), so a re-run with other settings never silently replaces
    the finished one. With ``--resume`` the changed keys are returned (the caller says so and
    keeps the old config as ``config.previous.toml``). With ``model_config`` (the model the run
    would build), a resume whose checkpoint holds another model (a changed ``[model]`` field) is
    refused here, before anything in the folder is rewritten, naming the fields.
    """
    from .checkpoint import latest_checkpoint
    from .config import config_from_dict, read_toml

    config_path = run_dir / "config.toml"
    load_old = load_old or (lambda path: config_from_dict(read_toml(path), str(path)).to_dict())
    changed: list[str] = []
    if config_path.is_file():
        try:
            changed = _changed_keys(load_old(config_path), new)
        except (ConfigError, ValueError) as e:
            changed = [f"(its config.toml cannot be read: {e})"]
    ckpt = latest_checkpoint(run_dir)
    if not resume and ckpt is not None:
        differs = f"; it was made with other settings: {', '.join(changed)}" if changed else ""
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it from {ckpt.name}"
                          f"{' with these settings' if changed else ''}, or choose another {flag}{differs}")
    if resume is True and ckpt is None:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if resume and model_config is not None:
        check_resumed_model(run_dir, resume, model_config)
    return changed


def check_resumed_model(run_dir: Path, resume: bool | str, model_config) -> None:
    """Refuse (one ConfigError line naming the fields) a resume whose checkpoint's config.json
    describes another model than ``model_config``: a resume continues the same model. Both are
    compared as this version writes them (read, then written again), so a checkpoint an earlier
    version wrote differently for the same model (a dense model's first_k_dense_replace, V2 routing
    as deepseek_v3) still resumes. An unreadable checkpoint is left to the loader, whose error names
    the file."""
    from ..model.registry import config_from_dict, read_config_json
    from .checkpoint import resume_checkpoint

    try:
        ckpt = resume_checkpoint(run_dir) if resume is True else Path(resume)
        saved = config_from_dict(read_config_json(ckpt), str(Path(ckpt) / "config.json")).to_dict()
    except UserError:
        return
    now = model_config.to_dict()
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k in now)
    if differ:
        shown = ", ".join(f"{k} = {now.get(k)!r} (the checkpoint: {saved.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(f"--resume: {ckpt} holds another model: {shown}{more}; a resume continues the same "
                          f"model (drop the [model] change, or start a new run with [model] init_from = "
                          f"\"{ckpt}\")")


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool | None = None, quiet: bool = False,
             hooks: list | None = None) -> FitResult:
    """Run (or with ``resume`` continue) the pre-training described by ``cfg`` in ``cfg.train.out_dir``.

    The run folder is claimed and locked for the whole run (:mod:`nanoseek.outdir`): a non-empty
    folder that is not a pretrain run is refused, a second process gets "in use", and a folder
    with checkpoints is only continued with ``resume`` (the refusal names the settings that
    differ). ``final/`` is checked before training: a save there never deletes a user's file.
    """
    from ..model.checkpoint import CheckpointError, check_model_dir_writable
    from ..outdir import claim
    from .distributed import init_distributed, is_main

    init_distributed(cfg.parallel, cfg.train.device)     # under torchrun: join before the loaders slice the data
    run_dir = Path(cfg.train.out_dir)
    with claim(run_dir, "pretrain", flag="--out-dir", own=is_pretrain_run, lock=is_main()):
        changed = check_rerun(run_dir, cfg.to_dict(), resume, "--out-dir")
        try:
            check_model_dir_writable(run_dir / "final")
        except CheckpointError as e:
            raise ConfigError(f"{e} (the run writes its trained model there)") from None
        model, task, final_files = build_pretraining(cfg)
        if resume:                            # before the folder's config.toml is rewritten
            check_resumed_model(run_dir, resume, model.config)
        if not is_main():
            quiet = True                      # rank 0 prints and writes the run folder
        config_path = run_dir / "config.toml"
        if changed and resume and not quiet:
            print(f"resuming {run_dir} with changed settings: {', '.join(changed)}")
        if is_main() and (changed or not config_path.exists() or not resume):
            if changed and resume:
                write_atomic(run_dir / "config.previous.toml", read_record(config_path))
            write_atomic(config_path, config_to_toml(cfg))
        trainer = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, run_dir,
                          hooks=[ExpertBalanceHook(cfg.train.bias_update_gamma, load_every=cfg.train.expert_load_every), *(hooks or [])],
                          config=cfg.to_dict(), final_files=final_files, progress=progress, quiet=quiet,
                          parallel=cfg.parallel)
        return trainer.fit(resume=resume)


__all__ = ["PretrainTask", "LMBatch", "LMBatches", "build_pretraining", "pretrain",
           "check_rerun", "check_resumed_model", "is_pretrain_run"]
