"""The ``python`` built-in: model-written Python runs in nanoseek's sandbox; the model reads what it prints.

The code never runs in this process: :func:`python` hands it to
:func:`nanoseek.tasks.sandbox.run_code` (its own process under a fresh uid, no network, no host
files, CPU/memory/process/file-size limits, killed with everything it started at the timeout; the
module docstring there lists what is contained on which machine). The sandbox's interpreter runs
the standard library only, with empty stdin. A small wrapper program around the code makes it
behave like a notebook cell: the value of a last bare expression is printed (its ``repr``, unless
None), so ``347 * 829`` answers ``287663`` as ``print(347 * 829)`` does, and tracebacks show only
the code's own frames (as ``File "<code>"``).

What the model reads (the Toolbox then cuts it to ``limits.max_output_chars``):

* success (exit status 0): the standard output, trailing newlines removed; ``(no output)`` when it
  printed nothing. Standard error is dropped (warnings).
* failure: ``error: WHAT`` (the exception's last line, ``timed out after N s``, ``ran out of
  memory (N MB)``, ``exit status N``, ...), then ``--- stdout ---`` with what it printed (the
  head, so the error line and the stderr tail always fit) and ``--- stderr ---`` with the last
  lines of its standard error (the traceback's end).

Limits (:class:`~nanoseek.tools.tool.ToolLimits`): ``timeout_s`` (wall clock, the sandbox's
clock; CPU one second more), ``python_memory_mb`` (address space), and the output: the sandbox
keeps at most ``4 * max_output_chars`` bytes of each stream and drains the rest, so printing
forever costs nothing but the time. Code longer than :data:`MAX_CODE_CHARS` is refused. The
output is text: a program can print DeepSeek's control strings (``<｜tool▁output▁end｜>``) and the
engine must encode it as text, never as control tokens.
"""

from __future__ import annotations

from typing import Any

from nanoseek.errors import ConfigError
from nanoseek.tasks.sandbox import SandboxError, SandboxResult, run_code, sandbox_capabilities

from .tool import ToolError, ToolLimits

MAX_CODE_CHARS = 100_000
STDERR_TAIL_LINES = 8
NO_OUTPUT = "(no output)"

SPEC = {"type": "function", "function": {
    "name": "python",
    "description": ("Run a Python 3 program (standard library only; no network, no files outside its working "
                    "folder) and return what it prints. The value of a last bare expression is printed too."),
    "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                             "description": "e.g. print(sum(range(10)))"}},
                   "required": ["code"], "additionalProperties": False}}}

# The program the sandbox runs, followed by `_nanoseek_cell(<the code as a Python literal>)`.
WRAPPER = r'''
import sys as _sys, traceback as _tb, linecache as _lc
def _nanoseek_cell(_src):
    import ast
    _lc.cache["<code>"] = (len(_src), None, _src.splitlines(True), "<code>")
    try:
        tree = ast.parse(_src, "<code>")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, "<code>", "exec")
        tail = compile(last, "<code>", "eval") if last is not None else None
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        _sys.stderr.write("".join(_tb.format_exception_only(type(e), e)))
        _sys.exit(1)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(body, scope)
        if tail is not None:
            value = eval(tail, scope)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as e:
        _sys.stderr.write("".join(_tb.format_exception(type(e), e, e.__traceback__.tb_next)))
        _sys.exit(1)
'''


def check_sandbox() -> None:
    """ConfigError (one line) when the sandbox cannot run on this machine (probed once per process)."""
    try:
        sandbox_capabilities()
    except Exception as e:  # noqa: BLE001 - SandboxError, or no /proc (not Linux)
        raise ConfigError(f"built-in tool 'python' cannot run on this machine: the sandbox failed ({e})"[:400]) from None


def _tail(text: str, max_chars: int) -> str:
    """The last lines of ``text`` (at most STDERR_TAIL_LINES, whole lines within ``max_chars``)."""
    lines = text.rstrip("\n").splitlines()[-STDERR_TAIL_LINES:]
    while len(lines) > 1 and sum(len(ln) + 1 for ln in lines) > max_chars:
        lines.pop(0)
    out = "\n".join(lines)
    return out if len(out) <= max_chars else "..." + out[-max_chars:]


def _what(r: SandboxResult, limits: ToolLimits) -> str:
    reason = r.killed_reason
    if r.timed_out or reason == "timeout":
        return f"timed out after {limits.timeout_s:g} s"
    if reason == "memory_limit":
        return f"ran out of memory ({limits.python_memory_mb} MB)"
    if reason == "cpu_limit":
        return "used too much CPU time"
    if reason == "file_size_limit":
        return "wrote a file larger than the limit"
    if reason and reason.startswith("signal:"):
        return f"killed by {reason[7:]}"
    last = next((ln.strip() for ln in reversed(r.stderr.splitlines()) if ln.strip()), "")
    return last[:300] if last and r.returncode == 1 else f"exit status {r.returncode}"


def format_result(r: SandboxResult, limits: ToolLimits) -> tuple[str, bool]:
    """(what the model reads, ok) for one sandbox run (module docstring)."""
    stdout = r.stdout.rstrip("\n")
    if r.ok:
        return (stdout if stdout else NO_OUTPUT), True
    n = limits.max_output_chars
    head = f"error: {_what(r, limits)}"
    tail = _tail(r.stderr, max(n // 3, 80)) if r.stderr.strip() else ""
    parts = [head]
    if stdout:
        room = max(n - len(head) - len(tail) - 40, 0)
        parts.append("--- stdout ---\n" + (stdout if len(stdout) <= room else stdout[:room] + "..."))
    if tail and tail != head[len("error: "):]:
        parts.append("--- stderr ---\n" + tail)
    return "\n".join(parts), False


def python(args: dict[str, Any], limits: ToolLimits) -> str:
    """The tool (a contained one: the sandbox stops it at the timeout). ToolError on failure."""
    code = args["code"]
    if len(code) > MAX_CODE_CHARS:
        raise ToolError(f"the code is longer than {MAX_CODE_CHARS} characters")
    program = WRAPPER + f"_nanoseek_cell({code!r})\n"
    try:
        r = run_code(program, "", timeout_s=limits.timeout_s, memory_mb=limits.python_memory_mb,
                     max_output_bytes=4 * limits.max_output_chars + 4)
    except SandboxError as e:
        raise ToolError(f"the sandbox could not run the code ({e})"[:400]) from None
    output, ok = format_result(r, limits)
    if not ok:
        raise ToolError(output[len("error: "):])
    return output


__all__ = ["SPEC", "python", "check_sandbox", "format_result", "MAX_CODE_CHARS", "NO_OUTPUT"]
