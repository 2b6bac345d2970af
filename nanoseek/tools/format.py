"""DeepSeek-V3.1's tool-call format: control strings, definitions, calls, rendering and parsing.

A reply that calls tools writes, after its text (and optional ``<think>`` block)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS_JSON<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

several ``<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>`` blocks for parallel calls, and the turn ends
with ``<｜end▁of▁sentence｜>``. Each result comes back as
``<｜tool▁output▁begin｜>OUTPUT<｜tool▁output▁end｜>``, in the order of the calls, and the model goes
on writing after the last one (no new ``<｜Assistant｜>`` header). The tools are described in the
system turn (:func:`tools_system_text`), word for word as V3.1's chat template describes them;
nanoseek's Jinja template (:data:`nanoseek.data.tokenizer.CHAT_TEMPLATE`) writes the same text.

Everything here works on text; :class:`ToolTokens` maps the control strings to a vocabulary's ids
(None when the vocabulary lacks one: that tokenizer cannot call tools).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS: tuple[str, ...] = (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_CALLS_END,
                                TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")     # OpenAI's rule for function names
MAX_JSON_DEPTH = 64   # deepest nesting of a tool's parameters or a call's arguments object (deeper: refused,
                      # as Python's recursive JSON walkers -- the template's among them -- would overflow)

# V3.1's description of the tools, appended to the system prompt after a blank line (its chat template)
TOOLS_HEADER = "## Tools\nYou have access to the following tools:\n"
TOOLS_FOOTER = ("\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
                f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
                "{{additional_tool_calls}}" f"{TOOL_CALLS_END}\n\n"
                "Where:\n\n"
                "- `tool_call_name` must be an exact match to one of the available tools\n"
                "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                "- For multiple tool calls, chain them directly without separators or spaces\n")


class ToolFormatError(ValueError):
    """A tool definition or call that does not follow the format (one line, names the field)."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep dicts and lists nest in ``value`` (a scalar: 0), counted without recursion and
    stopping once past ``limit`` (the result is then ``limit + 1``): safe on any nesting."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, (list, tuple)):
            continue
        deepest = max(deepest, d)
        if d > limit:
            return limit + 1
        stack.extend((x, d + 1) for x in v)
    return deepest


def check_depth(value: Any, where: str) -> None:
    """:class:`ToolFormatError` naming ``where`` when ``value`` nests deeper than :data:`MAX_JSON_DEPTH`."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ToolFormatError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")


def tojson(value: Any) -> str:
    """JSON as transformers' chat-template ``tojson`` filter writes it (what the template shows)."""
    return json.dumps(value, ensure_ascii=False)


@dataclass
class ToolSpec:
    """One function a model may call: OpenAI's ``{"type": "function", "function": {name,
    description, parameters}}``; ``parameters`` is a JSON Schema object."""
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    @classmethod
    def from_openai(cls, tool: Any, where: str = "tools[0]") -> ToolSpec:
        """A definition from OpenAI's request shape; :class:`ToolFormatError` naming the field otherwise."""
        if not isinstance(tool, dict):
            raise ToolFormatError(f"{where}: a tool must be an object, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ToolFormatError(f"{where}.type: only 'function' tools exist, got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolFormatError(f"{where}.function: missing or not an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolFormatError(f"{where}.function.name: must be 1-64 letters, digits, '_' or '-', got {name!r}")
        desc = fn.get("description", "")
        if desc is None:
            desc = ""
        if not isinstance(desc, str):
            raise ToolFormatError(f"{where}.function.description: must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolFormatError(f"{where}.function.parameters: must be a JSON Schema object with type 'object'")
        check_depth(params, f"{where}.function.parameters")
        props = params.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
            raise ToolFormatError(f"{where}.function.parameters.properties: must map names to schemas")
        req = params.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise ToolFormatError(f"{where}.function.parameters.required: must be a list of names")
        return cls(name, desc, params)

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tools_system_text(tools: list[ToolSpec]) -> str:
    """The tools' description V3.1's template appends to the system prompt (after ``"\\n\\n"``)."""
    text = TOOLS_HEADER
    for t in tools:
        text += f"\n### {t.name}\nDescription: {t.description}\n\nParameters: {tojson(t.parameters)}\n"
    return text + TOOLS_FOOTER


@dataclass
class ToolCall:
    """One call as the model wrote it: ``arguments`` is the raw JSON text (OpenAI's shape);
    ``id`` is the API's ``tool_call_id`` (``call_...``), empty inside the engine."""
    name: str
    arguments: str
    id: str = ""

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a JSON object; :class:`ToolFormatError` (one line) otherwise."""
        if not isinstance(self.arguments, str):
            raise ToolFormatError(f"arguments of {self.name!r} must be a JSON string, got {type(self.arguments).__name__}")

        def no_constant(name: str):
            raise ValueError(f"{name} is not JSON")

        try:
            value = json.loads(self.arguments, parse_constant=no_constant) if self.arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            raise ToolFormatError(f"arguments of {self.name!r} are not valid JSON ({e.__class__.__name__}: "
                                  f"{str(e)[:120]})") from None
        if not isinstance(value, dict):
            raise ToolFormatError(f"arguments of {self.name!r} must be a JSON object, got {type(value).__name__}")
        return value

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def render_call(call: ToolCall) -> str:
    return f"{TOOL_CALL_BEGIN}{call.name}{TOOL_SEP}{call.arguments}{TOOL_CALL_END}"


def render_calls(calls: list[ToolCall]) -> str:
    """The calls block a reply writes (without the turn's closing EOS)."""
    return TOOL_CALLS_BEGIN + "".join(render_call(c) for c in calls) + TOOL_CALLS_END


def render_output(output: str) -> str:
    """One tool result as the model reads it."""
    return f"{TOOL_OUTPUT_BEGIN}{output}{TOOL_OUTPUT_END}"


def parse_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """A reply's text with its control strings -> (text before the calls block, the complete calls,
    problems). A block without ``<｜tool▁calls▁end｜>`` still yields its complete calls; a call
    without its ``<｜tool▁sep｜>`` or ``<｜tool▁call▁end｜>`` is a problem, not a call. No block:
    (text, [], [])."""
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return text, [], []
    before, block = text[:start], text[start + len(TOOL_CALLS_BEGIN):]
    problems: list[str] = []
    end = block.find(TOOL_CALLS_END)
    if end >= 0:
        block = block[:end]
    else:
        problems.append("the tool-calls block is not closed")
    calls: list[ToolCall] = []
    for i, part in enumerate(block.split(TOOL_CALL_BEGIN)):
        if i == 0:
            if part.strip():
                problems.append("text between the tool-calls begin token and the first call")
            continue
        if TOOL_CALL_END not in part:
            problems.append(f"call {i} is not closed")
            continue
        body, rest = part.split(TOOL_CALL_END, 1)
        if rest.strip():
            problems.append(f"text after call {i}")
        if TOOL_SEP not in body:
            problems.append(f"call {i} has no {TOOL_SEP}")
            continue
        name, args = body.split(TOOL_SEP, 1)
        calls.append(ToolCall(name.strip(), args.strip()))
    return before, calls, problems


@dataclass(frozen=True)
class ToolTokens:
    """The ids of the tool control strings in one vocabulary (each a single token)."""
    calls_begin: int
    call_begin: int
    sep: int
    call_end: int
    calls_end: int
    output_begin: int
    output_end: int

    @classmethod
    def of(cls, tokenizer) -> ToolTokens | None:
        """The ids in ``tokenizer`` (anything with ``token_to_id``); None when one is missing."""
        ids = [tokenizer.token_to_id(t) for t in TOOL_TOKENS]
        if any(i is None for i in ids):
            return None
        return cls(*[int(i) for i in ids])

    @property
    def ids(self) -> frozenset[int]:
        return frozenset((self.calls_begin, self.call_begin, self.sep, self.call_end, self.calls_end,
                          self.output_begin, self.output_end))


__all__ = ["TOOL_CALLS_BEGIN", "TOOL_CALL_BEGIN", "TOOL_SEP", "TOOL_CALL_END", "TOOL_CALLS_END", "TOOL_OUTPUT_BEGIN",
           "TOOL_OUTPUT_END", "TOOL_TOKENS", "ToolFormatError", "ToolSpec", "ToolCall", "ToolTokens", "tools_system_text",
           "render_call", "render_calls", "render_output", "parse_calls", "tojson", "MAX_JSON_DEPTH", "json_depth",
           "check_depth"]
