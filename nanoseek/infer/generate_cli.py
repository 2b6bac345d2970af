"""``nanoseek generate``: batched generation from a checkpoint, one JSON line per prompt.

Prompts come from ``--prompt`` (repeatable), ``--input FILE`` (``-`` for stdin) or, with neither,
piped stdin. An input line is either plain text or a JSON object: ``{"prompt": "..."}`` or
``{"messages": [{"role": "user", "content": "..."}, ...]}`` (rendered with the chat template).
``--chat`` renders plain-text prompts as a single user turn of the chat template too, and
``--think/--no-think`` is the template's thinking switch (default off, shared with ``chat`` and
``serve``: :mod:`nanoseek.infer.thinking`). ``--tools calculator,python`` lets the model call those
built-ins (DeepSeek-V3.1's format, :mod:`nanoseek.tools`): chat-template prompts describe them in
the system turn, the engine runs each call (``python`` only in the sandbox) and the model goes on
after the output; each completion then lists its calls and outputs and its ``final_text``.
Only the template makes control tokens: message content (and a ``--chat`` prompt) is text, so
``<｜Assistant｜>`` or ``<｜end▁of▁sentence｜>`` typed in it stays text. A raw prompt (no ``--chat``,
no ``messages``) is the model's whole input: its control-token strings are parsed, as HF's
``tokenizer(text)`` does, so a hand-written template (``<｜User｜>hi<｜Assistant｜>``) works.

All prompts go to the engine in one batch (more rows than ``--batch-size`` are queued and
admitted as rows free up). Each output line holds the prompt, its token count and the ``--n``
completions: full text, reasoning (inside ``<think>``), answer, finish reason and token count.
A throughput summary (and the MTP acceptance rate with ``--mtp``) goes to stderr.

Examples::

    nanoseek generate --model runs/sft --chat --think --prompt "What is 17 + 25?"
    nanoseek generate --model runs/base --input prompts.txt --n 4 --temperature 0.8 --seed 1 > out.jsonl
"""

from __future__ import annotations

import argparse

from nanoseek import limits
import json
import sys

from .thinking import add_think_argument


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 256, temperature: float = 1.0,
                           top_p: float = 1.0) -> None:
    """Flags shared with ``nanoseek chat``."""
    from nanoseek.tasks.tool_use import add_describe_argument

    p.add_argument("--model", required=True, help="run folder or HF-format checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: searched next to the model)")
    p.add_argument("--max-new-tokens", type=limits.positive_int, default=max_new_tokens,
                   help=f"most tokens generated per sample (default {max_new_tokens})")
    p.add_argument("--temperature", type=limits.temperature, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=limits.open_prob, default=top_p,
                   help=f"nucleus sampling mass (default {top_p}: off)")
    p.add_argument("--top-k", type=limits.nonneg_int, default=0,
                   help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=limits.seed,
                   help="random seed: the same seed gives the same output (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a sample when it writes TEXT (repeatable; TEXT is not included in the output)")
    p.add_argument("--repetition-guard", type=limits.nonneg_int, default=0, metavar="G",
                   help="stop a sample whose last G tokens are one short n-gram repeated (default 0: off)")
    p.add_argument("--mtp", action="store_true",
                   help="MTP self-speculative decoding (needs a checkpoint with MTP modules)")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (the first steps compile, tens of seconds; "
                        "falls back to eager with a warning if compiling fails)")
    p.add_argument("--max-seq-len", type=limits.int_range(2),
                   help="prompt + completion tokens per sample (default: the model's, at most 4096)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", type=limits.device, help="torch device (default cpu)")
    p.add_argument("--threads", type=limits.threads, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tools", metavar="NAMES", default="",
                   help="built-in tools the model may call, comma-separated: calculator, python (run in the "
                        "sandbox); default none")
    add_describe_argument(p)


def toolbox_from_args(args):
    """The --tools built-ins as a Toolbox (None without --tools); UserError naming the flag."""
    from nanoseek.errors import UserError
    from nanoseek.tools.toolbox import Toolbox

    if not getattr(args, "tools", ""):
        return None
    try:
        return Toolbox.builtin(args.tools)
    except ValueError as e:
        raise UserError(f"--tools {args.tools}: {e}") from None


def check_tool_tokens(engine, args) -> None:
    """--tools with a tokenizer that has no tool-call tokens: one line."""
    from nanoseek.errors import UserError

    if getattr(args, "tools", "") and engine.tool_tokens is None:
        raise UserError(f"--tools: the tokenizer of {args.model} has no tool-call tokens (<｜tool▁calls▁begin｜>...): "
                        "this model cannot call tools")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--input", metavar="FILE", help="prompts, one per line (text or JSON); '-' for stdin")
    p.add_argument("--output", metavar="FILE", default="-", help="JSONL output file (default: stdout)")
    p.add_argument("--chat", action="store_true", help="render plain-text prompts with the chat template")
    add_think_argument(p, "chat-template prompts (--chat, {\"messages\"} lines)")
    p.add_argument("--system", metavar="TEXT", help="a system message for chat-template prompts")
    p.add_argument("--n", type=limits.positive_int, default=1,
                   help="samples per prompt, sharing one prefill (default 1)")
    p.add_argument("--batch-size", type=limits.positive_int, default=16,
                   help="KV-cache rows, i.e. samples decoded together (default 16)")
    p.add_argument("--token-ids", action="store_true", help="also write the generated token ids")
    add_sampling_arguments(p)


def read_prompts(args) -> list[dict]:
    """[{"prompt": str} | {"messages": [...]}] from --prompt, --input or piped stdin."""
    from nanoseek.errors import UserError

    items: list[dict] = [{"prompt": t} for t in args.prompt]
    lines: list[tuple[str, int, str]] = []
    if args.input:
        if args.input == "-":
            lines = [("<stdin>", i, line) for i, line in enumerate(limits.read_stdin_text().splitlines(), 1)]
        else:
            text = limits.read_text(args.input, "--input")
            lines = [(args.input, i, line) for i, line in enumerate(text.splitlines(), 1)]
    elif not items and not sys.stdin.isatty():
        lines = [("<stdin>", i, line) for i, line in enumerate(limits.read_stdin_text().splitlines(), 1)]
    for source, lineno, line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{source} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{source} line {lineno}: a JSON line must be an object, got {type(obj).__name__}")
            if isinstance(obj.get("messages"), list):
                items.append({"messages": obj["messages"]})
            elif isinstance(obj.get("prompt"), str):
                items.append({"prompt": obj["prompt"]})
            else:
                raise UserError(f"{source} line {lineno}: a JSON line needs a string 'prompt' or a list 'messages'")
        else:
            items.append({"prompt": line})
    if not items:
        raise UserError("no prompts: give --prompt TEXT, --input FILE, or pipe prompts into stdin")
    return items


def encode_item(item: dict, tokenizer, chat: bool, think: bool, system: str | None, toolbox=None,
                describe: bool | str = "full") -> list[int]:
    from nanoseek.tasks.tool_use import announce

    if "messages" in item or chat:
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        messages, extra = announce(messages, toolbox, describe)
        return tokenizer.encode_chat(messages, add_generation_prompt=True, thinking=think, **extra)[0]
    return tokenizer.encode(item["prompt"], add_bos=True)  # raw model input: control tokens parsed


def build_engine(args, max_batch_size: int):
    """(engine, tokenizer) for the sampling flags; user mistakes raise UserError."""
    import torch

    from nanoseek.errors import UserError

    from .engine import Engine
    from .loading import LoadError, load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, tokenizer = load_for_inference(args.model, args.tokenizer, dtype=dtype, device=args.device,
                                              require_tokenizer=True)
    except (LoadError, ValueError, OSError) as e:
        raise UserError(str(e)) from None
    if args.mtp and model.config.num_nextn_predict_layers < 1:
        raise UserError(f"--mtp: the checkpoint {args.model} has no MTP modules (num_nextn_predict_layers is 0)")
    rows_flag = "--batch-size" if hasattr(args, "batch_size") else "--samples"
    limits.check_kv_cache(model, max_batch_size, args.max_seq_len, f"{rows_flag} x --max-seq-len")
    try:
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=args.max_seq_len,
                        use_mtp=args.mtp, compile=getattr(args, "compile", False))
    except ValueError as e:
        raise UserError(str(e)) from None
    return engine, tokenizer


def sampling_params(args, n: int):
    from nanoseek.errors import UserError

    from .sampling import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, n=n, seed=args.seed, stop=list(args.stop),
                              repetition_guard=args.repetition_guard,
                              tools="run" if getattr(args, "tools", "") else "off").validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    import time

    from pathlib import Path

    from nanoseek.errors import UserError

    if args.output != "-" and Path(args.output).is_dir():
        raise UserError(f"--output {args.output}: is a directory; give a file path (or '-' for stdout)")
    items = read_prompts(args)
    params = sampling_params(args, args.n)
    toolbox = toolbox_from_args(args)
    engine, tokenizer = build_engine(args, max(args.batch_size, args.n))
    check_tool_tokens(engine, args)
    from nanoseek.tasks.tool_use import describe_for

    describe = describe_for(args.describe_tools, args.model)
    try:
        prompts = [encode_item(it, tokenizer, args.chat, args.think, args.system, toolbox, describe)
                   for it in items]
    except ValueError as e:                  # a message the template refuses, a bad tool schema
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    try:
        results = engine.generate(prompts, params, toolbox=toolbox)
    except ValueError as e:
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - t0
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for item, ids, comps in zip(items, prompts, results):
            record = {"prompt": item.get("prompt", item.get("messages")), "prompt_tokens": len(ids), "completions": []}
            for c in comps:
                entry = {"index": c.index, "text": c.text, "reasoning": c.reasoning, "answer": c.answer,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "tokens": c.completion_tokens}
                if toolbox is not None:
                    entry["tool_calls"] = [{"name": r.call.name, "arguments": r.call.arguments, "output": r.output,
                                            "ok": r.ok} for r in c.tool_results]
                    entry["final_text"] = c.final_text
                if args.token_ids:
                    entry["token_ids"] = c.token_ids
                    if toolbox is not None:
                        entry["model_mask"] = c.model_mask
                record["completions"].append(entry)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    generated = sum(c.completion_tokens for comps in results for c in comps)
    rate = generated / max(seconds, 1e-9)
    summary = f"{len(items)} prompts, {generated} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)"
    if args.mtp:
        s = engine.spec_stats
        summary += f"; MTP acceptance {s.acceptance_rate:.1%}, {s.tokens_per_step:.2f} tokens per step"
    print(summary, file=sys.stderr)
    return 0
