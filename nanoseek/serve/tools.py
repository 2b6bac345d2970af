"""Tool calls in the API: a request's ``tools``/``tool_choice`` -> engine settings, and the model's
calls -> OpenAI's ``tool_calls`` (whole, or as stream deltas the ``openai`` client accumulates).

The model writes DeepSeek-V3.1's format (:mod:`nanoseek.tools.format`)::

    [content]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

:func:`plan_tools` checks a chat request's tool fields (a bad schema, an unknown named
``tool_choice`` or a tokenizer without the tool tokens is a 400 naming the field) and returns a
:class:`ToolPlan`: the tools for the chat template, the engine's extra :class:`SamplingParams`
settings and the tokens forced at the end of the prompt. Client mode (a request with ``tools``;
the client runs them, as with OpenAI's API): the engine's ``tools="stop"``, so a reply that calls
tools ends with its calls block. Server-side tools (``nanoseek serve --tools calculator,python``,
for requests without ``tools`` of their own, such as the web chat's): the engine's ``tools="run"``
with the server's :class:`~nanoseek.tools.toolbox.Toolbox`; the reply goes on after each call's
output, and each call is reported with its output (:func:`tool_run`) in ``message.tool_runs`` and,
streamed, as a ``delta.tool_run`` where it happened; ``content`` is all the text the model wrote
(before the calls too, so streamed and whole replies agree).

``tool_choice``:

* ``auto`` (the default with tools): the model decides;
* ``none``: the tools stay described, ``<｜tool▁calls▁begin｜>`` is never sampled
  (:func:`ban_tool_calls`: the engine's ``banned_token_ids``; an engine without it stops the
  sample there instead, so no call is ever returned);
* ``required``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>`` is appended to the prompt, so the
  reply is a call (of the model's choosing);
* ``{"type": "function", "function": {"name": N}}``: the prompt also gets ``N<｜tool▁sep｜>``,
  so the reply is a call of N (its arguments are the model's).

A forced call is written without a think block: ``required`` and a named choice render the
prompt with thinking off whatever the request asks (DeepSeek-V3.1 thinks before answering, and
the answer here is a call the server has already begun). ``parallel_tool_calls: false`` stops the
sample at the first ``<｜tool▁call▁end｜>``: at most one call is returned.

:class:`ToolCallParser` reads one choice's engine events token by token (the tool tokens are
single ids, so no text heuristics): the text before the block is ``content`` (``reasoning_content``
as usual), each call gets an id ``call_<24 hex>`` and is streamed as OpenAI does, one delta with
``index``, ``id``, ``type`` and the function's ``name`` (when the name is complete), then
fragments of ``arguments``. The non-streaming reply is the same parser's end state, so both
always agree (blank text before the first call is held, so a reply that is only calls has content
null streamed and whole; with the request's tools the stream's opening delta says content null too,
and so does a whole reply with no content, calls or not). The request's stop strings never match
inside a calls block; a forced call is all block, so they do not apply to it.
``finish_reason`` is ``"tool_calls"`` when the reply ended with complete calls;
a block the model left open (the length limit, an EOS inside a call) keeps the engine's reason
(``"length"``, ``"stop"``) and returns what was written, the open call's arguments as far as they
got (as OpenAI returns a call cut by ``max_tokens``): a client runs calls only on
``"tool_calls"``. Arguments are returned as the model wrote them (stripped), valid JSON or not, as
OpenAI's are. Text between calls, or a call without ``<｜tool▁sep｜>``, is dropped; so is every
control token sampled inside a name or arguments that is not part of a calls block's structure (EOS,
the think tags, ``<｜tool▁output▁begin｜>``/``<｜tool▁output▁end｜>``...): none is ever argument text.

Deliberately left out: the deprecated ``functions``/``function_call`` fields (400 unless neutral);
JSON-Schema validation of the arguments (the client's tool does that, as with OpenAI).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from nanoseek.infer.streaming import IncrementalDetokenizer, skipped_token_ids
from nanoseek.tools.format import TOOL_CALLS_BEGIN, ToolFormatError, ToolSpec, ToolTokens
from nanoseek.tools.toolbox import Toolbox

from .protocol import APIError, ChatCompletionRequest, short

TOOL_CHOICES = ("auto", "none", "required")


def no_tool_tokens_message(tokenizer, where: str | None = None) -> str:
    """The one line that refuses tools to a model whose vocabulary lacks the tool tokens."""
    where = where or getattr(tokenizer, "path", None) or getattr(tokenizer, "name_or_path", None)
    return (f"tokenizer{f' at {where}' if where else ''} has no tool-call tokens ({TOOL_CALLS_BEGIN}...): "
            "this model cannot call tools")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What one request's tools mean: the template's ``tools``, the engine's settings, the forced prompt end."""
    specs: list[ToolSpec]
    tokens: ToolTokens
    choice: str                      # "auto", "none", "required" or "named"
    forced_name: str | None = None   # the named choice's function
    parallel: bool = True
    run: bool = False                # server-side tools (``nanoseek serve --tools``): the engine runs the calls
    system: str | None = None        # ...named in the system turn instead of described (``--describe-tools names``)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def bans_only(self) -> bool:
        """``tool_choice: "none"`` on a server with its own tools: nothing described, the block banned."""
        return self.choice == "none" and not self.specs and not self.run

    def template_tools(self) -> list[dict[str, Any]]:
        return [s.to_openai() for s in self.specs]

    def prompt_suffix(self, tokenizer) -> list[int]:
        """Tokens appended to the rendered prompt (``required`` / a named choice; module docstring)."""
        t = self.tokens
        if self.choice == "required":
            return [t.calls_begin, t.call_begin]
        if self.choice == "named":
            return [t.calls_begin, t.call_begin, *tokenizer.encode_text(self.forced_name), t.sep]
        return []

    def sampling(self) -> dict[str, Any]:
        """Extra :class:`SamplingParams` fields. Server-side tools: the engine's tool loop
        (``tools="run"``). Client mode: the sample ends with its block (``tools="stop"``), or with
        its first call when ``parallel_tool_calls`` is false; ``none`` bans the block."""
        if self.run:
            return {"tools": "run"}
        if self.bans_only:
            return ban_tool_calls({}, self.tokens)
        stops = [] if self.parallel else [self.tokens.call_end]
        out: dict[str, Any] = {"tools": "stop", "stop_token_ids": stops}
        if self.forced:     # the block began in the prompt, so the engine does not see it open: stop at its
            stops.append(self.tokens.calls_end)   # end, and no stop string (none matches inside a block)
            out["stop"] = []
        if self.choice == "none":
            ban_tool_calls(out, self.tokens)
        return out

    def parser(self, tokenizer) -> ToolCallParser | None:
        """Client mode: the reader of one choice's calls (server-side tools: None, the engine runs them)."""
        if self.run or self.bans_only:
            return None
        return ToolCallParser(tokenizer, self.tokens, forced=self.forced, forced_name=self.forced_name)


def ban_tool_calls(overrides: dict[str, Any], tokens: ToolTokens) -> dict[str, Any]:
    """Make ``<｜tool▁calls▁begin｜>`` unsampleable (the engine's ``banned_token_ids``): the one
    place ``tool_choice: "none"`` is decided."""
    overrides["banned_token_ids"] = sorted(set(overrides.get("banned_token_ids", [])) | {tokens.calls_begin})
    return overrides


def tool_run(result) -> dict[str, Any]:
    """A server-side call and its output (a :class:`~nanoseek.tools.toolbox.ToolResult`), as the API
    reports it: ``message.tool_runs[i]`` and the stream's ``delta.tool_run``."""
    call = result.call
    return {"id": new_call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments},
            "output": result.output, "ok": bool(result.ok)}


def _history_uses_tools(req: ChatCompletionRequest) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in req.messages)


def plan_tools(req: ChatCompletionRequest, tokenizer, toolbox: Toolbox | None = None,
               describe: bool | str = "full") -> ToolPlan | None:
    """The request's tool settings checked (400s naming the field); None when it has no tools.
    ``toolbox``: the server's own tools (``nanoseek serve --tools``), run by the engine for a request
    that brings no tools of its own and does not say ``tool_choice: "none"`` (which bans the calls
    block, :func:`ban_tool_calls`, and describes nothing); ``describe``: what the prompt says of them
    ("full": described, "names": named in the system turn, "none": nothing, built-in tools;
    :mod:`nanoseek.tasks.tool_use`)."""
    from nanoseek.tasks.tool_use import describe_mode, tools_named_text

    describe = describe_mode(describe)
    tools, choice = req.tools, req.tool_choice
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools: must be a list of {'type': 'function', 'function': {...}} objects", "tools",
                       "invalid_value")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools or []):
        try:
            spec = ToolSpec.from_openai(tool, where=f"tools[{i}]")
        except ToolFormatError as e:
            msg = short(str(e), 300)
            raise APIError(400, msg, msg.split(":", 1)[0], "invalid_value") from None
        if any(s.name == spec.name for s in specs):
            raise APIError(400, f"tools[{i}].function.name: {spec.name!r} is defined twice",
                           f"tools[{i}].function.name", "invalid_value")
        specs.append(spec)
    name = _choice_name(choice)
    if not specs:
        if choice not in (None, "auto", "none"):
            raise APIError(400, f"tool_choice={short(repr(choice))} needs tools: the request defines none",
                           "tool_choice", "invalid_value")
        if _history_uses_tools(req) and ToolTokens.of(tokenizer) is None:
            raise APIError(400, "messages: " + no_tool_tokens_message(tokenizer), "messages", "invalid_value")
        tokens = ToolTokens.of(tokenizer)
        if toolbox is not None and len(toolbox) and tokens is not None:
            if choice == "none":     # the server's tools stay unused: the model may not call them
                return ToolPlan([], tokens, "none")
            named = tools_named_text([t.name for t in toolbox.specs()]) if describe == "names" else None
            return ToolPlan(toolbox.specs() if describe == "full" else [], tokens, "auto", run=True, system=named)
        return None
    tokens = ToolTokens.of(tokenizer)
    if tokens is None:
        raise APIError(400, "tools: " + no_tool_tokens_message(tokenizer), "tools", "invalid_value")
    if name is not None and not any(s.name == name for s in specs):
        raise APIError(400, f"tool_choice.function.name: {short(repr(name))} is not one of the request's tools "
                            f"({short(', '.join(s.name for s in specs))})", "tool_choice.function.name", "invalid_value")
    kind = "named" if name is not None else (choice or "auto")
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    return ToolPlan(specs, tokens, kind, name, parallel)


def _choice_name(choice: Any) -> str | None:
    """The function a named ``tool_choice`` asks for; None for the string choices; 400 otherwise."""
    if choice is None or choice in TOOL_CHOICES:
        return None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function":
            raise APIError(400, "tool_choice.type: must be 'function'", "tool_choice.type", "invalid_value")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or set(fn) - {"name"} \
                or set(choice) - {"type", "function"}:
            raise APIError(400, "tool_choice.function: must be {'name': <one of the tools' names>}",
                           "tool_choice.function", "invalid_value")
        return fn["name"]
    raise APIError(400, f"tool_choice: must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {short(repr(choice))}", "tool_choice", "invalid_value")


# ---------------------------------------------------------------------------- reading the calls
@dataclass
class _Call:
    index: int
    id: str
    name_ids: list[int] = field(default_factory=list)
    name: str | None = None          # set at <｜tool▁sep｜>
    arguments: str = ""              # what has been streamed (stripped as it goes)
    held: str = ""                   # trailing whitespace not streamed yet (it may end the arguments)
    closed: bool = False
    detok: IncrementalDetokenizer | None = None

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_TEXT, _BLOCK, _NAME, _ARGS, _DONE = range(5)


class ToolCallParser:
    """One choice's content and tool calls, from its engine events (module docstring).

    ``push(event) -> (content delta, reasoning delta, tool-call deltas)``; the reply's calls are
    :meth:`calls` and its finish reason :meth:`finish_reason`. ``forced``: the prompt ends inside
    a block (``tool_choice`` required), with ``forced_name``: inside that call's arguments."""

    def __init__(self, tokenizer, tokens: ToolTokens, forced: bool = False, forced_name: str | None = None):
        self.tokenizer, self.tokens = tokenizer, tokens
        self.control = skipped_token_ids(tokenizer)   # EOS and the like: never part of a name or arguments
        self.structure = tokens.ids - {tokens.output_begin, tokens.output_end}   # the tokens a calls block is made of
        self.state = _TEXT
        self._blank = ""                     # leading whitespace-only content, held: a reply that is only
        self._calls: list[_Call] = []        # calls has content null (dropped at the block), else released
        self._pending: list[dict] = []       # deltas to send with the next event (a forced call's header)
        if forced:
            self._open_call()
            if forced_name is not None:
                self._named(self._calls[-1], forced_name)

    # -- state changes
    def _open_call(self) -> None:
        self._calls.append(_Call(len(self._calls), new_call_id()))
        self.state = _NAME

    def _named(self, call: _Call, name: str) -> None:
        call.name = name
        call.detok = IncrementalDetokenizer(self.tokenizer)
        self.state = _ARGS
        self._pending.append({"index": call.index, "id": call.id, "type": "function",
                              "function": {"name": name, "arguments": ""}})

    def _fragment(self, call: _Call, text: str, final: bool) -> None:
        text = call.held + text
        if not call.arguments:
            text = text.lstrip()
        keep = text if final else text.rstrip()
        call.held = text[len(keep):]
        if final:
            keep, call.held = keep.rstrip(), ""
        if keep:
            call.arguments += keep
            self._pending.append({"index": call.index, "function": {"arguments": keep}})

    def _close(self, call: _Call) -> None:
        if call.detok is not None:
            self._fragment(call, call.detok.flush(), final=True)
        call.closed = True

    # -- events
    def push(self, ev) -> tuple[str, str, list[dict]]:
        content, reasoning = "", ""
        tok, t = ev.token_id, self.tokens
        if self.state == _TEXT:
            content, reasoning = ev.text_delta, ev.reasoning_delta
            if self._blank is not None:      # no visible content yet: hold whitespace
                content = self._blank + content
                self._blank, content = (None, content) if content.strip() else (content, "")
            if tok == t.calls_begin:
                self.state = _BLOCK
                self._blank = None
            elif ev.finished and self._blank:
                content, self._blank = self._blank, None
        elif tok is None or self.state == _DONE:
            pass
        elif tok in self.control and tok not in self.structure:   # EOS, <think>, a tool output's tokens...
            pass
        elif tok == t.calls_end:
            if self._calls and self.state in (_NAME, _ARGS):
                self._drop_or_cut(self._calls[-1])
            self.state = _DONE
        elif tok == t.call_begin:
            if self.state in (_NAME, _ARGS):
                self._drop_or_cut(self._calls[-1])
            self._open_call()
        elif self.state == _NAME:
            call = self._calls[-1]
            if tok == t.sep:
                self._named(call, self.tokenizer.decode(call.name_ids).strip())
            elif tok == t.call_end:          # a call without <｜tool▁sep｜>: not a call
                self._calls.pop()
                self.state = _BLOCK
            else:
                call.name_ids.append(tok)
        elif self.state == _ARGS:
            call = self._calls[-1]
            if tok == t.call_end:
                self._close(call)
                self.state = _BLOCK
            else:
                self._fragment(call, call.detok.push(tok), final=False)
        # _BLOCK: text between calls is dropped
        if ev.finished and self.state == _ARGS:     # cut inside the arguments: send what was written
            call = self._calls[-1]
            self._fragment(call, call.detok.flush(), final=True)
        if ev.finished and self.state == _NAME and self._calls:   # no name yet: nothing to report
            self._calls.pop()
        deltas, self._pending = self._pending, []
        return content, reasoning, deltas

    def _drop_or_cut(self, call: _Call) -> None:
        """A call interrupted by another control token: without a name it is dropped, else it stays
        open (not closed), with the arguments written so far."""
        if call.name is None:
            self._calls.remove(call)
        elif call.detok is not None:
            self._fragment(call, call.detok.flush(), final=True)

    # -- the reply
    def calls(self) -> list[dict[str, Any]]:
        return [c.openai() for c in self._calls if c.name is not None]

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``"tool_calls"`` when the reply ended with complete calls; else the engine's reason
        ("stop" for a closed block without a call)."""
        named = [c for c in self._calls if c.name is not None]
        if engine_reason in ("stop", "tool_calls") and named and all(c.closed for c in named):
            return "tool_calls"
        return "stop" if engine_reason == "tool_calls" else engine_reason


__all__ = ["ToolPlan", "ToolCallParser", "plan_tools", "ban_tool_calls", "tool_run", "no_tool_tokens_message",
           "new_call_id"]
