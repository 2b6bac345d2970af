"""The ``nanoseek`` command line: one subcommand per stage of the DeepSeek recipe.

Each subcommand lives next to the code it drives, in a module that exposes
``add_arguments(parser)`` and ``run(args) -> int | None``. Those modules import only the
standard library at top level, so ``nanoseek --help`` stays fast; heavy imports (torch) happen
inside ``run``. Flags are kebab-case. Errors a user can fix (a bad config, a missing file) are
raised as :class:`UserError` and printed as one clear line with exit status 2, not a traceback.
Checkpoint errors (``CheckpointError``) and the range/memory errors of ``nanoseek.limits`` are
UserErrors. Argument errors are one line too (``prog: error: argument --flag: why``, no usage
block), and two conditions a user fixes with another flag or file are printed the same way
rather than as tracebacks: running out of memory, and an OS error on a named file (a folder
given as ``--output``, a read-only path, a full disk).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.errors import UserError  # noqa: F401  (re-exported: the class every command raises)

# name -> (module, one-line help). Order is the order of the recipe.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("nanoseek.data.tokenizer_cli", "train a byte-level BPE tokenizer"),
    "data": ("nanoseek.data.prepare_cli", "prepare token shards from text, jsonl or parquet"),
    "pretrain": ("nanoseek.train.pretrain_cli", "pre-train a DeepSeek-V3 model from a TOML config"),
    "sft": ("nanoseek.post.sft_cli", "supervised fine-tuning on chat data"),
    "dpo": ("nanoseek.post.dpo_cli", "direct preference optimisation"),
    "grpo": ("nanoseek.post.grpo_cli", "GRPO with verifiable rewards (R1-Zero / R1)"),
    "distill": ("nanoseek.post.distill_cli", "distil verified reasoning traces into a student"),
    "generate": ("nanoseek.infer.generate_cli", "generate completions (JSONL out)"),
    "chat": ("nanoseek.infer.chat_cli", "interactive terminal chat"),
    "serve": ("nanoseek.serve.cli", "OpenAI-compatible HTTP server and web chat"),
    "eval": ("nanoseek.eval.cli", "evaluate a checkpoint on held-out tasks"),
    "compare": ("nanoseek.eval.compare_cli", "compare eval results of runs side by side"),
    "export": ("nanoseek.export.cli", "export a checkpoint for other tools (GGUF for llama.cpp / ollama)"),
    "estimate": ("nanoseek.estimate.cli", "parameters, FLOPs, memory, GPU-hours and cost"),
    "eplb": ("nanoseek.train.eplb_cli", "redundant-expert placement (EPLB) and per-GPU load imbalance"),
    "ablate": ("nanoseek.ablate.cli", "small-scale ablations of DeepSeek's claims"),
    "speedrun": ("nanoseek.speedrun", "the whole recipe end to end with a report card"),
    "watch": ("nanoseek.eval.watch_cli", "live dashboard of a running run"),
    "demo": ("nanoseek.demo", "build a tiny model, save, load and generate"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), naming the flag; ``--help`` shows usage."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        if message.startswith("argument ") and ": " in message:    # "argument -o/--out: why" -> "--out: why"
            flags, why = message.removeprefix("argument ").split(": ", 1)
            flag = flags.split("/")[-1]
            message = f"{flag} {why}" if why.startswith("must ") else f"{flag}: {why}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Arguments that were not UTF-8 on the command line (Python keeps their bytes as lone
    surrogates) are one error naming the flag, not a traceback wherever the text is first encoded."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raw = text.encode("utf-8", "surrogateescape")
                offset = len(text[:e.start].encode("utf-8", "surrogateescape"))
                raise UserError(f"--{name.replace('_', '-')}: not UTF-8 text (invalid byte 0x{raw[offset]:02x} at "
                                f"byte offset {offset})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nanoseek",
        description="DeepSeek-V3 / R1: pre-train, post-train, serve and estimate, small enough to read.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # not built yet in this checkout
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:           # a flag error (one line, printed) or --help: its status, not an exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        _check_text_arguments(args)
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"nanoseek {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
        print(f"nanoseek {args.command}: error: {where}: {e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        print(f"nanoseek {args.command}: error: out of memory ({_one_line(e)[:200]}); lower the sizes "
              "(--batch-size, --max-seq-len, the model) or free memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m nanoseek.cli`: run the imported module's main, so that
    from nanoseek.cli import main as _main  # UserError is the class the subcommands raise
    sys.exit(_main())
