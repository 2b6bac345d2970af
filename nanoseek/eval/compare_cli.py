"""``nanoseek compare A B``: two evaluations side by side, with the paired difference per task.

``A`` and ``B`` are ``eval.json`` files, folders holding one (a stage folder), or run folders
(the last stage with an ``eval.json``; ``RUN:STAGE`` picks a stage, e.g. ``runs/x:sft``).
When both evaluated the same problems (same tasks, seed and levels give the same problem ids)
the table shows B - A with the 95% interval of the per-problem pass@1 differences
(``stats.paired_difference``): "B better" means the whole interval is above zero. Settings
that differ between the two (mode, k, temperature, ...) are listed first, since they make the
comparison unfair. ``--json`` prints the comparison as JSON instead.

Examples::

    nanoseek compare runs/speedrun/sft runs/speedrun/grpo
    nanoseek compare baseline/eval.json runs/new:grpo
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="RUN_A", help="eval.json, a folder with one, or a run folder (RUN:STAGE for a stage)")
    p.add_argument("b", metavar="RUN_B", help="the same for the second evaluation")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def resolve_eval(spec: str) -> Path:
    """The eval.json a command-line argument names (see the module docstring)."""
    from nanoseek.errors import UserError

    from .runs import EVAL_JSON, RunError, find_stages

    stage_name = None
    path = Path(spec)
    if not path.exists() and ":" in spec:
        base, stage_name = spec.rsplit(":", 1)
        path = Path(base)
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder")
    if path.is_file():
        return path
    if stage_name is None and (path / EVAL_JSON).is_file():
        return path / EVAL_JSON
    try:
        stages = find_stages(path)
    except RunError as e:
        raise UserError(str(e)) from None
    if stage_name is not None:
        match = [s for s in stages if s.name == stage_name]
        if not match:
            raise UserError(f"{spec}: no stage {stage_name!r} in {path} (stages: "
                            f"{', '.join(s.name for s in stages) or 'none'})")
        if not match[0].eval_path.is_file():
            raise UserError(f"{spec}: {match[0].eval_path} does not exist; run `nanoseek eval --model "
                            f"{match[0].dir}` first")
        return match[0].eval_path
    evaluated = [s for s in stages if s.eval_path.is_file()]
    if not evaluated:
        raise UserError(f"{spec}: no eval.json in it or in its stages; run `nanoseek eval --model {path}` first")
    return evaluated[-1].eval_path


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from nanoseek.errors import UserError

    from .results import EvalFileError, EvalResult, config_differences, paired_comparison
    from .tables import comparison_table

    pa, pb = resolve_eval(args.a), resolve_eval(args.b)
    try:
        a, b = EvalResult.load(pa), EvalResult.load(pb)
    except EvalFileError as e:
        raise UserError(str(e)) from None
    comps = paired_comparison(a, b)
    diffs = config_differences(a, b)
    if args.json:
        print(json.dumps({"a": str(pa), "b": str(pb), "config_differences": diffs,
                          "tasks": [c.to_dict() for c in comps]}, indent=1))
        return 0
    console = Console()
    for d in diffs:
        console.print(f"[yellow]settings differ[/] {d}")
    console.print(comparison_table(comps, str(pa), str(pb)))
    return 0
