"""What every model family's config class shares: reading config.json, typed fields, the checks
whose wording must be the same for every family, and the shipped presets.

The config classes (:class:`nanoseek.model.config.ModelConfig` for DeepSeek-V2/V3/V3.2,
:class:`nanoseek.model.v4.config.DeepseekV4Config`) are HF ``config.json`` files as typed
dataclasses; each derives from :class:`HFConfigFile` for ``from_json`` / ``to_json`` and calls the
checks here from its own ``from_dict`` / ``validate``. Everything here is pure Python: reading a
config never imports torch (:mod:`nanoseek.model.registry` relies on it). Every error is one
:class:`~nanoseek.errors.ConfigError` line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
SIZE_MAX = 2**31 - 1            # any size field: vocab, widths, context (int32 indexing)

_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "int | list": lambda v: isinstance(v, (int, list)) and not isinstance(v, bool),
}


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a missing, unreadable, non-UTF-8 or invalid file is one ConfigError line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at byte offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def config_file(path: str | Path) -> Path:
    """A config.json path, or a directory holding one -> the config.json path."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def check_type(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """``value`` for the dataclass field ``f`` (from its annotation): an int where a float is asked
    is coerced to float; null only where the field takes None; any other wrong type is refused."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{source}: field '{key}' must not be null")
    base = t.replace(" | None", "").strip()
    ok = _TYPE_CHECKS.get(base)
    if ok is not None and not ok(value):
        raise ConfigError(f"{source}: field '{key}' must be {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value


def field_error(cfg: Any, name: str, why: str) -> ConfigError:
    """The one-line error for a bad value of field ``name``."""
    return ConfigError(f"config field '{name}' = {getattr(cfg, name)!r}: {why}")


def check_int_ranges(cfg: Any, count_max: dict[str, int], size_max: int = SIZE_MAX) -> None:
    """Every integer field is a size, a count or an id: in [0, count_max[name]] (counts the model
    builds one module or loop step per) or [0, size_max]."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        top = count_max.get(f.name, size_max)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= top:
            raise field_error(cfg, f.name, f"must be in [0, {top:,}]")


def check_token_ids(cfg: Any) -> None:
    """``bos_token_id``, ``pad_token_id`` and ``eos_token_id`` (one id or a list) are ids of the vocabulary or null."""
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        if v is not None and not 0 <= v < cfg.vocab_size:
            raise field_error(cfg, name, f"must be a token id in [0, vocab_size={cfg.vocab_size})")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < cfg.vocab_size)
           for v in eos):
        raise field_error(cfg, "eos_token_id", f"must be token id(s) in [0, vocab_size={cfg.vocab_size})")


class HFConfigFile:
    """``from_json`` / ``to_json`` for a config dataclass with ``from_dict(d, source)`` and ``to_dict()``."""

    @classmethod
    def from_json(cls, path: str | Path):
        """Read a config.json (or a checkpoint directory's); errors name the file."""
        path = config_file(path)
        return cls.from_dict(read_json(path), source=str(path))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """The shipped model presets (``nanoseek/configs/models/NAME.json``), every family's."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_or_path(name_or_path: str | Path) -> Path:
    """An existing config.json / checkpoint directory, else the preset of that name; else one
    ConfigError line listing the presets."""
    p = Path(name_or_path)
    if p.exists():
        return p
    preset = PRESET_DIR / f"{name_or_path}.json"
    if preset.exists():
        return preset
    raise ConfigError(f"unknown model config '{name_or_path}': not a file or directory, and not a "
                      f"preset (presets: {', '.join(list_presets())})")


__all__ = ["PRESET_DIR", "SIZE_MAX", "read_json", "config_file", "check_type", "field_error", "check_int_ranges",
           "check_token_ids", "HFConfigFile", "list_presets", "preset_or_path"]
