"""``nanoseek eval``: held-out task accuracy (pass@1 with 95% intervals, pass@k, maj@k) of a checkpoint.

``--model`` is an HF checkpoint directory, a training run folder, or a speedrun folder with
stages (``RUN/pretrain``, ``RUN/sft``, ``RUN/grpo``): then every stage with a checkpoint is
evaluated on the SAME problems, each in its own prompt mode, and consecutive stages are
compared with the paired 95% interval of their per-problem differences.

Prompt modes: ``fewshot`` (base models: worked train examples, then the question), ``chat``
(the chat template; R1 format scored separately from accuracy), ``chat-think`` (``<think>``
pre-filled), ``r1-zero`` (R1-Zero's plain template), ``auto``: what the stage was trained for:
run.json's ``eval_mode``, else the ``eval_mode`` the stage's ``stage.json`` records (older folders:
its kind / ``config.toml``: sft, dpo, distill -> chat; grpo -> its template; pre-training ->
fewshot), else the folder name.

Tasks (``--tasks``, resolved by :mod:`nanoseek.tasks.sources`) mix four kinds in one list:
built-in tasks with optional levels (``arithmetic:1-2``), reasoning-gym datasets with an optional
config (``rg:NAME``, ``rg:NAME(key=value, ...)``, scored by reasoning-gym's ``score_answer``),
HumanEval (``humaneval``: the first ``--n`` problems; ``humaneval:A-B``: problems A to B; code run
in the sandbox, pass@k) and a built-in task's held-out problems in other wordings
(``reword:GROUP:TASK[:LEVELS]``, GROUP original, seen or unseen: :mod:`nanoseek.tasks.phrasing`).

Each evaluation is written to ``eval.json`` (default: in the stage folder, or ``--out``) with
the config, the metrics, every problem's scores and a few full responses. A stage folder's
``eval.json`` made with other settings (the run report's record of the stage) is kept: the new
evaluation goes to ``eval-2.json`` (the next free name) with a note naming what differs, unless
``--overwrite`` (re-running the same evaluation replaces its file). ``--data DIR`` adds
bits per byte on the validation split of a prepared data directory.

Examples::

    nanoseek eval --model runs/speedrun --tasks arithmetic,countdown --n 200 --k 4
    nanoseek eval --model runs/speedrun/sft/final --mode chat --temperature 0 --out sft-greedy.json
    nanoseek eval --model runs/speedrun --tasks "arithmetic:1-2,rg:chain_sum(min_terms=2, max_terms=2)"
    nanoseek eval --model runs/speedrun --tasks humaneval --k 10 --max-new-tokens 512
    nanoseek eval --model runs/speedrun --tasks big_arithmetic --tools calculator --mode chat

``--tools calculator[,python]`` evaluates with the tool loop (chat modes): the problems of the tasks
that get tools (``--tool-tasks``; default every built-in task with a tool call) describe the tools
(``--describe-tools names``: name them; ``none``: neither, built-in tools) and run the calls their samples make; each problem records its tool calls and failed calls. The
same problems are also evaluated without tools, and the table shows pass@1 with and without tools,
their paired difference and the calls per task. The result goes to ``tools.json`` in the stage
folder (the run report's "Tool use" section), not ``eval.json``.
"""

from __future__ import annotations

import argparse
import dataclasses

from nanoseek import limits
from pathlib import Path

# flag dest -> the EvalConfig field it sets. The flags default to None (not given) and fall back to
# EvalConfig's defaults, their one home; the help text quotes them from there.
SETTINGS = {"n": "n_problems", "k": "k", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "max_new_tokens": "max_new_tokens", "few_shot": "few_shot", "seed": "seed",
            "batch_size": "batch_size", "samples": "keep_samples"}


def _default(field_name: str):
    """EvalConfig's default for ``field_name`` (for the help text)."""
    from .harness import EvalConfig

    return {f.name: f.default for f in dataclasses.fields(EvalConfig)}[field_name]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek.tasks.tool_use import add_describe_argument

    d = {flag: _default(name) for flag, name in SETTINGS.items()}
    p.add_argument("--model", required=True, metavar="RUN_OR_DIR",
                   help="HF checkpoint directory, run folder, or speedrun folder with stage sub-folders")
    p.add_argument("--stages", help="comma-separated stages of a speedrun folder to evaluate (default: all "
                                    "with a checkpoint)")
    p.add_argument("--tasks", default="arithmetic,countdown",
                   help="comma-separated tasks of four kinds, mixed: built-in ones, each optionally with levels "
                        "(arithmetic:1-2,compare:1; nanoseek.tasks.generators); reasoning-gym datasets rg:NAME or "
                        "rg:NAME(key=value, ...) with its config (nanoseek.tasks.rg); HumanEval: humaneval (the "
                        "first --n of its 164 problems) or humaneval:A-B (problems A to B), code run in the sandbox, "
                        "pass@k (nanoseek.tasks.humaneval); a built-in task's held-out problems in other wordings: "
                        "reword:GROUP:TASK[:LEVELS], GROUP original, seen or unseen (nanoseek.tasks.phrasing); "
                        "default arithmetic,countdown")
    p.add_argument("--n", type=limits.positive_int,
                   help=f"held-out (test split) problems per task (default {d['n']})")
    p.add_argument("--k", type=limits.positive_int,
                   help="samples per problem: pass@1 is averaged over them, and "
                        f"pass@k / maj@k are reported up to k (default {d['k']})")
    p.add_argument("--mode", default="auto", choices=["auto", "fewshot", "chat", "chat-think", "r1-zero"],
                   help="prompt mode (default auto: fewshot for pre-training stages, chat after SFT)")
    p.add_argument("--temperature", type=limits.temperature,
                   help="sampling temperature; 0 is greedy, which "
                        f"sets k to 1 (default {d['temperature']}, R1's)")
    p.add_argument("--top-p", type=limits.open_prob, help=f"nucleus sampling (default {d['top_p']}, R1's)")
    p.add_argument("--top-k", type=limits.nonneg_int, help=f"top-k filter, 0 disables it (default {d['top_k']})")
    p.add_argument("--max-new-tokens", type=limits.positive_int,
                   help=f"generation budget per sample (default {d['max_new_tokens']})")
    p.add_argument("--levels", help="comma-separated difficulty levels, problems split evenly over them "
                                    "(default: all levels of each task mixed)")
    p.add_argument("--few-shot", type=limits.nonneg_int,
                   help=f"worked train examples in fewshot mode (default {d['few_shot']})")
    p.add_argument("--seed", type=limits.seed, help=f"problem set and sampling seed (default {d['seed']})")
    p.add_argument("--batch-size", type=limits.positive_int,
                   help="engine cache rows: samples decoded at once "
                        f"(default {d['batch_size']})")
    p.add_argument("--max-seq-len", type=limits.int_range(2),
                   help="engine context per row (default: the model's, at most 4096)")
    p.add_argument("--samples", type=limits.nonneg_int,
                   help=f"full responses saved per task (default {d['samples']})")
    p.add_argument("--tools", metavar="NAMES",
                   help="built-in tools the samples may call, comma-separated (calculator, python): evaluate with "
                        "the tool loop, chat modes only; also evaluates without tools and shows both (default: none)")
    p.add_argument("--tool-tasks", metavar="TASKS",
                   help="the tasks that get --tools, comma-separated (default: every built-in task with a tool call)")
    add_describe_argument(p)
    p.add_argument("--out", help="eval.json path (one model only; default: eval.json in the stage folder)")
    p.add_argument("--no-save", action="store_true", help="print only, write no eval.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the stage folder's eval.json (tools.json) even when it holds an evaluation with "
                        "other settings (without it that file is kept and this one goes to eval-2.json, ...)")
    p.add_argument("--data", metavar="DIR", help="prepared data directory: also measure bits per byte on its "
                                                 "val split")
    p.add_argument("--bpb-tokens", type=limits.nonneg_int, default=32768,
                   help="target tokens for bits per byte (default 32768)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: found next to the checkpoint)")
    p.add_argument("--device", default="cpu", type=limits.device, help="torch device (default cpu)")
    p.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding in the engine")


# what an evaluation was: two eval files that differ in one of these are two different evaluations
IDENTITY = ("tasks", "n_problems", "k", "mode", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
            "levels", "few_shot", "tools", "tool_tasks", "describe_tools")


def settings_clash(path: Path, config: dict) -> str | None:
    """Why the file at ``path`` is not an earlier run of the evaluation whose saved ``config`` this is:
    the settings that differ, "not a nanoseek eval result", or None (no file, or the same settings:
    re-running an evaluation replaces its file)."""
    import json

    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        old = None
    if not isinstance(old, dict):
        return "not a nanoseek eval result"
    differ = [k for k in IDENTITY if k in old and k in config and old[k] != config[k]]
    return ", ".join(f"{k} {old[k]!r} -> {config[k]!r}" for k in differ) or None


def free_name(path: Path) -> Path:
    """``eval.json`` -> the first of ``eval-2.json``, ``eval-3.json``, ... that does not exist."""
    n = 2
    while (alt := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return alt


def _ints(text: str | None, flag: str) -> list[int] | None:
    from nanoseek.errors import UserError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None


def plan(model_arg: str, stages_arg: str | None, mode_arg: str) -> list[tuple[str, Path, Path, str]]:
    """(label, checkpoint dir, default eval.json path, mode) for every model to evaluate."""
    from nanoseek.errors import UserError
    from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

    from .runs import EVAL_JSON, RunError, find_stages, stage_of_checkpoint

    path = Path(model_arg)
    if not path.exists():
        raise UserError(f"--model {path}: no such file or directory")
    try:
        ckpt = resolve_checkpoint(path)
    except LoadError:
        ckpt = None
    if ckpt is not None:
        if stages_arg:
            raise UserError(f"--stages applies to a speedrun folder; {path} is one checkpoint")
        stage, mode = stage_of_checkpoint(ckpt)
        if mode_arg != "auto":
            mode = mode_arg
        elif mode is None:
            raise UserError(f"--mode auto cannot tell whether {ckpt} is a base or a chat model (no stage.json, "
                            "config.toml or stage name like pretrain/sft/grpo above it): pass --mode fewshot or "
                            "--mode chat")
        home = path if path.resolve() != ckpt.resolve() else (ckpt.parent if ckpt.name in ("final", "model", "hf")
                                                               else ckpt)
        return [(stage or ckpt.name, ckpt, home / EVAL_JSON, mode)]
    try:
        stages = find_stages(path)
    except RunError as e:
        raise UserError(str(e)) from None
    wanted = [s.strip() for s in stages_arg.split(",")] if stages_arg else None
    if wanted:
        unknown = [w for w in wanted if w not in {s.name for s in stages}]
        if unknown:
            raise UserError(f"--stages {','.join(unknown)}: not in {path} (stages: "
                            f"{', '.join(s.name for s in stages) or 'none'})")
        stages = [s for s in stages if s.name in wanted]
    out = []
    for s in stages:
        c = s.checkpoint()
        if c is None:
            if wanted:
                raise UserError(f"stage {s.name} ({s.dir}) has no checkpoint yet")
            continue
        mode = mode_arg if mode_arg != "auto" else s.eval_mode
        if mode is None:
            raise UserError(f"--mode auto: cannot tell the prompt mode of stage {s.name!r}; set its \"eval_mode\" "
                            "in run.json or pass --mode")
        out.append((s.name, c, s.eval_path, mode))
    if not out:
        raise UserError(f"--model {path}: not a checkpoint, and no stage in it has one (looked for final/, "
                        "latest, checkpoints/)")
    return out


def _without_tools(model, tokenizer, cfg, mode: str, engine, label: str):
    """The same held-out problems of the tasks that get tools, evaluated without tools (the baseline)."""
    from nanoseek.errors import UserError
    from nanoseek.tasks.sources import parse_sources

    from .harness import evaluate

    use = cfg.tool_use
    items = [item for item, src in zip(cfg.tasks, parse_sources(cfg.tasks)) if use.applies(src.name)]
    if not items:
        return None
    try:
        return evaluate(model, tokenizer, dataclasses.replace(cfg, tasks=items, tools="", tool_tasks=""), mode=mode,
                        engine=engine)
    except ValueError as e:
        raise UserError(f"{label} (without tools): {e}") from None


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError

    from nanoseek.tasks.generators import split_specs

    from .harness import EvalConfig, evaluate, record_speculation

    levels = _ints(args.levels, "--levels")
    given = {name: getattr(args, flag) for flag, name in SETTINGS.items() if getattr(args, flag) is not None}
    given.update({k: getattr(args, k) for k in ("tools", "tool_tasks") if getattr(args, k, None)})
    if getattr(args, "tools", None) and getattr(args, "describe_tools", None) is not None:
        given["describe_tools"] = args.describe_tools
    try:                                  # bad flags fail before any model is loaded
        cfg = EvalConfig(tasks=split_specs(args.tasks), levels=levels,
                         **given).validate()
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip("'\"")) from None
    jobs = plan(args.model, args.stages, args.mode)
    if args.out and len(jobs) > 1:
        raise UserError(f"--out names one file but {len(jobs)} stages are evaluated "
                        f"({', '.join(j[0] for j in jobs)}); pick one with --stages")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nanoseek.data.tokenizer import TokenizerError
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import LoadError, load_for_inference

    from nanoseek.train.bpb import bits_per_byte
    from .results import paired_comparison
    from .runs import TOOLS_JSON
    from .tables import comparison_table, result_table, rich_table, tool_rows

    console = Console()
    results = []
    for label, ckpt, default_out, mode in jobs:
        if cfg.tools and getattr(args, "describe_tools", None) is None:     # as this stage's model was trained
            from nanoseek.tasks.tool_use import describe_for

            cfg = dataclasses.replace(cfg, describe_tools=describe_for(None, ckpt))
        try:
            model, tokenizer = load_for_inference(ckpt, tokenizer_path=args.tokenizer, device=args.device,
                                                  require_tokenizer=True)
        except (LoadError, TokenizerError) as e:
            raise UserError(str(e)) from None
        limits.check_kv_cache(model, cfg.batch_size, args.max_seq_len, "--batch-size x --max-seq-len")
        engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, max_seq_len=args.max_seq_len,
                        use_mtp=args.mtp)
        with Progress(TextColumn(f"[bold]{label}[/] ({mode})"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("eval", total=None)
            try:
                result = evaluate(model, tokenizer, cfg, mode=mode, engine=engine,
                                  progress=lambda d, t: bar.update(task, completed=d, total=t))
            except ValueError as e:       # a level a task lacks, a prompt longer than the context, ...
                raise UserError(f"{label}: {e}") from None
        result.model["path"] = str(ckpt)
        result.model["stage"] = label
        if args.mtp:
            record_speculation(result, engine)
        baseline = None
        if cfg.tool_use.enabled:
            baseline = _without_tools(model, tokenizer, cfg, mode, engine, label)
        if args.data:
            try:
                result.bpb = bits_per_byte(model, args.data, tokenizer, max_tokens=args.bpb_tokens).to_dict()
            except ValueError as e:           # ShardError included: a missing or mismatched data directory
                raise UserError(f"--data {args.data}: {e}") from None
        console.print(result_table(result, f"{label}: {ckpt}"))
        if cfg.tool_use.enabled:
            console.print(rich_table(*tool_rows(result, baseline), title=f"{label}: with and without tools"))
        for note in result.notes:
            console.print(f"[yellow]note:[/] {note}")
        if not args.no_save:
            out = Path(args.out) if args.out else \
                default_out.with_name(TOOLS_JSON) if cfg.tool_use.enabled else default_out
            why = None if (args.out or args.overwrite) else settings_clash(out, result.config)
            if why:                   # the stage's own evaluation (the run report's record) stays
                kept, out = out, free_name(out)
                console.print(f"[yellow]note:[/] {kept} holds another evaluation ({why}): kept; "
                              f"this one goes to {out.name} (--overwrite replaces it, --out names the file)")
            result.save(out)
            console.print(f"wrote {out}")
        results.append((label, result))
    for (la, a), (lb, b) in zip(results, results[1:]):
        console.print(comparison_table(paired_comparison(a, b), la, lb))
    return 0
