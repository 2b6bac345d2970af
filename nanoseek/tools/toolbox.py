"""The tools one sample may call, run under limits; every failure becomes text the model reads.

:class:`Toolbox` holds named tools: the built-ins (:data:`BUILTINS`: ``calculator``, ``python``)
and Python callables a library user registers (:meth:`Toolbox.register`). :meth:`Toolbox.run`
executes one :class:`~nanoseek.tools.format.ToolCall` and returns a :class:`ToolResult`; it never
raises. An unknown tool, arguments that are not a JSON object or do not fit the tool's parameters,
an exception in the tool, a timeout: each is a result with ``ok=False`` and an output starting
``error:`` that names the problem, so the model sees it as the tool's output and a reward can
count it. Outputs longer than ``limits.max_output_chars`` are cut (and say so).

:class:`ToolLimits`: calls per sample (the engine enforces it), seconds per call, output characters.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .format import ToolCall, ToolFormatError, ToolSpec


@dataclass
class ToolLimits:
    max_calls: int = 4               # tool calls per sample; more are answered with an error, not run
    timeout_s: float = 5.0           # wall-clock seconds per call
    max_output_chars: int = 2000     # characters of one output the model reads


@dataclass
class ToolResult:
    call: ToolCall
    output: str
    ok: bool
    seconds: float = 0.0


@dataclass
class Tool:
    spec: ToolSpec
    fn: Callable[..., Any]


def _spec_from_signature(fn: Callable[..., Any], name: str, description: str | None) -> ToolSpec:
    """A JSON Schema for ``fn``'s parameters from its annotations (str, int, float, bool, list, dict)."""
    types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    props: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        t = types.get(p.annotation) if p.annotation is not inspect.Parameter.empty else None
        props[p.name] = {"type": t} if t else {}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    desc = description if description is not None else (inspect.getdoc(fn) or "").split("\n\n")[0]
    return ToolSpec(name, desc, {"type": "object", "properties": props, "required": required})


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,), "null": (type(None),)}


def check_arguments(spec: ToolSpec, args: dict[str, Any]) -> str | None:
    """The first way ``args`` break ``spec.parameters`` (required keys, unknown keys when
    ``additionalProperties`` is false, top-level types, enums); None when they fit."""
    params = spec.parameters
    props = params.get("properties", {}) or {}
    for key in params.get("required", []) or []:
        if key not in args:
            return f"missing required argument {key!r}"
    for key, value in args.items():
        schema = props.get(key)
        if schema is None:
            if params.get("additionalProperties", True) is False or (props and key not in props):
                return f"unknown argument {key!r} (expected: {', '.join(props) or 'none'})"
            continue
        t = schema.get("type")
        kinds = t if isinstance(t, list) else [t] if t else []
        if kinds and not any(isinstance(value, _JSON_TYPES.get(k, object)) and
                             not (k in ("integer", "number") and isinstance(value, bool)) for k in kinds):
            return f"argument {key!r} must be {' or '.join(kinds)}, got {type(value).__name__}"
        if "enum" in schema and value not in schema["enum"]:
            return f"argument {key!r} must be one of {schema['enum']}"
    return None


class Toolbox:
    """Named tools and the limits they run under (see the module docstring)."""

    def __init__(self, tools: list[Tool] | None = None, limits: ToolLimits | None = None):
        self.tools: dict[str, Tool] = {}
        self.limits = limits or ToolLimits()
        for t in tools or []:
            self.tools[t.spec.name] = t

    @classmethod
    def builtin(cls, names: list[str] | str, limits: ToolLimits | None = None) -> Toolbox:
        """The built-ins by name (``"python,calculator"`` or a list); ValueError naming an unknown one."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        box = cls(limits=limits)
        for n in names:
            if n not in BUILTINS:
                raise ValueError(f"unknown built-in tool {n!r}; built-ins: {', '.join(sorted(BUILTINS))}")
            box.tools[n] = BUILTINS[n]()
        return box

    def register(self, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                 parameters: dict[str, Any] | None = None) -> Toolbox:
        """Add a Python callable as a tool (its schema from its signature unless given); returns self."""
        name = name or fn.__name__
        spec = (ToolSpec.from_openai({"type": "function", "function": {"name": name, "description": description or "",
                                                                       "parameters": parameters}}, where=name)
                if parameters is not None else _spec_from_signature(fn, name, description))
        ToolSpec.from_openai(spec.to_openai(), where=name)          # the name rule
        self.tools[name] = Tool(spec, fn)
        return self

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [t.spec.to_openai() for t in self.tools.values()]

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def _cut(self, text: str) -> str:
        n = self.limits.max_output_chars
        return text if len(text) <= n else text[:n] + f"... [cut at {n} characters]"

    def run(self, call: ToolCall) -> ToolResult:
        """Run one call under the limits; never raises (module docstring)."""
        t0 = time.perf_counter()

        def done(output: str, ok: bool) -> ToolResult:
            return ToolResult(call, self._cut(output), ok, time.perf_counter() - t0)

        tool = self.tools.get(call.name)
        if tool is None:
            return done(f"error: unknown tool {call.name!r}; available: {', '.join(self.tools) or 'none'}", False)
        try:
            args = call.parsed_arguments()
        except ToolFormatError as e:
            return done(f"error: {e}", False)
        problem = check_arguments(tool.spec, args)
        if problem:
            return done(f"error: {problem}", False)
        box: dict[str, Any] = {}

        def target():
            try:
                box["value"] = tool.fn(**args)
            except Exception as e:  # noqa: BLE001 - any tool failure is the model's to read
                box["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")

        th = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
        th.start()
        th.join(self.limits.timeout_s)
        if th.is_alive():           # a Python callable cannot be killed; its result is dropped
            return done(f"error: {call.name} timed out after {self.limits.timeout_s:g} s", False)
        if "error" in box:
            return done(f"error: {box['error']}", False)
        value = box.get("value")
        return done(value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float))
                    else str(value), True)


def _calculator_tool() -> Tool:
    from .calculator import SPEC, calculator

    return Tool(ToolSpec.from_openai(SPEC), calculator)


BUILTINS: dict[str, Callable[[], Tool]] = {"calculator": _calculator_tool}


__all__ = ["Toolbox", "ToolLimits", "ToolResult", "Tool", "BUILTINS", "check_arguments"]
