"""The engine's tool loop: what happens between a sample closing a tool-calls block and going on.

A request sampled with ``SamplingParams.tools = "run"`` carries a
:class:`~nanoseek.tools.toolbox.Toolbox`. When one of its samples emits
``<｜tool▁calls▁end｜>`` (DeepSeek-V3.1's format, :mod:`nanoseek.tools.format`), the sample
*pauses*: its row leaves the decode batch while :func:`run_block` executes the block's calls on
the engine's worker threads (:class:`ToolWorkers`), so every other row keeps decoding. When the
results are in, the engine appends :func:`appended_tokens` to the row (the EOS that closes the
calling turn, then one ``<｜tool▁output▁begin｜>OUTPUT<｜tool▁output▁end｜>`` per call, in call
order; exactly what the chat template writes for that history) in one forward over the row's
cache, samples the next token from its last position, and the row rejoins the batch.

Appended tokens are not the model's: ``Completion.model_mask`` marks them 0 (training masks them
out), their logprobs are 0.0, and they add no text. Every failure is the model's to read, never an
exception: a block that does not parse (no ``<｜tool▁sep｜>``, text between calls), an unknown tool,
arguments that are not JSON or do not fit the tool's schema, an exception or a timeout in the tool
(:meth:`Toolbox.run <nanoseek.tools.toolbox.Toolbox.run>`), and calls beyond
``ToolLimits.max_calls`` for the sample each become an ``error: ...`` output. Outputs that would
not fit ``max_new_tokens`` or the cache end the sample with ``finish_reason`` "length".
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from nanoseek.tools.format import ToolCall, ToolTokens, parse_calls
from nanoseek.tools.toolbox import Toolbox, ToolResult

MAX_WORKERS = 4           # tool calls running at once (each may also use its own timeout thread)


def parse_block(tokenizer, block_ids: list[int]) -> tuple[list[ToolCall], list[str]]:
    """The calls of one block's token ids (from calls-begin to calls-end) and its problems."""
    text = tokenizer.decode(block_ids, skip_special_tokens=False)
    _, calls, problems = parse_calls(text)
    return calls, problems


def run_block(toolbox: Toolbox, calls: list[ToolCall], problems: list[str], used: int) -> list[ToolResult]:
    """Run one block's calls; ``used``: calls the sample made before. Never raises."""
    if not calls:
        why = "; ".join(problems) or "no call in the block"
        return [ToolResult(ToolCall("", ""), f"error: malformed tool call ({why})", False)]
    out = []
    for call in calls:
        if used >= toolbox.limits.max_calls:
            out.append(ToolResult(call, f"error: tool call limit reached ({toolbox.limits.max_calls} per reply); "
                                        "answer without more calls", False))
        else:
            out.append(toolbox.run(call))
        used += 1
    return out


def appended_tokens(tokenizer, tokens: ToolTokens, eos_id: int, results: list[ToolResult]) -> list[int]:
    """EOS, then each output as the chat template writes a ``tool`` message (text after a control token)."""
    ids = [eos_id]
    for r in results:
        try:
            body = tokenizer.encode_text_offsets(r.output, after_control=True)[0] if r.output else []
        except Exception:  # noqa: BLE001 - a vocabulary that cannot keep this text apart: say so instead
            body = tokenizer.encode_text_offsets("error: the tool output cannot be encoded", after_control=True)[0]
        ids += [tokens.output_begin, *body, tokens.output_end]
    return ids


class ToolWorkers:
    """The threads tool calls run on (started on first use, shut down with the engine)."""

    def __init__(self, max_workers: int = MAX_WORKERS):
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="nanoseek-tool")
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


__all__ = ["parse_block", "run_block", "appended_tokens", "ToolWorkers", "MAX_WORKERS"]
