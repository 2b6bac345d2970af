"""``nanoseek ablate``: small matched pre-training runs that test DeepSeek's architectural claims.

  nanoseek data prepare --default-corpus --out runs/ablate-data
  nanoseek ablate --suite moe-vs-dense --budget-minutes 6 --data runs/ablate-data
  nanoseek ablate --suite all --budget-minutes 35 --data runs/ablate-data --markdown docs/ablations.md
  nanoseek ablate --report-only --out runs/ablate --markdown docs/ablations.md
  nanoseek ablate --list

Suites: moe-vs-dense (DeepSeekMoE vs dense at the same activated / total parameters), balance
(aux-loss-free bias balancing vs an auxiliary balance loss at several alphas vs none, with
MaxVio), attention (MLA vs MHA vs GQA at matched parameters, with KV-cache bytes per token), mtp
(with and without multi-token prediction), precision (fp32 vs simulated bf16 vs simulated FP8
GEMMs with DeepSeek-V3's 1x128 / 128x128 scaling), optimizer (Muon vs AdamW, each at three
learning rates).

Every arm of a suite trains the same number of tokens on the same data, in the same order, from
the same seeds; the number of steps is sized from a throughput probe so that all arms x seeds
fit the budget. Each suite writes OUT/SUITE/report.md (claim, verdict, table, plots of validation
loss against tokens, FLOPs and wall-clock), results.json and the run folders. ``--markdown``
also writes one document with every suite found in OUT, plots copied next to it. ``--out`` is
claimed and locked while suites run (``nanoseek.outdir``): a non-empty folder that is not an
ablation's is refused, and so is a second ``nanoseek ablate`` into the same folder.
"""

from __future__ import annotations

import argparse

from nanoseek import limits

SUITE_NAMES = ("moe-vs-dense", "balance", "attention", "mtp", "precision", "optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=None, metavar="NAME",
                        help=f"a suite, a comma-separated list, or 'all' ({', '.join(SUITE_NAMES)})")
    parser.add_argument("--budget-minutes", type=limits.positive_float, metavar="M",
                        help="wall-clock budget; with several suites it is split in proportion to their arms")
    parser.add_argument("--data", default="runs/ablate-data", metavar="DIR",
                        help="prepared data (`nanoseek data prepare --default-corpus --out DIR`); default runs/ablate-data")
    parser.add_argument("--out", default="runs/ablate", metavar="DIR",
                        help="output folder: OUT/SUITE/{report.md,results.json,runs/}; default runs/ablate")
    parser.add_argument("--seeds", default="auto", metavar="N|auto",
                        help="seeds per arm; 'auto' (default): the most, up to 3, leaving --min-steps per run")
    parser.add_argument("--seed", type=limits.seed, default=0,
                        help="first seed (seeds are SEED, SEED+1, ...; default 0)")
    parser.add_argument("--steps", type=limits.positive_int, metavar="N",
                        help="optimizer steps per run, skipping the budget sizing (e.g. a quick smoke test)")
    parser.add_argument("--min-steps", type=limits.positive_int, default=100,
                        help="with --seeds auto, fewest steps per run before trading seeds for steps (default 100)")
    parser.add_argument("--batch-size", type=limits.positive_int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=limits.int_range(2), default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--lr", type=limits.positive_float, default=3e-3,
                        help="peak learning rate; min lr is a tenth (default 3e-3)")
    parser.add_argument("--val-batches", type=limits.positive_int, default=8,
                        help="validation batches per evaluation (default 8)")
    parser.add_argument("--threads", type=limits.threads, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy 2-core machine)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N] (default auto)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write one document with every suite in OUT (e.g. docs/ablations.md)")
    parser.add_argument("--plots-dir", metavar="DIR",
                        help="where --markdown's plots go (default: a folder named like the document, without .md)")
    parser.add_argument("--notes", metavar="FILE",
                        help="markdown inserted after --markdown's introduction (a discussion of the results)")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: rebuild the reports of finished suites in OUT (and --markdown)")
    parser.add_argument("--list", action="store_true", help="list the suites, their claims and arms, then exit")


def _suites(arg: str | None) -> list[str]:
    from nanoseek.errors import UserError
    if arg is None:
        raise UserError("give --suite NAME (or 'all'); --list shows the suites")
    names = list(SUITE_NAMES) if arg == "all" else [s.strip() for s in arg.split(",") if s.strip()]
    bad = [n for n in names if n not in SUITE_NAMES]
    if bad:
        raise UserError(f"unknown suite {bad[0]!r}; suites: {', '.join(SUITE_NAMES)} or 'all'")
    return names


def _vocab_size(data_dir: str) -> int:
    import json
    from pathlib import Path

    from nanoseek.errors import UserError
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{data_dir}: no prepared data (no manifest.json); prepare it first with "
                        f"`nanoseek data prepare --default-corpus --out {data_dir}`")
    try:
        return int(json.loads(manifest.read_text())["tokenizer"]["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest}: cannot read tokenizer.vocab_size ({e})") from None


def _command(args: argparse.Namespace, suite: str, budget: float | None) -> str:
    parts = ["nanoseek ablate", f"--suite {suite}"]
    if args.steps:
        parts.append(f"--steps {args.steps}")
    else:
        parts.append(f"--budget-minutes {budget:g}")
    parts += [f"--data {args.data}", f"--out {args.out}"]
    defaults = {"seeds": "auto", "seed": 0, "min_steps": 100, "batch_size": 8, "seq_len": 128, "lr": 3e-3,
                "val_batches": 8, "device": "auto"}
    for key, default in defaults.items():
        if getattr(args, key) != default:
            parts.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts)


def _list() -> int:
    from .suites import build_suite
    for name in SUITE_NAMES:
        s = build_suite(name, vocab_size=2048)
        print(f"{name}: {s.title}\n  claim: {s.claim}")
        for a in s.arms:
            print(f"  - {a.name}: {a.label} ({a.note})")
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.errors import UserError
    from nanoseek.outdir import claim

    if args.list:
        return _list()
    out = Path(args.out)
    if args.report_only and not any(out.glob("*/results.json")):
        raise UserError(f"{out}: no finished suite (no SUITE/results.json); run a suite first")

    from nanoseek.ablate.runner import is_suite_dir

    with claim(out, "ablate", flag="--out", own=lambda p: any(is_suite_dir(d) for d in p.iterdir() if d.is_dir())):
        return _main(args, out)


def _main(args: argparse.Namespace, out) -> int:
    import time
    from pathlib import Path

    from nanoseek.errors import UserError
    from nanoseek.errors import ConfigError

    from .report import write_combined_markdown
    from .results import ReportError
    from .suites import base_model, build_suite, describe_base

    try:
        if args.report_only:
            names = _suites(args.suite) if args.suite else [n for n in SUITE_NAMES if (out / n / "results.json").is_file()]
            if not names:
                raise UserError(f"{out}: no finished suite (no SUITE/results.json); run a suite first")
            _rebuild(args, names, out)
        else:
            names = _suites(args.suite)
            if args.budget_minutes is None and args.steps is None:
                raise UserError("give --budget-minutes M (or --steps N)")
            if args.budget_minutes is not None and args.budget_minutes <= 0:
                raise UserError(f"--budget-minutes must be positive, got {args.budget_minutes}")
            vocab = _vocab_size(args.data)
            if args.threads:
                import torch
                torch.set_num_threads(args.threads)
            suites = [build_suite(n, vocab) for n in names]
            n_arms = sum(len(s.arms) for s in suites)
            t_all = time.perf_counter()
            for k, suite in enumerate(suites):
                budget = None
                if args.budget_minutes is not None:
                    left = args.budget_minutes - (time.perf_counter() - t_all) / 60
                    budget = left * len(suite.arms) / sum(len(s.arms) for s in suites[k:])
                _run_one(args, suite, budget, out / suite.name)
            if len(suites) > 1:
                print(f"{len(suites)} suites, {n_arms} arms in {(time.perf_counter() - t_all) / 60:.1f} min")
        if args.markdown:
            dirs = [out / n for n in SUITE_NAMES if (out / n / "results.json").is_file()]
            md = Path(args.markdown)
            plots = Path(args.plots_dir) if args.plots_dir else md.with_suffix("")
            vocab = _vocab_size(args.data) if (Path(args.data) / "manifest.json").is_file() else None
            notes = ""
            if args.notes:
                try:
                    notes = Path(args.notes).read_text(encoding="utf-8")
                except OSError as e:
                    raise UserError(f"--notes {args.notes}: {e.strerror}") from None
            report_cmd = (f"nanoseek ablate --report-only --out {args.out} --data {args.data} --markdown {md}"
                          + (f" --plots-dir {args.plots_dir}" if args.plots_dir else "")
                          + (f" --notes {args.notes}" if args.notes else ""))
            write_combined_markdown(dirs, md, plots, describe_base(base_model(vocab or 2048)), notes, report_cmd)
            print(f"wrote {md} ({len(dirs)} suites; plots in {plots})")
    except (ConfigError, ReportError) as e:
        raise UserError(str(e)) from None
    return 0


def _run_one(args: argparse.Namespace, suite, budget: float | None, suite_dir) -> None:
    import time

    from .runner import make_plan, run_and_report

    started = time.perf_counter()
    print(f"== {suite.name}: {suite.title} ({len(suite.arms)} arms)"
          + (f", budget {budget:.1f} min" if budget is not None else ""))
    plan = make_plan(suite, args.data, budget, seeds=args.seeds, seed_base=args.seed, steps=args.steps,
                     min_steps=args.min_steps, micro_batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     val_batches=args.val_batches, device=args.device, command=_command(args, suite.name, budget))
    print(f"   {len(plan.seeds)} seed(s) x {len(suite.arms)} arms, {plan.steps} steps = {plan.tokens_per_run:,} "
          f"tokens per run")
    data = run_and_report(suite, plan, suite_dir, started=started)
    print(f"   {data['verdict']['status']}: {data['verdict']['summary']}")
    print(f"   wrote {suite_dir}/report.md in {(time.perf_counter() - started) / 60:.1f} min")


def _rebuild(args: argparse.Namespace, names: list[str], out) -> None:
    """Re-collect finished suites' runs and rewrite their reports (no training)."""
    import json

    from .report import write_suite_report
    from .suites import build_suite

    for name in names:
        d = out / name
        try:
            plan = json.loads((d / "plan.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            from nanoseek.errors import UserError
            raise UserError(f"{d}/plan.json: cannot read the suite's plan ({e})") from None
        from .runner import is_suite_dir

        if not is_suite_dir(d):
            from nanoseek.errors import UserError
            raise UserError(f"{d}/plan.json: not a nanoseek suite plan (needs suite, data_dir, seeds, steps)")
        suite = build_suite(name, _vocab_size(plan["data_dir"]))
        data = write_suite_report(suite, d, plan)
        print(f"{name}: {data['verdict']['status']}; rewrote {d}/report.md")
