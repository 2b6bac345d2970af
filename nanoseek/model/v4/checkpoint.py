"""DeepSeek-V4 checkpoints in all three layouts in use; nanoseek writes transformers' in-memory one.

* nanoseek (default save): transformers' in-memory names, the module names of ``transformer.py``
  (``model.layers.{i}.self_attn.q_a_proj.weight``, stacked ``mlp.experts.gate_up_proj [E, 2I, d]``
  / ``down_proj [E, d, I]``...) plus ``model.mtp.{k}.*``. transformers loads it as is (its renames
  leave these names alone; it skips ``mtp`` tensors).
* transformers' own ``save_pretrained`` ("original format", on by default) reverts its renames only
  partly: ``head.weight``, ``model.layers.{i}.attn.wq_a.weight``, ``model.layers.{i}.attn.norm.weight``
  (the main kv_norm), ``model.layers.{i}.ffn.experts.{j}.w1.weight``, but ``model.embed_tokens.weight``
  and ``model.hc_head.hc_fn`` unchanged.
* DeepSeek's release (``deepseek-ai/DeepSeek-V4-*``), its reference code's names: ``embed.weight``,
  ``layers.{i}.attn.wq_a.weight``, ``layers.{i}.attn.kv_norm.weight``, ``layers.{i}.attn.compressor.ape``,
  ``layers.{i}.attn.indexer.compressor.wkv.weight``, ``layers.{i}.ffn.experts.{j}.w1.weight``,
  ``layers.{i}.hc_attn_fn``, ``hc_head_fn``, ``mtp.0.e_proj.weight``... ``save_pretrained(...,
  deepseek_names=True)`` writes it (tests check transformers reads it).

Loading maps any of them to nanoseek's names (:func:`normalize_names`, the renames of transformers'
conversion mapping) and stacks per-expert w1 (gate) / w3 (up) / w2 (down). DeepSeek's FP8/FP4
tensors (a ``.scale`` beside a weight) are refused with one clear line: dequantise them first.
The files themselves (atomic sharded save, safetensors-only reading, one-line
``CheckpointError``s, the older intact checkpoint named on a load error) are every family's:
:mod:`nanoseek.model.hf_files`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..hf_files import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, explained, load_into, model_config_dict,
                        read_config, read_tensors, write_model_dir)
from .config import DeepseekV4Config
from .transformer import DeepseekV4ForCausalLM

# (DeepSeek release name piece, nanoseek/transformers name piece), applied in order inside a layer
# name, the indexer's first (its q/weights projections sit beside its compressor in DeepSeek's code).
_INDEXER_RENAMES = [
    (".attn.indexer.weights_proj.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (".attn.indexer.wq_b.", ".self_attn.compressor.indexer.q_b_proj."),
    (".attn.indexer.compressor.", ".self_attn.compressor.indexer."),
]
_LAYER_RENAMES = [
    (".attn.", ".self_attn."),
    (".ffn.", ".mlp."),
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".hc_attn_fn", ".attn_hc.fn"), (".hc_attn_base", ".attn_hc.base"), (".hc_attn_scale", ".attn_hc.scale"),
    (".hc_ffn_fn", ".ffn_hc.fn"), (".hc_ffn_base", ".ffn_hc.base"), (".hc_ffn_scale", ".ffn_hc.scale"),
    (".hc_head_fn", ".hc_head.hc_fn"), (".hc_head_base", ".hc_head.hc_base"), (".hc_head_scale", ".hc_head.hc_scale"),
    (".attn_sink", ".sinks"),
    (".compressor.norm.", ".compressor.kv_norm."), (".indexer.norm.", ".indexer.kv_norm."),
    (".ape", ".position_bias"),
    (".wq_a.", ".q_a_proj."), (".wq_b.", ".q_b_proj."), (".wkv.", ".kv_proj."), (".wgate.", ".gate_proj."),
    (".wo_a.", ".o_a_proj."), (".wo_b.", ".o_b_proj."), (".q_norm.", ".q_a_norm."),
    (".gate.bias", ".gate.e_score_correction_bias"),
    (".shared_experts.w1.", ".shared_experts.gate_proj."), (".shared_experts.w2.", ".shared_experts.down_proj."),
    (".shared_experts.w3.", ".shared_experts.up_proj."),
]
_TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_DS_EXPERT_RE = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


# transformers' save_pretrained reverts its renames only partly ("original format"): it writes the
# main attention's kv_norm as ``attn.norm``; DeepSeek's release writes ``attn.kv_norm``.
_HF_SAVE_RENAMES = [(".attn.norm.", ".self_attn.kv_norm.")]


def _to_ours(name: str) -> str:
    """Any of the three layouts' names -> nanoseek's (= transformers' in-memory) name."""
    bare = name[len("model."):] if name.startswith("model.") else name
    if bare in _TOP_RENAMES:
        return _TOP_RENAMES[bare]
    if bare == "lm_head.weight":
        return bare
    m = re.match(r"^(layers|mtp)\.(\d+)(\..*)$", bare)
    if not m:
        return "model." + bare
    rest = m.group(3)
    for a, b in _HF_SAVE_RENAMES + _INDEXER_RENAMES + _LAYER_RENAMES:
        rest = rest.replace(a, b)
    return f"model.{m.group(1)}.{m.group(2)}{rest}"


def normalize_names(tensors: dict[str, torch.Tensor], config: DeepseekV4Config) -> dict[str, torch.Tensor]:
    """nanoseek / transformers-saved / DeepSeek-release tensor names -> nanoseek's, experts stacked."""
    quant = [k for k in tensors if k.endswith(".scale") and not k.endswith("hc.scale")]
    if quant:
        raise CheckpointError(f"quantised DeepSeek-V4 tensors ({quant[0]}, ...): dequantise the checkpoint to "
                              "bf16/fp32 first (FP8/FP4 V4 checkpoints are not read directly)")
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        ours = _to_ours(name)
        e = _DS_EXPERT_RE.match(ours)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
        else:
            out[ours] = t
    for prefix, by_idx in experts.items():
        n = config.n_routed_experts
        missing = [j for j in range(n) if len(by_idx.get(j, {})) != 3]
        if missing:
            raise CheckpointError(f"'{prefix}': experts {missing[:8]} lack one of w1/w2/w3")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([by_idx[j]["w1"], by_idx[j]["w3"]]) for j in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([by_idx[j]["w2"] for j in range(n)])
    return out


def to_deepseek_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoseek's names -> DeepSeek's release names, per-expert w1/w2/w3 (the inverse of :func:`normalize_names`)."""
    top = {v: k for k, v in _TOP_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        m = re.match(r"^model\.(layers|mtp)\.(\d+)(\..*)$", name)
        if not m:
            out[name] = t
            continue
        head, rest = f"{m.group(1)}.{m.group(2)}", m.group(3)
        if rest.endswith(".mlp.experts.gate_up_proj") or rest.endswith(".mlp.experts.down_proj"):
            base = head + rest.rsplit(".", 1)[0].replace(".mlp.", ".ffn.")
            for j in range(t.shape[0]):
                if rest.endswith("gate_up_proj"):
                    inter = t.shape[1] // 2
                    out[f"{base}.{j}.w1.weight"], out[f"{base}.{j}.w3.weight"] = t[j, :inter], t[j, inter:]
                else:
                    out[f"{base}.{j}.w2.weight"] = t[j]
            continue
        for a, b in _INDEXER_RENAMES + list(reversed(_LAYER_RENAMES)):
            rest = rest.replace(b, a)
        out[head + rest] = t
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_state_dict(model: DeepseekV4ForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_pretrained(model: DeepseekV4ForCausalLM, directory: str | Path,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_files: dict[str, str] | None = None,
                    deepseek_names: bool = False) -> Path:
    """Write config.json and safetensors (sharded above max_shard_bytes) atomically, in transformers'
    layout (or DeepSeek's release names with ``deepseek_names``); see nanoseek.model.hf_files."""
    state = to_hf_state_dict(model)
    if deepseek_names:
        state = to_deepseek_names(state)
    return write_model_dir(directory, state, model_config_dict(model), max_shard_bytes, extra_files)


def load_state(directory: str | Path, config: DeepseekV4Config) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under nanoseek's names (any of the three layouts; experts stacked)."""
    return normalize_names(read_tensors(directory), config)


def from_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> DeepseekV4ForCausalLM:
    """Load a V4 checkpoint (nanoseek's, transformers' or DeepSeek's release names); errors are one
    :class:`CheckpointError` line."""
    return explained(directory, lambda d: _from_pretrained(d, dtype, device))


def _from_pretrained(directory: Path, dtype, device) -> DeepseekV4ForCausalLM:
    config = read_config(directory, DeepseekV4Config)
    tensors = load_state(directory, config)
    if config.num_nextn_predict_layers and not any(k.startswith("model.mtp.") for k in tensors):
        config = config.replace(num_nextn_predict_layers=0)   # transformers drops MTP weights
    config.quantization_config = None
    return load_into(DeepseekV4ForCausalLM(config, init_weights=False), tensors, directory, dtype, device)


__all__ = ["save_pretrained", "from_pretrained", "load_state", "to_hf_state_dict", "normalize_names", "to_deepseek_names",
           "CheckpointError"]
