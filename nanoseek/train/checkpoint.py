"""Training checkpoints: atomic, keep-last-K, and free of pickle.

Layout of one checkpoint (``RUN/checkpoints/step-000100/``)::

    config.json, model.safetensors    the model, HF format (``save_pretrained``): loads in
                                      ``from_pretrained`` and in transformers as it is
    tokenizer.json, tokenizer_config.json   the run's tokenizer (when it has one), so every
                                      checkpoint serves, chats and fine-tunes on its own
    trainer_state.json                step, tokens, elapsed time, RNG states, data-loader state,
                                      spike-guard state, hook state, optimizer hyper-parameters
    trainer_state.safetensors         every tensor of that state (AdamW moments, torch RNG states)

``RUN/latest`` holds the relative path of the newest good checkpoint and is replaced atomically.
Pruning keeps the newest ``keep_last`` checkpoints plus the one ``latest`` names and any the
trainer protects (its last known-good one); a rollback (:func:`discard_after`) deletes only the
abandoned checkpoints its caller wrote itself (see ``spike.py`` for the whole policy).

The trainer's state is an arbitrary nest of dicts, lists, tuples, scalars, strings, tensors and
numpy arrays. :func:`flatten_state` splits it into JSON (tensors replaced by ``{"__tensor__":
key}``; tuples and dicts with non-string keys tagged so they round-trip exactly) and a flat dict of
tensors for safetensors; nothing is ever unpickled, so loading a checkpoint from someone else
cannot run code.

Atomicity: everything is written into ``checkpoints/.step-000100.partial-PID``, fsynced, then
renamed to ``step-000100`` in one ``os.replace``; only then does ``latest`` move. A crash at any
point leaves either the previous checkpoint or the new one complete, never a half-written one
that loads: partial directories are ignored by :func:`list_checkpoints` and removed by
:func:`remove_partials` at the next start.

Loading refuses anything damaged afterwards (a deleted, empty or truncated file, JSON that
names tensors the safetensors file lacks) with one :class:`CheckpointError` line naming the
file; :func:`recovery_hint` adds which older checkpoint of the run is intact (all four files
verified) and the flag that resumes from it (``--resume-from RUN/checkpoints/step-N``).

:func:`resolve_checkpoint` turns a path a user gives (``--model``, ``init_from``) into the HF
checkpoint directory it names: itself, the run's ``final/``, the checkpoint ``latest`` points to,
or ``model/`` / ``hf/``; every command and stage calls it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import RecordError, read_record, write_atomic
from ..errors import UserError
from ..model.checkpoint import CheckpointError, read_safetensors
from ..model.registry import load_weights, save_pretrained
from ..model.checkpoint import recovery_hint as _model_recovery_hint

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


TRAINING_FILES = (STATE_JSON, STATE_TENSORS)    # what a training checkpoint holds besides the model


def recovery_hint(ckpt: str | Path) -> str:
    """``; the older checkpoint X is intact: resume from it with --resume-from X`` (or that none is)."""
    return _model_recovery_hint(ckpt, TRAINING_FILES, how="resume from it with --resume-from {path}")


# ---------------------------------------------------------------------------- state <-> JSON + tensors
def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Nested state -> (JSON-able object, {key: tensor}); see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            return {"__dict__": [[walk(k, path), walk(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint {path}: {type(x).__name__} is not a tensor, array, scalar, "
                        "string, list, tuple or dict")

    return walk(obj, "state"), tensors


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected step-NNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / STATE_JSON).exists()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN/latest`` points to (else the newest complete one), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.exists() or pointer.is_symlink():
        try:                 # never follows a link or blocks on a FIFO; an unreadable pointer names nothing
            target = run_dir / read_record(pointer).strip()
        except (OSError, RecordError, UnicodeDecodeError):
            target = None
        if target is not None and (target / STATE_JSON).exists():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint a ``--resume`` continues from: the one ``RUN/latest`` names.

    Unlike :func:`latest_checkpoint` this never falls back silently: when ``latest`` names a
    checkpoint that was deleted or damaged afterwards, the error says so and names the older
    intact checkpoint to resume from instead (``--resume-from``)."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.exists() or pointer.is_symlink():
        try:
            target = run_dir / read_record(pointer).strip()
        except (OSError, RecordError, UnicodeDecodeError) as e:
            hint = recovery_hint_for_run(run_dir)
            why = str(e).removeprefix(f"{pointer}: ") if isinstance(e, RecordError) else type(e).__name__
            raise CheckpointError(f"{pointer}: unreadable ({why}){hint}") from None
        if not (target / STATE_JSON).exists():
            what = "which was deleted" if not target.exists() else f"which has no {STATE_JSON} (deleted or damaged)"
            raise CheckpointError(f"{pointer} names {target}, {what}{recovery_hint_for_run(run_dir, target)}")
        return target
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from")
    return found[-1]


def recovery_hint_for_run(run_dir: str | Path, bad: Path | None = None) -> str:
    """:func:`recovery_hint` for a run whose ``latest`` is unusable: the newest intact checkpoint
    older than ``bad`` (any, when ``bad`` is not one of the run's step folders)."""
    d = checkpoints_dir(run_dir)
    ok = bad is not None and _STEP_RE.match(Path(bad).name) and Path(bad).parent.resolve() == d.resolve()
    return recovery_hint(bad if ok else d / f"step-{10**9:06d}")


def set_latest(run_dir: str | Path, ckpt: Path) -> None:
    run_dir = Path(run_dir)
    write_atomic(run_dir / LATEST, str(Path(ckpt).resolve().relative_to(run_dir.resolve())) + "\n")


def remove_partials(run_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``.step-*.partial-*``); returns what was removed."""
    d = checkpoints_dir(run_dir)
    gone = [p for p in d.glob(".step-*") if p.is_dir()] if d.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep_last: int, extra_files: dict[str, str] | None = None,
                    protect: Iterable[Path | None] = ()) -> Path:
    """Write ``checkpoints/step-{step:06d}`` atomically, point ``latest`` at it, keep the last K
    (and every checkpoint in ``protect``: the trainer's last known-good one). ``extra_files``
    ({name: text}, the run's tokenizer files) are written into the checkpoint too."""
    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:06d}"
    tmp = d / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, extra_files=extra_files)
        meta, tensors = flatten_state(state)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        if final.exists():      # re-saving a step (after a rollback): move the old one aside first
            old = d / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_latest(run_dir, final)
    prune_checkpoints(run_dir, keep_last, protect)
    return final


def _names(paths: Iterable[Path | None]) -> set[str]:
    return {Path(p).name for p in paths if p is not None}


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Iterable[Path | None] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest`` names, nor one
    in ``protect`` (the trainer's last known-good checkpoint). ``keep_last`` < 1 deletes nothing."""
    if keep_last < 1:
        return []
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    keep = _names(protect) | _names([latest])
    doomed = [p for p in found[:-keep_last] if p.name not in keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def discard_after(run_dir: str | Path, target: Path, removable: Iterable[Path]) -> list[Path]:
    """Roll the run folder back to checkpoint ``target``: ``latest`` names it again, and the
    checkpoints newer than it that are in ``removable`` (the abandoned timeline the caller wrote
    itself) are deleted. Any other checkpoint is left alone. Returns what was deleted."""
    target = Path(target)
    mine = _names(removable)
    doomed = [p for p in list_checkpoints(run_dir) if step_of(p) > step_of(target) and p.name in mine]
    set_latest(run_dir, target)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------- load
def load_state(ckpt: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (JSON + safetensors; no pickle); damage is a CheckpointError."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {STATE_JSON} (not a training checkpoint, or it was deleted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: invalid JSON, truncated or corrupt ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: cannot read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt / STATE_JSON}: expected a JSON object, got {type(meta).__name__}")
    tensor_file = ckpt / STATE_TENSORS
    tensors = read_safetensors(tensor_file) if tensor_file.exists() else {}
    try:
        return unflatten_state(meta, tensors)
    except KeyError as e:
        what = f"tensor {e.args[0]!r}" if e.args else "a tensor"
        raise CheckpointError(f"{ckpt / STATE_JSON} names {what}, which {tensor_file} "
                              f"{'lacks' if tensor_file.exists() else 'would hold, but the file is missing'}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE_JSON}: malformed trainer state ({e})") from None


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Copy a checkpoint's weights (and expert biases) into ``model`` in place, strictly.

    One exception, DeepSeek-V3.2's own recipe: a checkpoint without lightning indexers (a
    DeepSeek-V3 model) loads into a V3.2 model of the same shape, whose indexers keep their fresh
    initialisation (``[model] init_from`` a V3 run plus ``index_n_heads`` etc.; then the dense
    warm-up, ``[train] dsa_warmup_steps``, trains them against the model's own attention)."""
    state = load_weights(ckpt, model.config)         # the model's family's names (nanoseek.model.registry)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" not in state:
            raise CheckpointError(f"{ckpt}: no model.embed_tokens.weight")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    fresh = set()
    if not any(".indexer." in k for k in state):
        fresh = {k for k in model.state_dict() if ".indexer." in k}
    try:
        result = model.load_state_dict(state, strict=not fresh)
        wrong = [k for k in result.missing_keys if k not in fresh] + list(result.unexpected_keys)
        if wrong:
            raise RuntimeError(f"missing or unexpected keys {wrong[:8]}")
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: the weights do not fit this model: {' '.join(str(e).split())[:400]}") from None


# ----------------------------------------------------------------------------- which checkpoint a path names
HF_SUBDIRS = ("final", "model", "hf")     # HF directories a run folder may hold, "final" first


class LoadError(UserError, ValueError):
    """No checkpoint (or, for :mod:`nanoseek.infer.loading`, no tokenizer) where the user pointed:
    every command prints it as one line."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The HF checkpoint directory ``path`` names: itself, else ``final/``, else ``latest``, else
    ``model/`` or ``hf/`` (see :mod:`nanoseek.infer.loading`). Raises :class:`LoadError` listing what was tried."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if (p / "config.json").exists():
        return p
    tried = [str(p / "config.json")]
    if (p / "final" / "config.json").exists():
        return p / "final"
    tried.append(str(p / "final" / "config.json"))
    ckpt = latest_checkpoint(p)
    if ckpt is not None and (ckpt / "config.json").exists():
        return ckpt
    tried.append(f"{p}/latest and {p}/checkpoints/step-*")
    for sub in HF_SUBDIRS[1:]:
        if (p / sub / "config.json").exists():
            return p / sub
        tried.append(str(p / sub / "config.json"))
    raise LoadError(f"{p}: not a checkpoint or run folder; looked for " + ", ".join(tried))


__all__ = ["flatten_state", "unflatten_state", "save_checkpoint", "load_state", "load_model_weights",
           "list_checkpoints", "latest_checkpoint", "set_latest", "remove_partials", "prune_checkpoints",
           "discard_after", "step_of", "checkpoints_dir", "CheckpointError", "STATE_JSON", "STATE_TENSORS",
           "recovery_hint", "resume_checkpoint", "LoadError", "HF_SUBDIRS", "resolve_checkpoint"]
