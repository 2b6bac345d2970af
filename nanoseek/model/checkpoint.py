"""HF-format checkpoints: ``config.json`` + ``model.safetensors`` (sharded with an index).

Tensor names are HuggingFace DeepSeek-V3's, so transformers, vLLM and SGLang load what nanoseek
saves and nanoseek loads theirs. In memory nanoseek differs in two places, converted here:

* routed experts are stacked (``mlp.experts.gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``);
  on disk they are ``mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight``;
* MTP module k is ``model.mtp.{k}``; on disk it is ``model.layers.{num_hidden_layers + k}``,
  with copies of the shared ``embed_tokens`` and ``shared_head.head`` as DeepSeek ships them.

Loading also accepts DeepSeek's FP8 block-quantised checkpoints (``weight_scale_inv`` per
128x128 block, ``quantization_config`` in config.json), dequantised on load. Only safetensors
are ever read: a checkpoint is never unpickled. Saving is atomic: files go to a temporary
directory next to the target, which then replaces it in one swap (:func:`nanoseek.atomic.replace_dir`).
A save replaces exactly the files it writes now (config.json, the safetensors and their index,
its ``extra_files``) and removes the weight files of an older save it no longer has (other
shards, a stale index: :func:`is_weight_file`), which would corrupt loading. Every other file of
the folder (a tokenizer, generation_config.json, a user's notes) stays, and the folder's and
files' permission modes are kept; a sub-folder where the save writes a file is refused before
anything is written (``CheckpointError``), so a save never deletes a user's file (see
:mod:`nanoseek.outdir`).

Loading fails with one :class:`CheckpointError` line (a ``UserError``: the CLI prints it without a
traceback) naming the file and what is wrong with it: missing, empty, truncated or corrupt
safetensors, an unreadable config.json, tensors that do not fit the config. When the checkpoint
is a ``RUN/checkpoints/step-N`` folder, the error also says which older checkpoint of the run
is intact (:func:`older_intact_checkpoint`, which checks headers and files without loading
tensors), so the user knows what to load or resume from instead.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..errors import ConfigError
from .config import ModelConfig
from .transformer import DeepseekV3ForCausalLM

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_EXPERT_RE = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is missing files or tensors, holds unreadable files, or tensors of the wrong shape."""


# every name some model save may write (the save replaces only those it writes now: see the module doc)
MODEL_FILES = frozenset({"config.json", "generation_config.json", SAFE_NAME, INDEX_NAME, "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def is_model_file(name: str) -> bool:
    """Whether ``name`` is a file some model save writes (config, weights, tokenizer files)."""
    return name in MODEL_FILES or bool(_SHARD_RE.match(name))


def is_weight_file(name: str) -> bool:
    """Whether ``name`` holds weights of a save (single file, shard, index): one of an older save is stale."""
    return name in (SAFE_NAME, INDEX_NAME) or bool(_SHARD_RE.match(name))


def check_model_dir_writable(directory: str | Path, extra_files: dict[str, str] | None = None) -> None:
    """Raise CheckpointError unless :func:`save_pretrained` may write ``directory`` (see module doc)."""
    from nanoseek.atomic import ReplaceRefused, check_replaceable

    extra = set(extra_files or ())
    try:
        check_replaceable(directory, lambda n: n == "config.json" or is_weight_file(n) or n in extra,
                          "model checkpoint files")
    except ReplaceRefused as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------- name mapping
def to_hf_state_dict(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """Our state dict with HF DeepSeek-V3 names and per-expert tensors."""
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = re.match(r"^model\.mtp\.(\d+)\.(.*)$", name)
        if m:
            name = f"model.layers.{L + int(m.group(1))}.{m.group(2)}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = t[j, :inter].clone()
                out[f"{prefix}{j}.up_proj.weight"] = t[j, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = t[j].clone()
        else:
            out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict`: stack experts, move MTP layers to ``model.mtp``."""
    L = config.num_hidden_layers
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in hf.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if k >= config.num_nextn_predict_layers:
                raise CheckpointError(f"tensor '{name}': layer index beyond num_hidden_layers + "
                                      f"num_nextn_predict_layers ({L + config.num_nextn_predict_layers})")
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model
            name = f"model.mtp.{k}.{rest}"
        e = _EXPERT_RE.match(name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
            continue
        ours[name] = t
    for prefix, by_idx in experts.items():
        n = config.n_routed_experts
        missing = [j for j in range(n) if j not in by_idx or len(by_idx[j]) != 3]
        if missing:
            raise CheckpointError(f"'{prefix}': experts {missing[:8]} are missing one of gate_proj/up_proj/down_proj")
        ours[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_idx[j]["gate_proj"], by_idx[j]["up_proj"]], dim=0) for j in range(n)])
        ours[f"{prefix}.down_proj"] = torch.stack([by_idx[j]["down_proj"] for j in range(n)])
    return ours


# ---------------------------------------------------------------------------- FP8
def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek FP8 weights: each (block x block) tile times its scale_inv [ceil(out/b0), ceil(in/b1)]."""
    out_f, in_f = weight.shape
    expected = (-(-out_f // block[0]), -(-in_f // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} for a {out_f}x{in_f} weight: "
                              f"expected {expected} ({block[0]}x{block[1]} blocks)")
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return (weight.float() * s).to(dtype)


# ---------------------------------------------------------------------------- save
def save_pretrained(model: DeepseekV3ForCausalLM, directory: str | Path,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json and safetensors (sharded above max_shard_bytes), atomically.

    In an existing ``directory`` only the files written now (and stale weight files) are
    replaced; everything else stays (see the module docstring).
    """
    directory = Path(directory)
    check_model_dir_writable(directory, extra_files)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = to_hf_state_dict(model)
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
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
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        _atomic_replace_dir(tmp, directory, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _atomic_replace_dir(src: Path, dst: Path, extra_files: dict[str, str] | None = None) -> None:
    """Swap src in at dst (:func:`nanoseek.atomic.replace_dir`): the files src holds replace dst's,
    dst's stale weight files go, everything else in dst stays."""
    from nanoseek.atomic import ReplaceRefused, replace_dir

    try:
        replace_dir(src, dst, is_weight_file, "model checkpoint files")
    except ReplaceRefused as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------- load
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def _shard_files(directory: Path) -> list[Path]:
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


def verify_checkpoint(directory: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Cheap integrity check without loading tensors: config.json parses, every safetensors file
    (the model's and any in ``extra``) has a valid header covering the file; else CheckpointError."""
    from .registry import config_from_json

    directory = Path(directory)
    config_from_json(directory / "config.json")          # any family's config parses
    for f in [*_shard_files(directory), *(directory / e for e in extra if e.endswith(".safetensors"))]:
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


def load_hf_tensors(directory: str | Path, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by HF name, FP8 blocks dequantised.

    FP8 weights are dequantised to ``dtype``; by default to the dtype of the unquantised
    embedding (bf16 in DeepSeek's release), so a checkpoint loads in one dtype.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for f in _shard_files(directory):
        tensors.update(read_safetensors(f))
    qc = config.quantization_config or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    target = dtype or _checkpoint_dtype(tensors, default=torch.bfloat16)
    for name in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wname = name[: -len("_scale_inv")]
        if wname not in tensors:
            raise CheckpointError(f"{directory}: '{name}' has no matching '{wname}'")
        try:
            tensors[wname] = dequantize_fp8_block(tensors[wname], tensors.pop(name), block, target)
        except CheckpointError as e:
            raise CheckpointError(f"{directory}: '{wname}': {e}") from None
    fp8 = [k for k, t in tensors.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if fp8:
        raise CheckpointError(f"{directory}: FP8 tensors without a weight_scale_inv cannot be dequantised: {fp8[:5]}")
    return tensors


def load_state(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as nanoseek's state dict for ``config`` (see :mod:`nanoseek.model.registry`)."""
    return from_hf_state_dict(load_hf_tensors(directory, config), config)


def from_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    """Load an HF-format DeepSeek-V3 checkpoint (nanoseek's own or anyone's).

    Errors are :class:`CheckpointError` (config errors included), with an older intact
    checkpoint of the same run named when there is one (see the module docstring)."""
    directory = Path(directory)
    try:
        return _from_pretrained(directory, dtype, device)
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"{e}{recovery_hint(directory)}") from None


def _from_pretrained(directory: Path, dtype: torch.dtype | None, device: str | torch.device) -> DeepseekV3ForCausalLM:
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (is this a checkpoint directory?)")
    config = ModelConfig.from_json(directory / "config.json")
    tensors = load_hf_tensors(directory, config, dtype)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in tensors):
        warnings.warn(f"{directory}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP weights (transformers drops them); MTP is disabled for this model")
        config = config.replace(num_nextn_predict_layers=0)
    config.quantization_config = None
    state = from_hf_state_dict(tensors, config)
    model = DeepseekV3ForCausalLM(config, init_weights=False)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
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
    target = dtype or _checkpoint_dtype(state, default=torch.float32)
    model.to(target)
    model.load_state_dict(state, strict=True)
    return model.to(device)


def _checkpoint_dtype(state: dict[str, torch.Tensor], default: torch.dtype) -> torch.dtype:
    """The model dtype a checkpoint was saved in: that of its (never quantised) embedding."""
    t = state.get("model.embed_tokens.weight")
    if t is None or not t.is_floating_point() or t.element_size() < 2:
        return default
    return t.dtype


__all__ = ["save_pretrained", "from_pretrained", "load_state", "is_model_file", "is_weight_file", "check_model_dir_writable",
           "to_hf_state_dict",
           "from_hf_state_dict", "dequantize_fp8_block", "CheckpointError", "ConfigError", "read_safetensors",
           "verify_checkpoint", "older_intact_checkpoint", "recovery_hint"]
