"""``nanoseek ablate``: small matched pre-training runs that test DeepSeek's architectural claims.

  nanoseek data prepare --default-corpus --out runs/ablate-data
  nanoseek ablate --suite moe-vs-dense --budget-minutes 6 --data runs/ablate-data
  nanoseek ablate --suite all --budget-minutes 35 --data runs/ablate-data --markdown docs/ablations.md
  nanoseek ablate --report-only --out runs/ablate --markdown docs/ablations.md
  nanoseek ablate --suite rl --model runs/speedrun/sft/final --steps 400 --seeds 3 --out runs/ablate
  nanoseek ablate --list

Suites: moe-vs-dense (DeepSeekMoE vs dense at the same activated / total parameters), balance
(aux-loss-free bias balancing vs an auxiliary balance loss at several alphas vs none, with
MaxVio), attention (MLA vs MHA vs GQA at matched parameters, with KV-cache bytes per token), mtp
(with and without multi-token prediction), precision (fp32 vs simulated bf16 vs simulated FP8
GEMMs with DeepSeek-V3's 1x128 / 128x128 scaling), optimizer (Muon vs AdamW, each at three
learning rates); and rl (GRPO vs DAPO vs Dr. GRPO vs GSPO vs CISPO, ``nanoseek grpo`` runs from one
SFT checkpoint, ``--model``, judged on held-out pass@1 paired per problem: :mod:`.rl`).

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

SUITE_NAMES = ("moe-vs-dense", "balance", "attention", "mtp", "precision", "optimizer")   # pre-training ('all')
RL = "rl"                       # post-training: runs alone, from --model (nanoseek.ablate.rl)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=None, metavar="NAME",
                        help=f"a suite, a comma-separated list, or 'all' ({', '.join(SUITE_NAMES)}); or {RL} "
                             "(RL algorithms from --model, run alone)")
    parser.add_argument("--budget-minutes", type=limits.positive_float, metavar="M",
                        help="wall-clock budget; with several suites it is split in proportion to their arms")
    parser.add_argument("--data", default="runs/ablate-data", metavar="DIR",
                        help="prepared data (`nanoseek data prepare --default-corpus --out DIR`); default runs/ablate-data")
    parser.add_argument("--out", default="runs/ablate", metavar="DIR",
                        help="output folder: OUT/SUITE/{report.md,results.json,runs/}; default runs/ablate")
    parser.add_argument("--seeds", default="auto", metavar="N|auto",
                        help="seeds per arm; 'auto' (default): the most, up to 3, leaving --min-steps per run "
                             "(--suite rl: 1)")
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
    parser.add_argument("--device", default="auto", type=limits.device, help="auto (cuda if present), cpu, cuda[:N] (default auto)")
    parser.add_argument("--jobs", type=limits.positive_int, default=1, metavar="N",
                        help="train N runs at once in worker processes, across all the suites given (needs "
                             "--steps; --suite rl trains and evaluates each run in its worker; the results do not "
                             "depend on N, wall-clock figures do; default 1)")
    parser.add_argument("--downstream-n", type=limits.nonneg_int, metavar="N",
                        help="held-out problems per task in the downstream evaluation of a suite that has one (mtp: "
                             "every run's final model on the corpus tasks; default 100; 0 skips it)")
    rl = parser.add_argument_group("the rl suite (--suite rl)")
    rl.add_argument("--model", metavar="SFT_CHECKPOINT_OR_RUN",
                    help="the SFT checkpoint (or run folder) every arm starts from")
    rl.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                    help="a GRPO config key for every arm, on top of the suite's common settings, e.g. "
                         "--set grpo.prompts=countdown or --set train.bias_update_gamma=0 (repeatable)")
    rl.add_argument("--arms", metavar="A,B",
                    help="the arms to run (default all: grpo,dapo,dr_grpo,gspo,cispo; grpo is the baseline)")
    rl.add_argument("--eval-tasks", metavar="TASKS",
                    help="held-out tasks, as nanoseek eval --tasks (default: the tasks the arms train on, at their level)")
    rl.add_argument("--eval-n", type=limits.positive_int, metavar="N",
                    help="held-out problems per task (default: nanoseek eval's --n)")
    rl.add_argument("--eval-k", type=limits.positive_int, metavar="K",
                    help="samples per problem for pass@1 (default: nanoseek eval's --k)")
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
    bad = [n for n in names if n not in SUITE_NAMES + (RL,)]
    if bad:
        raise UserError(f"unknown suite {bad[0]!r}; suites: {', '.join(SUITE_NAMES + (RL,))} or 'all'")
    if RL in names and len(names) > 1:
        raise UserError(f"--suite {RL} runs alone (it starts from --model, not from --data)")
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
    if args.downstream_n is not None:
        parts.append(f"--downstream-n {args.downstream_n}")
    return " ".join(parts)


def _list() -> int:
    from .rl import ARMS
    from .rl_report import CLAIM, TITLE
    from .suites import build_suite
    for name in SUITE_NAMES:
        s = build_suite(name, vocab_size=2048)
        print(f"{name}: {s.title}\n  claim: {s.claim}")
        for a in s.arms:
            print(f"  - {a.name}: {a.label} ({a.note})")
    print(f"{RL}: {TITLE}\n  claim: {CLAIM}")
    for a in ARMS:
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
            names = _suites(args.suite) if args.suite else [n for n in SUITE_NAMES + (RL,)
                                                            if (out / n / "results.json").is_file()]
            if not names:
                raise UserError(f"{out}: no finished suite (no SUITE/results.json); run a suite first")
            _rebuild(args, names, out)
        else:
            names = _suites(args.suite)
            if names == [RL]:
                _run_rl(args, out / RL)
                names = []
            elif args.model or args.overrides or args.arms or args.eval_tasks or args.eval_n or args.eval_k:
                raise UserError(f"--model, --set, --arms and --eval-* apply to --suite {RL} only")
        if not args.report_only and names:
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
            if args.jobs > 1:
                _run_parallel(args, suites, out)
                suites = []
            for k, suite in enumerate(suites):
                budget = None
                if args.budget_minutes is not None:
                    left = args.budget_minutes - (time.perf_counter() - t_all) / 60
                    budget = left * len(suite.arms) / sum(len(s.arms) for s in suites[k:])
                _run_one(args, suite, budget, out / suite.name)
            if len(names) > 1:
                print(f"{len(names)} suites, {n_arms} arms in {(time.perf_counter() - t_all) / 60:.1f} min")
        if args.markdown:
            dirs = [out / n for n in SUITE_NAMES + (RL,) if (out / n / "results.json").is_file()]
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
            from .rl_report import any_suite_markdown
            write_combined_markdown(dirs, md, plots, describe_base(base_model(vocab or 2048)), notes, report_cmd,
                                    section=any_suite_markdown)
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
                     val_batches=args.val_batches, device=args.device, command=_command(args, suite.name, budget),
                     downstream_problems=args.downstream_n)
    print(f"   {len(plan.seeds)} seed(s) x {len(suite.arms)} arms, {plan.steps} steps = {plan.tokens_per_run:,} "
          f"tokens per run")
    data = run_and_report(suite, plan, suite_dir, started=started)
    print(f"   {data['verdict']['status']}: {data['verdict']['summary']}")
    print(f"   wrote {suite_dir}/report.md in {(time.perf_counter() - started) / 60:.1f} min")


def _run_parallel(args: argparse.Namespace, suites: list, out) -> None:
    """``--jobs N``: plan every suite at ``--steps``, train all their runs in N worker processes, report each."""
    import time

    from nanoseek.errors import UserError

    from .parallel import run_suites
    from .report import write_suite_report
    from .runner import make_plan

    if args.steps is None:
        raise UserError("--jobs needs --steps N: --budget-minutes sizes the runs by timing them one at a time, "
                        "which does not predict runs sharing the machine")
    started = time.perf_counter()
    entries = []
    for suite in suites:
        plan = make_plan(suite, args.data, None, seeds=args.seeds, seed_base=args.seed, steps=args.steps,
                         min_steps=args.min_steps, micro_batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, val_batches=args.val_batches, device=args.device,
                         command=_command(args, suite.name, None), downstream_problems=args.downstream_n)
        print(f"== {suite.name}: {len(plan.seeds)} seed(s) x {len(suite.arms)} arms, {plan.steps} steps = "
              f"{plan.tokens_per_run:,} tokens per run")
        entries.append((suite, plan, out / suite.name))
    run_suites(entries, args.jobs, threads=args.threads)
    for suite, plan, suite_dir in entries:
        data = write_suite_report(suite, suite_dir, plan.to_dict())
        print(f"   {suite.name}: {data['verdict']['status']}: {data['verdict']['summary']}")
    print(f"   wrote {len(entries)} reports in {(time.perf_counter() - started) / 60:.1f} min")


def _rl_command(args: argparse.Namespace) -> str:
    import shlex

    parts = ["nanoseek ablate", f"--suite {RL}", f"--model {shlex.quote(args.model)}", f"--steps {args.steps}",
             f"--out {shlex.quote(args.out)}"]
    if args.seeds != "auto":
        parts.append(f"--seeds {args.seeds}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    for flag in ("arms", "eval_tasks", "eval_n", "eval_k", "threads"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')} {shlex.quote(str(getattr(args, flag)))}")
    if args.jobs > 1:
        parts.append(f"--jobs {args.jobs}")
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    parts += [f"--set {shlex.quote(o)}" for o in args.overrides]      # a command a shell runs as it ran
    return " ".join(parts)


def _run_rl(args: argparse.Namespace, suite_dir) -> None:
    """``--suite rl``: plan (every arm's config checked), train and evaluate, report."""
    import time

    from nanoseek.errors import UserError

    from .rl import make_plan, run_suite
    from .rl_report import write_rl_report

    if not args.model:
        raise UserError(f"--suite {RL} needs --model SFT_CHECKPOINT_OR_RUN (the checkpoint every arm starts from)")
    if args.budget_minutes is not None:
        raise UserError(f"--budget-minutes does not apply to --suite {RL} (rollout times change as the policy "
                        "trains, so a probe cannot size the runs); give --steps N")
    if args.steps is None:
        raise UserError(f"--suite {RL} needs --steps N (optimizer steps per run, the same for every arm)")
    if args.downstream_n is not None:
        raise UserError(f"--downstream-n applies to the pre-training suites; --suite {RL} evaluates every run "
                        "(--eval-n sets its problems)")
    try:
        seeds = 1 if args.seeds == "auto" else int(args.seeds)
    except ValueError:
        raise UserError(f"--seeds must be 'auto' or a number, got {args.seeds!r}") from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    ev = {k: v for k, v in (("tasks", args.eval_tasks), ("n_problems", args.eval_n), ("k", args.eval_k)) if v}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    started = time.perf_counter()
    plan = make_plan(args.model, args.steps, seeds, args.seed, args.overrides, ev, arms, args.device,
                     command=_rl_command(args))
    print(f"== {RL}: {len(plan.seeds)} seed(s) x {len(plan.arms)} arms ({', '.join(plan.arms)}), {plan.steps} steps "
          f"per run from {plan.model}")
    run_suite(plan, suite_dir, jobs=args.jobs, threads=args.threads)
    data = write_rl_report(plan, suite_dir)
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
        if name == RL:
            from .rl import RLPlan
            from .rl_report import write_rl_report
            data = write_rl_report(RLPlan.from_dict(plan), d)
            print(f"{name}: {data['verdict']['status']}; rewrote {d}/report.md")
            continue
        suite = build_suite(name, _vocab_size(plan["data_dir"]))
        data = write_suite_report(suite, d, plan)
        print(f"{name}: {data['verdict']['status']}; rewrote {d}/report.md")
