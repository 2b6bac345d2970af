"""``nanoseek chat``: an interactive terminal chat with a checkpoint.

Each answer streams token by token. ``--think/--no-think`` is the chat template's thinking switch
(default off, shared with ``generate`` and ``serve``: :mod:`nanoseek.infer.thinking`). The model's
reasoning (a ``<think>`` block, opened by the template with ``--think`` or by the model itself) is
shown dimmed while it is written, then collapsed to one line, "thought for N s", once the answer
is complete. The conversation is kept and re-sent each turn through
the chat template (previous reasoning is not re-sent, as DeepSeek-R1 does). What is typed is
text: a control-token string in it (``<｜Assistant｜>``...) stays text (:func:`encode_turns`).
``--tools calculator,python`` lets the model call those built-ins (run by the engine, ``python``
only in the sandbox); each call and its output are shown as a dim line where the model made it,
and the conversation re-sent keeps them (assistant ``tool_calls`` and ``tool`` messages).

Commands: ``/reset`` forgets the conversation, ``/samples N`` draws N answers per turn (sharing one
prefill; with N > 1 the majority answer is shown too, self-consistency), ``/help``, ``/quit``
(or Ctrl-D). :func:`chat_loop` holds the logic and takes any line reader and rich console, so
tests drive it with scripted input.
"""

from __future__ import annotations

import argparse

from nanoseek import limits
import time
from dataclasses import replace
from typing import Callable

from .generate_cli import add_sampling_arguments, build_engine, check_tool_tokens, sampling_params, toolbox_from_args
from .thinking import DEFAULT_THINKING, add_think_argument

HELP = "commands: /reset (new conversation), /samples N (answers per turn), /help, /quit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", metavar="TEXT", help="system message for the whole conversation")
    add_think_argument(p, "each turn's prompt")
    p.add_argument("--samples", type=limits.positive_int, default=1,
                   help="answers per turn (default 1; /samples N changes it)")
    add_sampling_arguments(p, max_new_tokens=512, temperature=0.6, top_p=0.95)


class _Turn:
    """The streamed state of one sample of a turn."""

    def __init__(self, start: float):
        self.start = start
        self.reasoning = ""
        self.answer = ""
        self.thought_seconds: float | None = None
        self.finish_reason: str | None = None
        self.segments: list[tuple[str, list]] = []     # (answer text before a calls block, its tool results)
        self.results_open = False                      # the last event was a tool result

    def add(self, ev, now: float) -> None:
        if ev.tool_result is not None:
            if self.results_open:
                self.segments[-1][1].append(ev.tool_result)          # one block, several calls
            else:
                written = sum(len(t) for t, _ in self.segments)
                self.segments.append((self.answer[written:], [ev.tool_result]))
            self.results_open = True
            return
        self.results_open = False
        self.reasoning += ev.reasoning_delta
        if ev.text_delta and self.thought_seconds is None and self.reasoning:
            self.thought_seconds = now - self.start
        self.answer += ev.text_delta
        if ev.finished:
            self.finish_reason = ev.finish_reason
            if self.thought_seconds is None and self.reasoning:
                self.thought_seconds = now - self.start


def _render(turns: list[_Turn], final: bool):
    from rich.console import Group
    from rich.text import Text

    parts = []
    for i, t in enumerate(turns):
        if len(turns) > 1:
            parts.append(Text(f"[sample {i + 1}]", style="bold cyan"))
        if t.reasoning:
            if final:
                parts.append(Text(f"thought for {t.thought_seconds or 0.0:.1f} s", style="dim italic"))
            else:
                tail = "\n".join(t.reasoning.splitlines()[-12:])  # keep the live view short
                parts.append(Text(tail, style="dim"))
        shown = 0
        for text, results in t.segments:
            parts.append(Text(text))
            shown += len(text)
            for r in results:
                mark = "" if r.ok else " (failed)"
                parts.append(Text(f"[{r.call.name}({r.call.arguments}) -> {r.output}]{mark}", style="dim cyan"))
        parts.append(Text(t.answer[shown:]))
        if final and t.finish_reason == "length":
            parts.append(Text("(stopped at the token limit)", style="dim yellow"))
    return Group(*parts)


def chat_loop(engine, tokenizer, read_line: Callable[[str], str], console, params, system: str | None = None,
              think: bool = DEFAULT_THINKING, toolbox=None, describe_tools: bool | str = "full") -> int:
    """Run the chat until /quit or end of input; returns the number of turns answered."""
    from rich.live import Live

    from nanoseek.tasks.reply import canonical_answer, extract_answer, majority_vote

    history: list[dict] = []
    turns_done = 0
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return turns_done
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return turns_done
            if cmd == "/reset":
                history.clear()
                console.print("(conversation reset)", style="dim", highlight=False)
            elif cmd == "/samples":
                try:
                    n = int(arg)
                    if not 1 <= n <= engine.max_batch_size:
                        raise ValueError
                except ValueError:
                    console.print(f"usage: /samples N with 1 <= N <= {engine.max_batch_size}", style="red",
                                  highlight=False)
                    continue
                params = replace(params, n=n)
                console.print(f"({n} sample{'s' if n > 1 else ''} per turn)", style="dim", highlight=False)
            elif cmd == "/help":
                console.print(HELP, style="dim", highlight=False)
            else:
                console.print(f"unknown command {cmd}; {HELP}", style="red", highlight=False)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            ids = encode_turns(tokenizer, messages, think, toolbox, describe_tools)
        except ValueError as e:                 # a message the template refuses
            history.pop()
            console.print(f"error: {e}", style="red", highlight=False)
            continue
        start = time.perf_counter()
        turns = [_Turn(start) for _ in range(params.n)]
        try:
            with Live(_render(turns, False), console=console, refresh_per_second=12, transient=True) as live:
                for ev in engine.stream(ids, params, toolbox=toolbox):
                    turns[ev.index].add(ev, time.perf_counter())
                    live.update(_render(turns, False))
        except ValueError as e:                 # e.g. the conversation outgrew the context
            history.pop()
            console.print(f"error: {e}; try /reset", style="red", highlight=False)
            continue
        console.print(_render(turns, True))
        if params.n > 1:
            voted = majority_vote([extract_answer(t.answer) for t in turns])
            if voted is not None:
                support = sum(canonical_answer(extract_answer(t.answer)) == voted for t in turns)
                console.print(f"majority answer: {voted} ({support}/{params.n})", style="bold", highlight=False)
        history += turn_messages(turns[0])
        turns_done += 1


def turn_messages(turn: _Turn) -> list[dict]:
    """The messages a turn adds to the history: per calls block an assistant message with its
    ``tool_calls`` and one ``tool`` message per output, then the final answer."""
    out: list[dict] = []
    shown = 0
    for k, (text, results) in enumerate(turn.segments):
        shown += len(text)
        ids = [f"call_{k}_{i}" for i in range(len(results))]
        out.append({"role": "assistant", "content": text or None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": r.call.name, "arguments": r.call.arguments}}
            for cid, r in zip(ids, results)]})
        out += [{"role": "tool", "tool_call_id": cid, "content": r.output} for cid, r in zip(ids, results)]
    out.append({"role": "assistant", "content": turn.answer[shown:]})
    return out


def encode_turns(tokenizer, messages: list[dict], think: bool, toolbox=None, describe: bool | str = "full") -> list[int]:
    """The conversation's prompt ids: what the user typed (and the answers re-sent) is text, so a
    typed ``<｜Assistant｜>`` or ``<｜end▁of▁sentence｜>`` cannot end the turn; only the template
    makes control tokens. With a toolbox its tools are described or named in the system turn
    (``describe``: :func:`nanoseek.tasks.tool_use.announce`)."""
    from nanoseek.tasks.tool_use import announce

    messages, extra = announce(messages, toolbox, describe)
    return tokenizer.encode_chat(messages, add_generation_prompt=True, thinking=think, **extra)[0]


def run(args) -> int:
    from rich.console import Console

    console = Console()
    params = sampling_params(args, args.samples)
    toolbox = toolbox_from_args(args)
    engine, tokenizer = build_engine(args, max(16, args.samples))
    check_tool_tokens(engine, args)
    console.print(f"nanoseek chat: {args.model}  ({HELP})", style="dim", highlight=False)
    from nanoseek.errors import UserError

    def read_line(prompt: str) -> str:       # piped stdin that is not UTF-8: one line, not a traceback
        try:
            line = console.input(prompt)
            line.encode("utf-8")                 # a C locale reads bad bytes as lone surrogates
        except UnicodeDecodeError as e:
            raise UserError(f"<stdin>: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at byte offset "
                            f"{e.start} of the line)") from None
        except UnicodeEncodeError as e:
            offset = len(line[:e.start].encode("utf-8", "surrogateescape"))
            raise UserError(f"<stdin>: not UTF-8 text (invalid byte at byte offset {offset} of the line)") from None
        return line

    from nanoseek.tasks.tool_use import describe_for

    chat_loop(engine, tokenizer, read_line, console, params, system=args.system, think=args.think, toolbox=toolbox,
              describe_tools=describe_for(args.describe_tools, args.model))
    return 0
