"""HF-format checkpoints: ``config.json`` + ``model.safetensors`` (sharded with an index).

Tensor names are HuggingFace DeepSeek-V3's, so transformers, vLLM and SGLang load what nanoseek
saves and nanoseek loads theirs. In memory nanoseek differs in two places, converted here:

* routed experts are stacked (``mlp.experts.gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``);
  on disk they are ``mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight``;
* MTP module k is ``model.mtp.{k}``; on disk it is ``model.layers.{num_hidden_layers + k}``,
  with copies of the shared ``embed_tokens`` and ``shared_head.head`` as DeepSeek ships them.

Loading also accepts DeepSeek's FP8 block-quantised checkpoints (``weight_scale_inv`` per
128x128 block, ``quantization_config`` in config.json), dequantised on load.

The files themselves (atomic sharded save that keeps a folder's other files, safetensors-only
reading, one-line :class:`CheckpointError`s naming the file, the older intact checkpoint of a run
named on a load error) are every family's: :mod:`nanoseek.model.hf_files`; this module maps V3's
tensor names onto them.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import torch

from .config import ModelConfig
from .hf_files import (DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, SAFE_NAME, CheckpointError, check_model_dir_writable,
                       checkpoint_dtype, explained, is_model_file, is_weight_file, load_into, model_config_dict,
                       older_intact_checkpoint, read_config, read_safetensors, read_tensors, recovery_hint,
                       verify_checkpoint, write_model_dir)
from .transformer import DeepseekV3ForCausalLM

_EXPERT_RE = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


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
        if not config.n_shared_experts and ".mlp.shared_experts." in name and t.numel() == 0:
            continue  # transformers writes empty shared-expert matrices for n_shared_experts = 0
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
        extra = sorted(j for j in by_idx if j >= n)
        if extra:
            raise CheckpointError(f"'{prefix}': experts {extra[:8]} beyond the config's n_routed_experts ({n})")
        # stacked below, so one expert of another shape than the others is named here (experts that all
        # differ from the config stack, and load_into says they do not fit)
        gate = Counter(tuple(by_idx[j]["gate_proj"].shape) for j in range(n)).most_common(1)[0][0]
        want = {"gate_proj": gate, "up_proj": gate, "down_proj": gate[::-1]}
        for j in range(n):
            for part, shape in want.items():
                if tuple(by_idx[j][part].shape) != shape:
                    raise CheckpointError(f"tensor '{prefix}.{j}.{part}.weight' has shape "
                                          f"{tuple(by_idx[j][part].shape)}; the layer's other experts give {shape}")
        ours[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_idx[j]["gate_proj"], by_idx[j]["up_proj"]], dim=0) for j in range(n)])
        ours[f"{prefix}.down_proj"] = torch.stack([by_idx[j]["down_proj"] for j in range(n)])
    return ours


# ---------------------------------------------------------------------------- FP8
def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek FP8 weights: each (block x block) tile times its scale_inv [ceil(out/b0), ceil(in/b1)]."""
    if weight.dim() != 2:
        raise CheckpointError(f"a block-scaled FP8 weight must be a matrix, got shape {tuple(weight.shape)}")
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
    replaced; everything else stays (:func:`nanoseek.model.hf_files.write_model_dir`).
    """
    differences = model.config.transformers_differences()
    if differences:   # (no path in the text: Python's warning filter says it once per process, not every save)
        warnings.warn(f"transformers would load this model's checkpoints with other logits than nanoseek's (it has "
                      f"no way to express {'; '.join(differences)}); nanoseek loads them exactly",
                      RuntimeWarning, stacklevel=2)
    return write_model_dir(directory, to_hf_state_dict(model), model_config_dict(model), max_shard_bytes, extra_files)


# ---------------------------------------------------------------------------- load
def load_hf_tensors(directory: str | Path, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by HF name, FP8 blocks dequantised.

    FP8 weights are dequantised to ``dtype``; by default to the dtype of the unquantised
    embedding (bf16 in DeepSeek's release), so a checkpoint loads in one dtype.
    """
    directory = Path(directory)
    tensors = read_tensors(directory)
    qc = config.quantization_config or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    target = dtype or checkpoint_dtype(tensors, default=torch.bfloat16)
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
    return explained(directory, lambda d: _from_pretrained(d, dtype, device))


def _from_pretrained(directory: Path, dtype: torch.dtype | None, device: str | torch.device) -> DeepseekV3ForCausalLM:
    config = read_config(directory, ModelConfig)
    tensors = load_hf_tensors(directory, config, dtype)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in tensors):
        warnings.warn(f"{directory}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP weights (transformers drops them); MTP is disabled for this model")
        config = config.replace(num_nextn_predict_layers=0)
    config.quantization_config = None
    state = from_hf_state_dict(tensors, config)
    return load_into(DeepseekV3ForCausalLM(config, init_weights=False), state, directory, dtype, device)


# the shared file layer's names that callers of V3 checkpoints use (their home: nanoseek.model.hf_files)
__all__ = ["save_pretrained", "from_pretrained", "load_state", "load_hf_tensors", "to_hf_state_dict",
           "from_hf_state_dict", "dequantize_fp8_block",
           "CheckpointError", "INDEX_NAME", "SAFE_NAME", "is_model_file", "is_weight_file", "check_model_dir_writable",
           "read_safetensors", "verify_checkpoint", "older_intact_checkpoint", "recovery_hint"]
