"""Command-line plumbing shared by ``nanoseek sft|dpo|grpo|distill`` (standard library only at import).

Every post-training command takes a TOML config (a path or a shipped recipe name), ``--set
table.key=value`` overrides, and a few shortcuts for the common keys (``--model`` is
``model.init_from``, ``--out`` is ``train.out_dir``, ``--steps`` is ``train.max_steps``, ``--data``
the stage's data key). ``--print-config`` shows the resolved config (a recipe's: every stage's,
in order) and exits. A config with
``[stages.*]`` tables is a multi-stage recipe (``r1``) and runs stage after stage. A kind's
config and train function come from the registry (:mod:`nanoseek.post.registry`). The ``--out``
folder is claimed and locked for the whole command (:mod:`nanoseek.outdir`): another command's
folder, a second writer, or a fresh run over a finished one is refused with one line.
"""

from __future__ import annotations

import argparse

from nanoseek import limits
from nanoseek.train.config import toml_string


def add_stage_arguments(parser: argparse.ArgumentParser, kind: str, default_config: str, data_key: str | None,
                        data_help: str) -> None:
    parser.add_argument("--config", default=default_config,
                        help=f"TOML config: a path or a shipped recipe name (default: {default_config}); "
                             "one with [stages.*] tables runs a multi-stage recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help=f"override a config key, e.g. --set {kind}.seed=1 or --set optim.lr=1e-5 (repeatable)")
    parser.add_argument("--model", metavar="PATH", help="checkpoint or run folder to start from (model.init_from)")
    if data_key:
        parser.add_argument("--data", metavar="SOURCE", help=f"{data_help} ({data_key})")
    parser.add_argument("--out", metavar="DIR", help="run folder (train.out_dir)")
    parser.add_argument("--steps", type=limits.positive_int, metavar="N", help="optimizer steps (train.max_steps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (recipes: skip finished stages)")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="continue the run in --out from this checkpoint (RUN/checkpoints/step-N) instead of "
                             "the latest, e.g. the older intact one a checkpoint error names")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _overrides(args, kind: str, data_key: str | None, recipe: bool) -> list[str]:
    out = list(args.overrides)
    if recipe:
        for flag, key in (("model", "recipe.init_from"), ("out", "recipe.out_dir")):
            if getattr(args, flag, None):
                out.append(f"{key}={toml_string(getattr(args, flag))}")
        if args.steps or getattr(args, "data", None):
            from nanoseek.errors import UserError

            raise UserError("--steps/--data do not apply to a multi-stage recipe; use --set stages.NAME.train.max_steps=N")
        return out
    if args.model:
        out.append(f"model.init_from={toml_string(args.model)}")
    if data_key and getattr(args, "data", None):
        out.append(f"{data_key}={toml_string(args.data)}")
    if args.out:
        out.append(f"train.out_dir={toml_string(args.out)}")
    if args.steps:
        out.append(f"train.max_steps={args.steps}")
    return out




def run_stage_command(args, kind: str, data_key: str | None) -> int:
    """Load the config, then run one stage or a recipe; config and data errors become UserError."""
    from nanoseek.errors import UserError
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import read_toml, resolve_config_path

    try:
        path = resolve_config_path(args.config)
        recipe = "stages" in read_toml(path)
        overrides = _overrides(args, kind, data_key, recipe)
        if recipe:
            from .recipe import load_recipe, recipe_to_toml, run_recipe

            if args.print_config:      # every stage resolved, also before the base model is trained
                print(recipe_to_toml(load_recipe(path, overrides, validate=False)), end="")
                return 0
            rec = load_recipe(path, overrides)
            if getattr(args, "resume_from", None):
                raise UserError("--resume-from applies to one stage; a recipe resumes with --resume")
            from nanoseek.outdir import claim

            from .registry import is_any_stage_run

            with claim(rec.out_dir, "recipe", flag="--out",
                       own=lambda p: any(is_any_stage_run(d) for d in p.iterdir() if d.is_dir())):
                results = run_recipe(rec, resume=args.resume, quiet=args.quiet)
            for r in results:
                print(f"{r.kind:8s} {r.status:10s} steps {r.steps:5d}  -> {r.final_dir}")
            return 0 if results and results[-1].status == "done" and len(results) == len(rec.stages) else 1
        from .registry import load_stage_config

        cfg = load_stage_config(path, kind, overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    from pathlib import Path

    from nanoseek.outdir import claim

    from .registry import STAGE_KINDS
    from .stage import is_stage_run

    runner = STAGE_KINDS[kind].train
    try:
        # claimed here too, so a stage that writes before training (distill's traces) writes into its own folder
        with claim(Path(cfg.train.out_dir or f"runs/{kind}"), cfg.kind, flag="--out",
                   own=lambda p: is_stage_run(p, cfg.kind)):
            result = runner(cfg, resume=_resume(args), quiet=args.quiet)
    except (ConfigError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    print(f"{kind}: {result.status} after {result.steps} steps; final checkpoint: {result.final_dir}")
    return 0 if result.status in ("done", "data_exhausted") else 1


def _resume(args):
    """``--resume-from CHECKPOINT`` (a Path the trainer restores), else the ``--resume`` flag."""
    from pathlib import Path

    from nanoseek.errors import UserError

    if not getattr(args, "resume_from", None):
        return args.resume
    if not Path(args.resume_from).is_dir():
        raise UserError(f"--resume-from {args.resume_from}: no such checkpoint directory")
    return Path(args.resume_from)


__all__ = ["add_stage_arguments", "run_stage_command"]
