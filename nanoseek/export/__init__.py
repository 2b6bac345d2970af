"""Export a checkpoint to other tools' file formats (``nanoseek export --format NAME RUN OUT``).

A format is one entry of :data:`FORMATS`: its name, the module that writes it and the file
suffix it conventionally has. The module exposes ``export(checkpoint, out, options) -> dict``
(a short summary the command prints), raising :class:`~nanoseek.errors.UserError` /
:class:`~nanoseek.errors.ConfigError` for anything the target cannot represent, naming the
config key or file, and ``inputs(checkpoint, options) -> list[Path]`` (every file the export
reads). The command line (``cli.py``) resolves the checkpoint, guards the output file (never
one of those inputs, never inside the checkpoint folder) and never branches on the format;
adding a format is one entry here and one module.

Formats:

* ``gguf`` (:mod:`nanoseek.export.gguf_model`, :mod:`nanoseek.export.gguf_vocab`): one GGUF file
  for llama.cpp (and the tools built on it: ollama, LM Studio, llama-cpp-python) in its
  ``deepseek2`` architecture, which runs DeepSeek-V2 and V3 (MLA, DeepSeekMoE with sigmoid or
  softmax routing, expert bias, group-limited routing, leading dense layers, MTP blocks).

Deliberately left out: quantised GGUF types (Q8_0, Q4_K...; llama.cpp's ``llama-quantize``
makes them from the F32/F16/BF16 file this writes) and splitting into shards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    name: str
    module: str        # exposes export(checkpoint, out, options) -> dict and inputs(checkpoint, options) -> list[Path]
    suffix: str        # the file suffix tools expect
    help: str


@dataclass
class ExportOptions:
    """What a format may be asked for; each format reads the fields it needs."""

    dtype: str = "f32"                 # weight type of the matrices: f32, f16 or bf16
    tokenizer: str | None = None       # tokenizer.json (or its folder); default: found next to the checkpoint
    name: str | None = None            # the model's name in the file's metadata; default: the run folder's name
    mtp: bool = False                  # also write the multi-token-prediction blocks
    allow_norm_eps_mismatch: bool = False  # export although the target applies rms_norm_eps where the model does not


FORMATS: dict[str, ExportFormat] = {
    "gguf": ExportFormat("gguf", "nanoseek.export.gguf_model", ".gguf",
                         "llama.cpp / ollama (architecture deepseek2)"),
}

DTYPES = ("f32", "f16", "bf16")

__all__ = ["ExportFormat", "ExportOptions", "FORMATS", "DTYPES"]
