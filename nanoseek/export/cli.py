"""``nanoseek export``: a checkpoint as a file for another tool (``--format gguf``: llama.cpp, ollama).

RUN is a run folder, a stage folder or an HF checkpoint directory (resolved as every command
does: ``final/``, then the checkpoint ``latest`` names, then ``model/`` or ``hf/``). OUT is the
file to write; it is written atomically (a temporary file next to it, swapped in when complete)
and an existing OUT is replaced only with ``--overwrite``; an OUT that is (directly, through a
symbolic or hard link, or via ``..``) a file the export reads, or that lies inside the checkpoint
folder, is refused even with ``--overwrite``. The tokenizer is the checkpoint's (searched next to
it as ``generate`` does) unless ``--tokenizer`` names one.

Examples::

    nanoseek export --format gguf runs/speedrun/grpo model.gguf
    nanoseek export --format gguf --dtype f16 --mtp runs/sft model-f16.gguf --overwrite
    nanoseek export --format gguf --allow-norm-eps-mismatch runs/other model.gguf   # rms_norm_eps != 1e-6
    llama-cli -m model.gguf -p "What is 17 + 25?" -n 32          # llama.cpp
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from nanoseek.errors import UserError
from nanoseek.export import DTYPES, FORMATS, ExportOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder, stage folder or HF-format checkpoint directory")
    p.add_argument("out", metavar="OUT", help="the file to write (e.g. model.gguf)")
    p.add_argument("--format", choices=sorted(FORMATS), default="gguf",
                   help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()) + " (default gguf)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="type of the weight matrices (vectors and the MoE router stay f32; default f32)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json or its folder (default: found next to the checkpoint)")
    p.add_argument("--name", help="the model's name in the file's metadata (default: the checkpoint folder's name)")
    p.add_argument("--mtp", action="store_true",
                   help="also write the multi-token-prediction blocks (llama.cpp loads them for MTP drafting; "
                        "older llama.cpp and ollama builds refuse files that hold them)")
    p.add_argument("--allow-norm-eps-mismatch", action="store_true",
                   help="export a config whose rms_norm_eps is not 1e-6 although llama.cpp then also applies it "
                        "to the q_a/kv_a latent norms (1e-6 in nanoseek and HF), so its logits differ")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def check_output(out: Path, overwrite: bool, suffix: str) -> None:
    """Refuse (one line) an OUT that is a folder, that exists without --overwrite, or whose folder is missing."""
    if out.is_dir() and not out.is_symlink():
        raise UserError(f"{out}: is a folder; give a file name such as {out / ('model' + suffix)}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it, or give another OUT")
    if not out.parent.is_dir():
        raise UserError(f"{out}: the folder {out.parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)           # follows links; equal inodes catch hard links
    except OSError:
        return False


def check_not_an_input(out: Path, checkpoint: Path, inputs: list[Path]) -> None:
    """Refuse (one line) an OUT that is one of the export's ``inputs`` or lies inside the ``checkpoint`` folder,
    whether named directly, through links (symbolic or hard) or with ``..``: replacing it would destroy the
    source the export reads (or leave a stray file in the checkpoint)."""
    written = out.parent.resolve() / out.name      # where os.replace puts the file (a link at OUT is replaced)
    places = {written, out.resolve()}               # ... and what a link at OUT points to
    folder = checkpoint.resolve()
    for place in places:
        if place == folder or place.is_relative_to(folder):
            raise UserError(f"{out}: lies inside the checkpoint folder {checkpoint}, which the export reads; "
                            "write OUT elsewhere")
    for f in inputs:
        if f.resolve() in places or ((out.exists() or out.is_symlink()) and _same_file(out, f)):
            raise UserError(f"{out}: is {f}, which the export reads; write OUT elsewhere")


def run(args: argparse.Namespace) -> int:
    from nanoseek.atomic import atomic_path
    from nanoseek.train.checkpoint import resolve_checkpoint

    fmt = FORMATS[args.format]
    out = Path(args.out)
    check_output(out, args.overwrite, fmt.suffix)
    checkpoint = resolve_checkpoint(args.run)
    options = ExportOptions(dtype=args.dtype, tokenizer=args.tokenizer, name=args.name, mtp=args.mtp,
                            allow_norm_eps_mismatch=args.allow_norm_eps_mismatch)
    module = importlib.import_module(fmt.module)
    check_not_an_input(out, checkpoint, module.inputs(checkpoint, options))
    with atomic_path(out) as tmp:
        summary = module.export(checkpoint, tmp, options)
    for note in summary.pop("notes", []):
        print(f"nanoseek export: note: {note}", file=sys.stderr)
    print(json.dumps({"wrote": str(out), "format": fmt.name, "checkpoint": str(checkpoint), **summary}))
    return 0
