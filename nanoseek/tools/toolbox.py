"""The tools one sample may call, run under limits; every failure becomes text the model reads.

:class:`Toolbox` holds named tools: the built-ins (:data:`BUILTINS`: ``calculator``, ``python``)
and Python callables a library user registers (:meth:`Toolbox.register`, the parameters schema
read from the signature by :mod:`~nanoseek.tools.schema`). :meth:`Toolbox.run` executes one
:class:`~nanoseek.tools.format.ToolCall` and returns a :class:`ToolResult`; it never raises. An
unknown tool, arguments that are not a JSON object or do not fit the tool's parameters, an
exception in the tool, a timeout: each is a result with ``ok=False`` and an output starting
``error:`` that names the problem, so the model sees it as the tool's output and a reward can
count it. A tool raises :class:`ToolError` for a failure whose message is the whole story
(``error: MESSAGE``); any other exception reads ``error: TypeName: first line``. A value that is
not a string is written as JSON when it is one (numbers, booleans, null, lists, dicts), else as
``str(value)``; a coroutine is run to its end. Outputs longer than ``limits.max_output_chars`` are
cut (and say so). Outputs are text: a tool may print DeepSeek's control strings, and the engine
must encode outputs as plain text, never as control tokens.

Timeouts. A registered callable runs in a daemon thread and the caller stops waiting after
``limits.timeout_s``: Python cannot kill a thread, so a timed-out callable keeps running in the
background (holding whatever it holds) and its result is dropped. While :data:`MAX_STUCK_CALLS`
such calls of one tool are still running, further calls of it are refused at once (an error
result) instead of piling up threads. The ``python`` built-in is *contained*: its code runs in a
separate sandboxed process (:mod:`nanoseek.tasks.sandbox`) that is killed at the timeout, so
nothing outlives the call; the caller waits at most :data:`CONTAINED_GRACE_S` longer for the
sandbox to start and clean up.

:class:`~nanoseek.tools.tool.ToolLimits` (in :mod:`~nanoseek.tools.tool` with :class:`ToolResult`,
:class:`Tool` and :class:`ToolError`, re-exported here): calls per sample (the engine enforces
it), seconds per call, output characters, the python tool's memory.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
import time
from collections import Counter
from typing import Any, Callable

from nanoseek.errors import ConfigError

from . import calculator, python_tool
from .format import NAME_RE, ToolCall, ToolFormatError, ToolSpec
from .schema import check_arguments, parameters_from_signature
from .tool import Tool, ToolError, ToolLimits, ToolResult

MAX_STUCK_CALLS = 4          # per tool: timed-out callables still running before new calls are refused
CONTAINED_GRACE_S = 10.0     # how much longer than timeout_s the caller waits for a contained tool


def _as_text(value: Any) -> str:
    if inspect.iscoroutine(value):
        value = asyncio.run(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if value is None or isinstance(value, (bool, int, float, list, tuple, dict)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return str(value)


def _first_line(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still names its type
        text = ""
    return text.strip().splitlines()[0][:500] if text.strip() else ""


def _describe(e: BaseException) -> str:
    if isinstance(e, ToolError):
        return str(e)
    line = _first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _keyword_caller(fn: Callable[..., Any], sig: inspect.Signature | None) -> Callable[..., Any]:
    """``fn`` callable with keywords only: positional-only parameters (``math.sqrt``'s ``x``) are
    passed by position, in order, as far as the call gives them."""
    posonly = [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_ONLY] if sig else []
    if not posonly:
        return fn

    def call(**kwargs: Any) -> Any:
        args = []
        for name in posonly:
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
        return fn(*args, **kwargs)
    return call


class Toolbox:
    """Named tools and the limits they run under (see the module docstring)."""

    def __init__(self, tools: list[Tool] | None = None, limits: ToolLimits | None = None):
        if limits is not None and not isinstance(limits, ToolLimits):
            raise ConfigError(f"Toolbox: limits must be a ToolLimits, got {type(limits).__name__}")
        self.tools: dict[str, Tool] = {}
        self.limits = limits or ToolLimits()
        self._lock = threading.Lock()
        self._stuck: Counter[str] = Counter()       # timed-out calls per tool still running
        for t in tools or []:
            self.add(t)

    @classmethod
    def builtin(cls, names: list[str] | str, limits: ToolLimits | None = None) -> Toolbox:
        """The built-ins by name (``"python,calculator"`` or a list); one ConfigError line for an
        unknown name or a tool this machine cannot run (``python`` without a working sandbox)."""
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"built-in tools: expected names like 'calculator,python', got {names!r}")
        names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        if not names:
            raise ConfigError(f"built-in tools: no name given; built-ins: {', '.join(sorted(BUILTINS))}")
        box = cls(limits=limits)
        for n in names:
            if n not in BUILTINS:
                raise ConfigError(f"unknown built-in tool {n!r}; built-ins: {', '.join(sorted(BUILTINS))}")
            box.add(BUILTINS[n]())
        return box

    def add(self, tool: Tool) -> Toolbox:
        """Add a :class:`Tool`; ValueError when its name is taken. Returns self."""
        if tool.spec.name in self.tools:
            raise ValueError(f"a tool named {tool.spec.name!r} is already in this toolbox")
        self.tools[tool.spec.name] = tool
        return self

    def register(self, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                 parameters: dict[str, Any] | None = None) -> Toolbox:
        """Add a Python callable as a tool; returns self. ``name`` defaults to ``fn.__name__``,
        ``description`` to the docstring's first paragraph, ``parameters`` (a JSON Schema object) to
        one read from the signature (:func:`~nanoseek.tools.schema.parameters_from_signature`).
        One ValueError line for a name that is not 1-64 letters, digits, ``_`` or ``-`` (a lambda:
        pass ``name=``), a taken name, or a signature that cannot be read (pass ``parameters=``)."""
        if not callable(fn):
            raise ValueError(f"register: {fn!r} is not callable")
        name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"register: tool name {name!r} must be 1-64 letters, digits, '_' or '-' (pass name=...)")
        try:
            sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if parameters is None and sig is None:
            raise ValueError(f"register: cannot read the signature of {name!r}; pass parameters= (a JSON Schema)")
        if description is None:
            doc = inspect.getdoc(fn.func if isinstance(fn, functools.partial) else fn) or ""
            description = doc.split("\n\n")[0].strip()
        params = parameters if parameters is not None else parameters_from_signature(fn, sig)
        definition = {"type": "function", "function": {"name": name, "description": description, "parameters": params}}
        try:
            spec = ToolSpec.from_openai(definition, where=f"register({name})")
        except ToolFormatError as e:
            raise ValueError(str(e)) from None
        return self.add(Tool(spec, _keyword_caller(fn, sig)))

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [t.spec.to_openai() for t in self.tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def _cut(self, text: str) -> str:
        n = self.limits.max_output_chars
        if len(text) > n:
            text = text[:n] + f"... [cut at {n} characters]"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:                  # lone surrogates cannot be tokenized
            text = text.encode("utf-8", "replace").decode("utf-8")
        return text

    def run(self, call: ToolCall) -> ToolResult:
        """Run one call under the limits; never raises (module docstring). Thread-safe."""
        t0 = time.perf_counter()

        def done(output: str, ok: bool) -> ToolResult:
            return ToolResult(call, self._cut(output), ok, time.perf_counter() - t0)

        try:
            tool = self.tools.get(call.name) if isinstance(call.name, str) else None
            if tool is None:
                return done(f"error: unknown tool {call.name!r}; available: {', '.join(self.tools) or 'none'}", False)
            if not isinstance(call.arguments, str):
                return done(f"error: arguments of {call.name!r} must be JSON text", False)
            args = call.parsed_arguments()
            problem = check_arguments(tool.spec, args)
            if problem:
                return done(f"error: {problem}", False)
            output, ok = self._execute(tool, args)
            return done(output, ok)
        except ToolFormatError as e:
            return done(f"error: {e}", False)
        except Exception as e:  # noqa: BLE001 - the contract: a result, never an exception
            return done(f"error: {_describe(e)}", False)

    def _execute(self, tool: Tool, args: dict[str, Any]) -> tuple[str, bool]:
        name, limits = tool.spec.name, self.limits
        with self._lock:
            if self._stuck[name] >= MAX_STUCK_CALLS:
                return (f"error: {name} is not answering ({self._stuck[name]} earlier calls are still running "
                        "past their timeout)"), False
        box: dict[str, Any] = {}
        state = {"finished": False, "abandoned": False}

        def target() -> None:
            try:
                value = tool.fn(args, limits) if tool.contained else tool.fn(**args)
                box["output"] = _as_text(value)
            except BaseException as e:  # noqa: BLE001 - SystemExit in a tool is the model's to read too
                box["error"] = _describe(e)
            finally:
                with self._lock:
                    state["finished"] = True
                    if state["abandoned"]:
                        self._stuck[name] -= 1

        th = threading.Thread(target=target, daemon=True, name=f"tool-{name}")
        th.start()
        th.join(limits.timeout_s + (CONTAINED_GRACE_S if tool.contained else 0.0))
        with self._lock:
            if not state["finished"]:               # a Python thread cannot be killed: drop its result
                state["abandoned"] = True
                self._stuck[name] += 1
                return f"error: {name} timed out after {limits.timeout_s:g} s", False
        if "error" in box:
            return f"error: {box['error']}", False
        return box["output"], True


def _calculator_tool() -> Tool:
    return Tool(ToolSpec.from_openai(calculator.SPEC, where="calculator"), calculator.calculator)


def _python_tool() -> Tool:
    python_tool.check_sandbox()
    return Tool(ToolSpec.from_openai(python_tool.SPEC, where="python"), python_tool.python, contained=True)


# name -> factory of the built-in tool (a registry: the CLI, configs and the server look names up here)
BUILTINS: dict[str, Callable[[], Tool]] = {"calculator": _calculator_tool, "python": _python_tool}


__all__ = ["Toolbox", "BUILTINS", "MAX_STUCK_CALLS", "CONTAINED_GRACE_S", "check_arguments",
           "ToolLimits", "ToolResult", "Tool", "ToolError"]      # the last four from .tool, here for convenience
