"""Model families by ``model_type``: the one place that maps a config.json to its config class,
model class, checkpoint loader and saver.

Every caller that reads a config, builds a model or loads / saves a checkpoint (the trainer, the
post-training stages, the engine's loader, the demo, the CLI commands) goes through this table
instead of naming ``DeepseekV3ForCausalLM`` or ``DeepseekV4ForCausalLM``:

  model_type                          family       config / model / checkpoint
  deepseek_v3, deepseek_v32,          DeepSeek-V3  model.config.ModelConfig, model.transformer,
  deepseek_v2 (or none: V3's default)              model.checkpoint
  deepseek_v4                         DeepSeek-V4  model.v4.config.DeepseekV4Config, model.v4.transformer,
                                                   model.v4.checkpoint

Config classes are pure Python (imported here); the model and checkpoint parts are named by
dotted path and imported on first use, so reading a config never imports torch. A family also
lists the features it does not support (:func:`require`): asking for one is one ``ConfigError``
line naming the model type and the feature, never a traceback deep inside the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .config import ModelConfig
from .config_fields import config_file, preset_or_path, read_json
from .v4.config import CSA, DeepseekV4Config


@dataclass(frozen=True)
class Family:
    name: str                              # "DeepSeek-V3"
    model_types: tuple[str, ...]           # config.json model_type values it reads (first: the one it writes)
    config_class: type
    model_path: str                        # "module:Class" of the causal LM
    checkpoint_path: str                   # module with from_pretrained / save_pretrained / load_state
    params_path: str                       # module with count_params(config) -> ParamCount, cache_bytes(...)
    unsupported: dict[str, str] = field(default_factory=dict)   # feature -> why not
    architectures: tuple[str, ...] = ()    # config.json "architectures" it reads when model_type is not one of its own
    # whether a config's model has lightning indexers to train (V3.2's MLA ones, V4's CSA ones)
    has_indexers: Callable[[Any], bool] = lambda c: bool(c.index_n_heads)

    def model_class(self):
        module, _, name = self.model_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def checkpoint(self):
        return importlib.import_module(self.checkpoint_path)


V3 = Family("DeepSeek-V3", ("deepseek_v3", "deepseek_v32", "deepseek_v2"), ModelConfig,
            "nanoseek.model.transformer:DeepseekV3ForCausalLM", "nanoseek.model.checkpoint", "nanoseek.model.params",
            architectures=("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV2ForCausalLM"))
V4 = Family("DeepSeek-V4", ("deepseek_v4",), DeepseekV4Config,
            "nanoseek.model.v4.transformer:DeepseekV4ForCausalLM", "nanoseek.model.v4.checkpoint",
            "nanoseek.model.v4.params",
            architectures=("DeepseekV4ForCausalLM",),
            has_indexers=lambda c: CSA in c.layer_types,
            unsupported={
                "gguf": "llama.cpp has no DeepSeek-V4 architecture (hyper-connections, compressed attention)",
                "expert_parallel": "expert parallelism shards V3's MoE experts only ([parallel] ep = 1)",
                "fsdp": "FSDP wrapping is written for V3's decoder layers ([parallel] fsdp = false)",
                "node_limited_routing": "V4's router (hash layers, sqrt-softplus scores) has no group or node limit "
                                        "([train] max_nodes_per_token = 0)",
                "recompute": "activation recomputation wraps V3's decoder layers ([train] recompute = \"none\")",
            })
FAMILIES: tuple[Family, ...] = (V3, V4)
DEFAULT = V3                               # configs without model_type (nanoseek's older presets) are V3


def family_for_type(model_type: Any) -> Family:
    """The family reading ``model_type`` (None or a type no family claims: V3, whose config
    parser words any error)."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return DEFAULT


def family_of(config_or_model: Any) -> Family:
    """The family of a config object or of a model (its ``.config``)."""
    config = getattr(config_or_model, "config", config_or_model)
    for f in FAMILIES:
        if isinstance(config, f.config_class):
            return f
    raise ConfigError(f"not a nanoseek model config: {type(config).__name__}")


def require(config_or_model: Any, feature: str, where: str) -> None:
    """Raise one ConfigError line if the model's family does not support ``feature``."""
    f = family_of(config_or_model)
    why = f.unsupported.get(feature)
    if why is not None:
        raise ConfigError(f"{where}: not supported for model_type '{f.model_types[0]}' ({f.name}): {why}")


def has_indexers(config: Any) -> bool:
    """Whether the config's model has lightning indexers whose training stages apply (train/dsa.py)."""
    return family_of(config).has_indexers(config)


def supports(config_or_model: Any, feature: str) -> bool:
    return feature not in family_of(config_or_model).unsupported


# ---------------------------------------------------------------------------- configs
def all_field_names() -> list[str]:
    """Every family's config fields (the keys a train config's ``[model]`` table may override)."""
    return sorted({f.name for fam in FAMILIES for f in dataclasses.fields(fam.config_class)})


def count_params(config):
    """The config's parameter counts (``.total``, ``.active``, ``.mtp``), by its family's analytic count."""
    return importlib.import_module(family_of(config).params_path).count_params(config)


def cache_bytes(config, batch: int, seq_len: int, dtype_bytes: int = 4, with_mtp: bool = True) -> int:
    """Lower bound of the bytes of the engine's cache for ``batch`` rows x ``seq_len`` positions."""
    return importlib.import_module(family_of(config).params_path).cache_bytes(config, batch, seq_len, dtype_bytes,
                                                                              with_mtp)


def family_of_dict(d: dict, source: str = "config") -> Family:
    """The family that reads a config.json dict: by its ``model_type``; a type no family claims
    (a fine-tune's own, e.g. Kimi K2's ``kimi_k2`` over DeepSeek-V3's architecture) by its
    ``architectures``; none of either: V3 (nanoseek's older presets), unless the fields are
    another family's. Anything else is one ConfigError line naming ``model_type``."""
    model_type, archs = d.get("model_type"), d.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    for f in FAMILIES:
        if any(a in f.architectures for a in archs):
            return f
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    if model_type is not None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a model nanoseek reads (model_type one of "
                          f"{known}, or architectures naming one of "
                          f"{', '.join(a for f in FAMILIES for a in f.architectures)})")
    default_fields = {x.name for x in dataclasses.fields(DEFAULT.config_class)}
    for f in FAMILIES:
        if f is DEFAULT:
            continue
        own = sorted(set(d) & ({x.name for x in dataclasses.fields(f.config_class)} - default_fields))
        if own:
            raise ConfigError(f"{source}: no model_type, and field(s) {', '.join(own[:3])} are {f.name}'s: "
                              f"add \"model_type\": \"{f.model_types[0]}\" (model_type one of {known})")
    return DEFAULT


def config_from_dict(d: Any, source: str = "config"):
    """A config.json-style dict -> its family's config object (validated)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    return family_of_dict(d, source).config_class.from_dict(d, source=source)


def read_config_json(path: str | Path) -> dict:
    """config.json (or a directory holding one) -> dict; errors are one ConfigError line."""
    return read_json(config_file(path))


def config_from_json(path: str | Path):
    src = config_file(path)
    return config_from_dict(read_json(src), source=str(src))


def load_config(name_or_path: str | Path):
    """A preset name (``nanoseek/configs/models/NAME.json``), a config.json or a checkpoint dir,
    of any family."""
    return config_from_json(preset_or_path(name_or_path))


def with_fields(config, fields: dict, source: str):
    """``config`` with HF fields replaced (e.g. a train config's inline ``[model]`` keys), re-validated
    by its family's parser (unknown fields name the family's valid ones)."""
    base = config.rebase(config.to_dict(), fields)      # keys derived from overridden fields follow them
    return config_from_dict({**base, **fields}, source=source)


# ---------------------------------------------------------------------------- models and checkpoints
def build_model(config, **kwargs):
    """A freshly initialised model of the config's family."""
    return family_of(config).model_class()(config, **kwargs)


def checkpoint_family(directory: str | Path) -> Family:
    """The family of a checkpoint directory, from its config.json's model_type (an unreadable one:
    V3's loader, which words the error)."""
    try:
        d = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT
    return family_of_dict(d, str(Path(directory) / "config.json")) if isinstance(d, dict) else DEFAULT


def from_pretrained(directory: str | Path, dtype=None, device="cpu"):
    """Load a checkpoint of any family (errors: one ``CheckpointError`` line)."""
    return checkpoint_family(directory).checkpoint().from_pretrained(directory, dtype=dtype, device=device)


def save_pretrained(model, directory: str | Path, **kwargs) -> Path:
    """Write ``model`` in its family's HF layout (atomic; see the family's checkpoint module)."""
    return family_of(model).checkpoint().save_pretrained(model, directory, **kwargs)


def load_weights(directory: str | Path, config) -> dict:
    """A checkpoint's weights as the state dict of a model built from ``config`` (names mapped,
    experts stacked), for loading into an existing model (resume, ``init_from``)."""
    return family_of(config).checkpoint().load_state(directory, config)


__all__ = ["Family", "FAMILIES", "V3", "V4", "family_for_type", "family_of", "has_indexers", "require", "supports",
           "all_field_names", "count_params", "cache_bytes", "family_of_dict",
           "config_from_dict", "config_from_json", "read_config_json", "load_config", "with_fields",
           "build_model", "checkpoint_family", "from_pretrained", "save_pretrained", "load_weights"]
