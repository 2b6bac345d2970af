"""Pre-train a DeepSeek-V3 model from a TOML recipe.

  nanoseek pretrain --config tiny                         # a shipped recipe (nanoseek/configs/train/)
  nanoseek pretrain --config configs/mine.toml --set optim.lr=1e-3 --set train.max_steps=500
  nanoseek pretrain --out-dir runs/mine --resume          # continue a killed or finished run
  nanoseek pretrain --out-dir runs/mine --resume-from runs/mine/checkpoints/step-000080   # an older one

The run folder (``[train] out_dir``, default runs/<recipe name>) gets config.toml (the resolved
recipe), metrics.jsonl (every step and event), checkpoints/step-NNNNNN/ (the last keep_last),
latest (the newest checkpoint) and final/ (the trained model in HF format, with the tokenizer).
Ctrl-C or SIGTERM saves a checkpoint before exiting (exit status 130); --resume continues with
the same per-step losses as an uninterrupted run. The run folder is locked while the run lives;
a non-empty folder that is not a pretrain run, a second run into a live one, and a fresh run into
one with checkpoints (the error names the settings that differ) are refused (``nanoseek.outdir``).
Set NANOSEEK_NO_PROGRESS=1 for plain log lines instead of the progress bar.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="TOML recipe: a path, or a shipped name (tiny, bench-moe, v4-tiny); with --resume "
                             "the run folder's config.toml is used when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=1e-3 (repeatable; values are TOML "
                             "literals, bare words are strings, null unsets)")
    parser.add_argument("--out-dir", metavar="DIR", help="the run folder (same as --set train.out_dir=DIR)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run folder from its latest checkpoint")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="continue the run from this checkpoint (RUN/checkpoints/step-N) instead of the latest, "
                             "e.g. the older intact one a checkpoint error names")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError
    from nanoseek.errors import ConfigError

    from .checkpoint import CheckpointError
    from .config import load_config, toml_string
    from .loop import TrainingDiverged
    from .pretrain import pretrain

    resume = Path(args.resume_from) if args.resume_from else args.resume
    if args.resume_from and not Path(args.resume_from).is_dir():
        raise UserError(f"--resume-from {args.resume_from}: no such checkpoint directory")
    overrides = list(args.overrides)
    if args.out_dir is not None and not args.out_dir.strip():
        raise UserError("--out-dir: an empty path; name the run folder")
    if args.out_dir:
        overrides.append(f"train.out_dir={toml_string(args.out_dir)}")   # the folder named, literally
    config = args.config
    if config is None:
        if not (resume and args.out_dir):
            raise UserError("--config is required (or --resume with --out-dir of a run that has a config.toml)")
        config = Path(args.out_dir) / "config.toml"
        if not config.exists():
            raise UserError(f"{config}: no such file; pass --config")
    try:
        cfg = load_config(config, overrides)
        result = pretrain(cfg, resume=resume, progress=False if args.no_progress else None, quiet=args.quiet)
    except (ConfigError, CheckpointError) as e:
        raise UserError(str(e)) from None
    except TrainingDiverged as e:               # one line: the good checkpoint and the command to resume
        how = (f"; run: nanoseek pretrain --out-dir {e.run_dir} --resume --set optim.lr={e.lr:.3g} "
               f"--set optim.min_lr={e.min_lr:.3g}" if e.checkpoint is not None and e.lr is not None else "")
        print(f"nanoseek pretrain: training diverged: {e}{how}")
        return 3
    ev = result.last_eval
    val = "".join(f"  {k} {ev[k]:.4f}" for k in ("val_loss", "val_bpb") if k in ev)
    print(f"{result.status}: step {result.step}, {result.tokens:,} tokens{val}; run folder {result.run_dir}")
    if result.final_dir:
        print(f"final model: {result.final_dir}")
    elif result.checkpoint:
        print(f"checkpoint: {result.checkpoint} (continue with --resume)")
    return 130 if result.status == "interrupted" else 0
