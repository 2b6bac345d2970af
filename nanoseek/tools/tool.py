"""What a tool is, apart from the toolbox that runs it: its definition, its limits, its result, its error.

:class:`Tool` pairs a :class:`~nanoseek.tools.format.ToolSpec` with the function behind it;
:class:`ToolLimits` are the limits every call runs under (a plain dataclass with one default per
field, filled from a config table by :meth:`ToolLimits.from_dict`; a bad value is one
:class:`~nanoseek.errors.ConfigError` line naming the field); :class:`ToolResult` is what one call
gave; :class:`ToolError` is how a tool reports a failure in its own words. The built-in tools
(:mod:`~nanoseek.tools.calculator`, :mod:`~nanoseek.tools.python_tool`) import this module, and
:mod:`~nanoseek.tools.toolbox` imports them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from nanoseek.errors import ConfigError

from .format import ToolCall, ToolSpec


@dataclass
class ToolLimits:
    """The limits tool calls run under (one default per field; a config table fills them)."""
    max_calls: int = 4               # tool calls per sample; more are answered with an error, not run
    timeout_s: float = 5.0           # wall-clock seconds per call
    max_output_chars: int = 2000     # characters of one output the model reads (longer ones are cut)
    python_memory_mb: int = 256      # address space of the python tool's sandboxed process

    def __post_init__(self) -> None:
        problem = _limits_problem(dataclasses.asdict(self))
        if problem:
            raise ConfigError(f"ToolLimits: {problem}")

    @classmethod
    def from_dict(cls, table: Any, where: str = "tool limits") -> ToolLimits:
        """From a config table (TOML/JSON): unknown keys, wrong types and bad values are one
        ConfigError line starting with ``where`` and naming the key."""
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table of {', '.join(_LIMIT_FIELDS)}, got {type(table).__name__}")
        unknown = [k for k in table if k not in _LIMIT_FIELDS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(_LIMIT_FIELDS)})")
        values = {**dataclasses.asdict(cls()), **table}
        problem = _limits_problem(values)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        return cls(**values)


def _limits_problem(values: dict[str, Any]) -> str | None:
    for key, kind, lowest in (("max_calls", int, 1), ("timeout_s", float, None), ("max_output_chars", int, 1),
                              ("python_memory_mb", int, 16)):
        v = values[key]
        number = isinstance(v, int) or (kind is float and isinstance(v, float))
        if isinstance(v, bool) or not number:
            return f"{key} = {v!r}: must be {'an integer' if kind is int else 'a number'}"
        if lowest is None and not (math.isfinite(v) and v > 0):
            return f"{key} = {v!r}: must be a positive number of seconds"
        if lowest is not None and v < lowest:
            return f"{key} = {v!r}: must be >= {lowest}"
    return None


_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(ToolLimits))


@dataclass
class ToolResult:
    """One call's outcome: what the model reads, whether the tool did its job, how long it took."""
    call: ToolCall
    output: str            # what the model reads (cut to the limit); "error: ..." when not ok
    ok: bool
    seconds: float = 0.0


class ToolError(Exception):
    """Raised by a tool for a failure its message explains fully: the output is ``error: MESSAGE``."""


@dataclass
class Tool:
    """One tool: its definition and the function behind it. A plain tool is called as
    ``fn(**arguments)`` in a thread the caller stops waiting for at the timeout; a ``contained``
    one as ``fn(arguments, limits)`` and stops itself at ``limits.timeout_s`` (the python tool)."""
    spec: ToolSpec
    fn: Callable[..., Any]
    contained: bool = False


__all__ = ["ToolLimits", "ToolResult", "ToolError", "Tool"]
