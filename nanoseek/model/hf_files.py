"""The files of an HF-format checkpoint folder, for every model family: ``config.json`` and
``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with their index).

What a family's checkpoint module (:mod:`nanoseek.model.checkpoint` for DeepSeek-V2/V3/V3.2,
:mod:`nanoseek.model.v4.checkpoint` for V4) shares, so each of them only maps tensor names:

* writing (:func:`write_model_dir`): a state dict already under the family's on-disk names and a
  config.json dict, sharded above ``max_shard_bytes``, atomically. Files go to a temporary
  directory next to the target, which then replaces it in one swap
  (:func:`nanoseek.atomic.replace_dir`): exactly the files written now (config.json, the
  safetensors and their index, ``extra_files``) are replaced and the weight files of an older save
  that this one no longer has (other shards, a stale index: :func:`is_weight_file`) removed; every
  other file of the folder (a tokenizer, generation_config.json, a user's notes) stays, with the
  folder's and files' permission modes. A sub-folder where the save writes a file is refused
  before anything is written (``CheckpointError``), so a save never deletes a user's file (see
  :mod:`nanoseek.outdir`).
* reading (:func:`read_tensors`, :func:`read_safetensors`): only safetensors are ever read, a
  checkpoint is never unpickled; a missing, empty, truncated or corrupt file is one
  :class:`CheckpointError` line (a ``UserError``: the CLI prints it without a traceback) naming it.
* fitting a read state into a freshly built model (:func:`load_into`): missing / unexpected
  tensors and shapes the config does not imply are one line; the model takes the checkpoint's
  dtype (that of its never-quantised embedding) unless one is asked for.
* recovery hints (:func:`explained`, :func:`recovery_hint`): when the checkpoint is a
  ``RUN/checkpoints/step-N`` folder, a load error also says which older checkpoint of the run is
  intact (:func:`older_intact_checkpoint`, which checks headers and files without loading tensors).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, UserError

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

T = TypeVar("T")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is missing files or tensors, holds unreadable files, or tensors of the wrong shape."""


# every name some model save may write (the save replaces only those it writes now: see the module doc)
MODEL_FILES = frozenset({"config.json", "generation_config.json", SAFE_NAME, INDEX_NAME, "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def is_model_file(name: str) -> bool:
    """Whether ``name`` is a file some model save writes (config, weights, tokenizer files)."""
    return name in MODEL_FILES or bool(_SHARD_RE.match(name))


def is_weight_file(name: str) -> bool:
    """Whether ``name`` holds weights of a save (single file, shard, index): one of an older save is stale."""
    return name in (SAFE_NAME, INDEX_NAME) or bool(_SHARD_RE.match(name))


def check_model_dir_writable(directory: str | Path, extra_files: dict[str, str] | None = None) -> None:
    """Raise CheckpointError unless a model save may write ``directory`` (see module doc)."""
    from nanoseek.atomic import ReplaceRefused, check_replaceable

    extra = set(extra_files or ())
    try:
        check_replaceable(directory, lambda n: n == "config.json" or is_weight_file(n) or n in extra,
                          "model checkpoint files")
    except ReplaceRefused as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------- save
def write_model_dir(directory: str | Path, state: dict[str, torch.Tensor], config: dict,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config`` as config.json and ``state`` (on-disk names, contiguous tensors) as
    safetensors, sharded above ``max_shard_bytes``, atomically (see the module docstring)."""
    directory = Path(directory)
    check_model_dir_writable(directory, extra_files)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SAFE_NAME, metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_config_dict(model: torch.nn.Module) -> dict:
    """The config.json a save writes: the model's config, with the dtype it is saved in."""
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    return cfg


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap src in at dst (:func:`nanoseek.atomic.replace_dir`): the files src holds replace dst's,
    dst's stale weight files go, everything else in dst stays."""
    from nanoseek.atomic import ReplaceRefused, replace_dir

    try:
        replace_dir(src, dst, is_weight_file, "model checkpoint files")
    except ReplaceRefused as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------- read
def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the index's shards, or the single file)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory" if not directory.exists()
                              else f"{directory}: not a directory")
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, OSError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing")
        return files
    single = directory / SAFE_NAME
    if single.exists():
        return [single]
    if any(next(directory.glob(pattern), None) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
        raise CheckpointError(f"{directory}: only pickle weights (.bin/.pt/.pth/.ckpt) found; nanoseek reads "
                              "safetensors only (never unpickles); convert them with transformers' save_pretrained")
    raise CheckpointError(f"{directory}: no {SAFE_NAME} or {INDEX_NAME}")


def _unreadable(f: Path, e: BaseException) -> CheckpointError:
    size = f.stat().st_size if f.exists() else 0
    why = "empty file" if size == 0 else f"{size:,} bytes, truncated or corrupt"
    reason = " ".join(str(e).split()) or type(e).__name__
    return CheckpointError(f"{f}: not a readable safetensors file ({why}: {reason})")


def read_safetensors(f: str | Path, keys_only: bool = False) -> dict[str, torch.Tensor] | list[str]:
    """All tensors of one safetensors file (or only its tensor names, which reads just the header).

    safetensors checks the header and that the data covers the file exactly, so an empty, cut or
    padded file is a :class:`CheckpointError` naming it, never a partly loaded state.
    """
    f = Path(f)
    try:
        with safe_open(str(f), framework="pt") as fh:
            if keys_only:
                return list(fh.keys())
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing") from None
    except Exception as e:        # SafetensorError (a Rust exception), OSError, a bad dtype in the header
        raise _unreadable(f, e) from None


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by its on-disk name (all shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in shard_files(Path(directory)):
        tensors.update(read_safetensors(f))
    return tensors


def read_config(directory: Path, config_class: type):
    """The folder's config.json as ``config_class`` (errors: one line naming the file)."""
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (is this a checkpoint directory?)")
    return config_class.from_json(directory / "config.json")


# ---------------------------------------------------------------------------- into a model
def checkpoint_dtype(state: dict[str, torch.Tensor], default: torch.dtype) -> torch.dtype:
    """The model dtype a checkpoint was saved in: that of its (never quantised) embedding."""
    t = state.get("model.embed_tokens.weight")
    if t is None or not t.is_floating_point() or t.element_size() < 2:
        return default
    return t.dtype


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path,
              dtype: torch.dtype | None, device: str | torch.device):
    """Load ``state`` (the model's own names) into a freshly built ``model``, strictly: missing or
    unexpected tensors and shapes the config does not imply are one CheckpointError line. The model
    takes ``dtype``, else the checkpoint's (:func:`checkpoint_dtype`, fp32 when it has none)."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: missing tensors {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                              f"unexpected tensors {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    for k, t in state.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{directory}: tensor '{k}' has shape {tuple(t.shape)}, config implies "
                                  f"{tuple(expected[k].shape)}")
    model.to(dtype or checkpoint_dtype(state, default=torch.float32))
    model.load_state_dict(state, strict=True)
    return model.to(device)


# ---------------------------------------------------------------------------- integrity and recovery
def verify_checkpoint(directory: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Cheap integrity check without loading tensors: config.json parses, every safetensors file
    (the model's and any in ``extra``) has a valid header covering the file; else CheckpointError."""
    from .registry import config_from_json

    directory = Path(directory)
    config_from_json(directory / "config.json")          # any family's config parses
    for f in [*shard_files(directory), *(directory / e for e in extra if e.endswith(".safetensors"))]:
        read_safetensors(f, keys_only=True)
    for e in extra:
        if e.endswith(".json"):
            try:
                json.loads((directory / e).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{directory / e}: unreadable ({type(err).__name__})") from None


def older_intact_checkpoint(directory: str | Path, extra: tuple[str, ...] = ()) -> Path | None:
    """For ``RUN/checkpoints/step-N``: the newest ``step-M`` (M < N) of the same run that passes
    :func:`verify_checkpoint` (with ``extra`` files required), else None."""
    directory = Path(directory)
    m = _STEP_DIR_RE.match(directory.name)
    if not m or not directory.parent.is_dir():
        return None
    step = int(m.group(1))
    older = sorted((int(mm.group(1)), p) for p in directory.parent.iterdir()
                   if p.is_dir() and (mm := _STEP_DIR_RE.match(p.name)) and int(mm.group(1)) < step)
    for _, cand in reversed(older):
        try:
            if all((cand / e).exists() for e in extra):
                verify_checkpoint(cand, extra)
                return cand
        except (CheckpointError, ConfigError):
            continue
    return None


def recovery_hint(directory: str | Path, extra: tuple[str, ...] = (), how: str = "load it with --model {path}") -> str:
    """``; older checkpoint X is intact: ...`` (or that none is) for a run's step folder; '' otherwise."""
    directory = Path(directory)
    if not _STEP_DIR_RE.match(directory.name):
        return ""
    good = older_intact_checkpoint(directory, extra)
    if good is None:
        return f"; no older intact checkpoint in {directory.parent}"
    return f"; the older checkpoint {good} is intact: {how.format(path=good)}"


def explained(directory: str | Path, load: Callable[[Path], T]) -> T:
    """``load(directory)``, its CheckpointError / ConfigError re-raised as one CheckpointError line
    with the run's :func:`recovery_hint` appended."""
    directory = Path(directory)
    try:
        return load(directory)
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"{e}{recovery_hint(directory)}") from None


__all__ = ["SAFE_NAME", "INDEX_NAME", "DEFAULT_MAX_SHARD_BYTES", "CheckpointError", "MODEL_FILES", "is_model_file",
           "is_weight_file", "check_model_dir_writable", "write_model_dir", "model_config_dict", "shard_files",
           "read_safetensors", "read_tensors", "read_config", "checkpoint_dtype", "load_into", "verify_checkpoint",
           "older_intact_checkpoint", "recovery_hint", "explained"]
