"""Any tokenizer's Jinja chat template, rendered as transformers renders it, encoded so content stays text.

A checkpoint's tokenizer brings its own chat template (``chat_template`` in
``tokenizer_config.json`` or ``chat_template.jinja``); nanoseek's own template
(:data:`nanoseek.data.tokenizer.CHAT_TEMPLATE`) is one such template. This module is everything
between a list of messages and token ids, for every template alike:

* **Rendering** (:class:`ChatTemplate`, :meth:`~ChatTemplate.render`) is transformers'
  ``apply_chat_template(tokenize=False)``: a jinja2 ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks``/``lstrip_blocks`` and ``loopcontrols``, the globals ``raise_exception``,
  ``strftime_now``, ``namespace`` and ``dict``, transformers' ``tojson`` filter, the variables
  ``messages``, ``tools``, ``documents=None``, ``add_generation_prompt``, the tokenizer's
  named special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword (``thinking``...).
  Messages are normalised the same way: keys whose value is None are dropped (an assistant's
  ``content: None`` beside its ``tool_calls``), and a reasoning field (``reasoning_content``,
  ``thinking`` or ``reasoning``) is copied under the first two names. Whatever the template's
  code raises (``raise_exception``, a syntax error, a sandbox violation, ``1/0``, a MemoryError...)
  is one :class:`TokenizerError` line. One rendering is limited where transformers' is not (no real
  template comes near): it writes at most :data:`MAX_RENDER_CHARS` (16M) characters and builds no
  longer string or list with ``*``, all its ``range()`` calls together make at most
  :data:`MAX_RANGE_ITEMS` (1M) items (the sandbox caps one at 100000), ``**`` makes at most
  :data:`MAX_POW_BITS` bits; past one, a line. Not limited: strings grown with ``+`` or ``~``
  (a doubling loop), filters (``center``, ``replace``...), loops over the messages: the template
  is the checkpoint's code, and the limits stop a runaway mistake (a loop that would run for
  hours, a string of gigabytes written out), not a hostile author; a MemoryError is still a line.
* **Tools** (issue 20): ``tools`` is OpenAI's list of function tools (or
  :class:`~nanoseek.tools.format.ToolSpec` objects), each checked by ``ToolSpec.from_openai``
  (:func:`check_tools`: one line naming ``tools[i]`` and the field) and passed to the template as
  given, as transformers passes them; assistant messages may carry OpenAI's ``tool_calls``
  (``arguments`` a JSON string or an object) and ``tool`` messages the outputs. How they are
  written is the template's business (nanoseek's writes DeepSeek-V3.1's format). A tokenizer asked
  for tools without DeepSeek-V3.1's tool-call tokens among its control tokens refuses in one line
  (:meth:`ChatEncoding.require_tool_tokens`), as it does tool turns in a template that writes those
  tokens (an old nanoseek vocabulary).
* **Only the template makes control tokens** (:meth:`~ChatTemplate.pieces`). The chat is rendered
  twice: with the real messages, and with every content and reasoning string replaced by a unique
  sentinel, and so is each tool call's name and arguments and each tool's description and
  parameters that holds a control-token string (each string inside, keys included; such a string
  may come back JSON-escaped, as ``tojson`` writes it). When putting the strings back into the
  sentinel rendering gives the real rendering exactly, the template used them verbatim, and the
  prompt can be cut into template text and content: a tool's output or a call's arguments that
  spell ``<｜tool▁output▁end｜><｜Assistant｜>`` stay text and forge nothing. Encoding (:func:`encode_chat`):

  - **No content holds a control-token string** (the usual case): the rendering is encoded whole,
    exactly as ``AutoTokenizer.apply_chat_template(tokenize=True)`` encodes it (the vocabulary's
    ``encode_prompt_offsets``), so the ids equal transformers' for every tokenizer (Metaspace
    ``prepend_scheme="first"``, added whitespace tokens...); a check that the control ids sit
    exactly where the template wrote them falls back to the piece-wise path otherwise.
  - **Content holds one** (``<｜Assistant｜>``, ``<|im_end|>``...): piece-wise. Template text is
    split on the control strings (each its single id), content is text (:func:`encode_pieces`),
    adjacent text one run, and a run after a control token is encoded as HF encodes a split that
    does not start the string (no Metaspace ``▁`` prepended). The tests force this path on
    ordinary chats of every tokenizer family and get transformers' ids; so the content's
    control-token strings are the only difference from HF (they stay text). Where the template
    transforms content (R1 keeps ``content.split('</think>')[-1]`` of history, Llama-3 trims it,
    a template tests ``if content``) pieces cannot be cut: such content is a
    :class:`TokenizerError` naming the message. Other content is encoded whole once the control
    tokens are shown to be the template's own: text that holds a fragment of a control string (a
    start or end of one, four characters or more, or a shorter one whole, in any case) is a suspect,
    and the chat is rendered again with every character of each suspect message's content and
    reasoning (and of each string in its tool calls' arguments; the tools' descriptions likewise)
    made U+E002, whitespace and an assistant's reasoning tags kept, so the template sees text of the
    same shape from which no rewriting (``lower``, ``trim`` before the template's ``|>``...) makes a
    control-token string; the two renderings must hold the same control tokens, else the message
    whose text makes one is refused in one line (never encoded as a control token). Messages without
    such a fragment keep their text in that rendering, so a template that branches on it (Qwen3
    tests user turns for ``<tool_response>``, Mistral compares turns) renders them alike.
  - **Reasoning tags in an assistant's content** (``<think>...</think>answer``, the common SFT form
    and what a client sends back) are the template's markup there, not a control-token string
    to neutralise: rendered and encoded as transformers does (R1/V3.1 drop them from history).
    In system, user and tool content, in reasoning fields and in tool calls they stay text (or
    refused, above).
* **The SFT loss mask** (:meth:`~ChatTemplate.assistant_spans`): assistant message ``i`` owns the
  characters from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
  ``render(messages[:i+1])``; when these are prefixes of the full rendering (every template of
  the usual "append a turn" kind: nanoseek, DeepSeek-V3, ChatML, Llama-3) that is exactly the
  answer, its closing token and whatever the template writes after it before the next message.
  Otherwise (a generation prompt the history does not repeat, like R1's ``<｜Assistant｜><think>\\n``
  or V3.1's thinking ``<think>``, or a turn rewritten once later turns follow) a rendering that is
  not a prefix marks the end of the last control token it has in common with the full rendering:
  for R1 the span starts right after ``<｜Assistant｜>`` (the answer and its ``<｜end▁of▁sentence｜>``
  are trained). A template that rewrites a turn once later turns follow so that nothing after
  the header is shared gets no span for that turn (nothing is trained rather than the wrong
  text), and so does a turn whose prefix the template refuses to render (with or without the
  generation prompt). A token is trained when its characters overlap a span (transformers'
  ``{% generation %}`` rule). Tool turns follow the same rule: a message that calls tools owns its text, its calls
  block and its end token; the tool outputs belong to no assistant message and are never trained;
  a reply after them (V3.1 writes no header there, and its generation prompt adds nothing) owns
  everything from the last output to its end token.
  :meth:`ChatEncoding.encode_chat_prompt` skips the mask (a prompt for generation).

``{% generation %}`` blocks (transformers' assistant-mask marker) are rendered as their body.
Deliberately left out: documents (rendered as None), multimodal content (content must be a
string), tools given as Python functions (transformers turns them into schemas; pass the OpenAI
dict), ``continue_final_message``, added tokens with ``lstrip``/``rstrip`` (matched literally).
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any, NamedTuple

from nanoseek.tools.format import TOOL_CALLS_BEGIN, TOOL_TOKENS, ToolFormatError, ToolSpec, ToolTokens, check_depth


class TokenizerError(ValueError):
    """A tokenizer file is missing or inconsistent, or a chat message is malformed."""


# Names a message's reasoning goes under (transformers' _REASONING_FIELDS); templates read the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Template variables a caller's keywords may not set (transformers passes them itself).
RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

Offsets = list[tuple[int, int]]
# Content stand-ins for the second rendering: private-use brackets around a per-process nonce.
_NONCE = secrets.token_hex(6)
_SENTINEL = re.compile(f"(\ue000{_NONCE}:[^\ue001]*\ue001)")

# What one rendering may cost (transformers has no such limits; no real template comes near them):
# the characters it writes (and any string or list it builds with *), the items all its
# range() calls make together (the sandbox already caps one range at 100000), and the bits of an
# integer it builds with **. Past one, the rendering stops with a TokenizerError line.
MAX_RENDER_CHARS = 1 << 24
MAX_RANGE_ITEMS = 1 << 20
MAX_POW_BITS = 1 << 16
_budget = threading.local()          # range items left to the rendering running in this thread


class Piece(NamedTuple):
    """A piece of a rendered prompt. ``template``: the prompt's own structure, whose control-token
    strings become control tokens; otherwise content, always encoded as text. ``train``: written
    by the assistant (the SFT loss mask of :func:`encode_pieces`)."""

    text: str
    template: bool
    train: bool = False


# ----------------------------------------------------------------------------- encoding pieces


@functools.lru_cache(maxsize=16)
def _control_splitter(control: frozenset[str]) -> re.Pattern | None:
    """A regex splitting text on the control strings, longest first (a capture group keeps them)."""
    pattern = "|".join(re.escape(t) for t in sorted(control, key=lambda t: (-len(t), t)))
    return re.compile(f"({pattern})") if pattern else None


def _runs(pieces: Iterable[Piece | tuple], control: Mapping[str, int]) -> list[tuple[str | int, bool, int]]:
    """(text run or control id, train flag, start character) of ``pieces`` joined."""
    splitter = _control_splitter(frozenset(control))
    runs: list[tuple[str | int, bool, int]] = []
    pos = 0

    def add_text(text: str, train: bool) -> None:
        if runs and isinstance(runs[-1][0], str) and runs[-1][1] == train:
            runs[-1] = (runs[-1][0] + text, train, runs[-1][2])
        else:
            runs.append((text, train, pos))

    for piece in pieces:
        text, template, train = piece[0], bool(piece[1]), bool(piece[2]) if len(piece) > 2 else False
        if not isinstance(text, str):
            raise TokenizerError(f"prompt piece must be a string, got {type(text).__name__}")
        parts = splitter.split(text) if template and splitter is not None else [text]
        for k, part in enumerate(parts):
            if k % 2:
                runs.append((control[part], train, pos))
            elif part:
                add_text(part, train)
            pos += len(part)
    return runs


def encode_pieces(pieces: Iterable[Piece | tuple[str, bool] | tuple[str, bool, bool]], control: Mapping[str, int],
                  encode_text: Callable[[str], list[int]],
                  encode_after_control: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(ids, train mask) of ``pieces``: ``(text, template[, train])``.

    Template text is split on the ``control`` strings (leftmost-longest, as HF matches added
    tokens), each becoming its id; everything else, content whole, is text. Adjacent text with
    the same train flag is one run for ``encode_text``, so the ids equal HF's encoding of the
    joined string whenever content holds no control string (HF splits on the same tokens); a run
    that does not start the prompt goes to ``encode_after_control`` (default ``encode_text``: for
    Metaspace ``prepend_scheme="first"``, which HF applies to the start of the string only).
    """
    ids: list[int] = []
    mask: list[int] = []
    later = encode_after_control or encode_text
    for run, train, start in _runs(pieces, control):
        piece_ids = [run] if isinstance(run, int) else (later if start else encode_text)(run)
        ids += piece_ids
        mask += [int(train)] * len(piece_ids)
    return ids, mask


def encode_pieces_with_offsets(pieces: Iterable[Piece | tuple], control: Mapping[str, int],
                               encode_text_offsets: Callable[..., tuple[list[int], Offsets]]
                               ) -> tuple[list[int], Offsets]:
    """(ids, character span of each id in the joined text) of ``pieces`` (train flags ignored);
    ``encode_text_offsets(text, after_control)`` encodes one text run."""
    names = {i: s for s, i in control.items()}
    ids: list[int] = []
    offsets: Offsets = []
    for run, _, start in _runs([(p[0], p[1]) for p in pieces], control):
        if isinstance(run, int):
            ids.append(run)
            offsets.append((start, start + len(names[run])))
        else:
            run_ids, run_offsets = encode_text_offsets(run, start > 0)
            ids += run_ids
            offsets += [(start + a, start + b) for a, b in run_offsets]
    return ids, offsets


def mask_from_spans(offsets: Offsets, spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span, else 0 (spans sorted)."""
    return [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled template in transformers' sandboxed environment (cached per template text)."""
    import jinja2
    import jinja2.ext
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text); rendered as
        its body: the loss mask comes from the prefix rule, which gives the same spans."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox with the limits of one rendering (``MAX_*`` above) on * and **
        (not on +: templates add strings all the time, and the check would slow every rendering)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if (isinstance(left, int) and isinstance(right, int) and right > 0
                        and right * max(abs(left).bit_length() - 1, 0) > MAX_POW_BITS):
                    raise jinja2.exceptions.SecurityError(f"it computes a power of more than {MAX_POW_BITS} bits")
            else:
                size = (len(left) * right if _sized(left) and isinstance(right, int) else
                        len(right) * left if _sized(right) and isinstance(left, int) else 0)
                if size > MAX_RENDER_CHARS:
                    raise jinja2.exceptions.SecurityError(f"it builds a string or list of {size} items "
                                                          f"(more than {MAX_RENDER_CHARS})")
            return super().call_binop(context, operator, left, right)

    def limited_range(*args):
        items = env.globals_range(*args)            # the sandbox's range: at most 100000 items
        left = getattr(_budget, "range_items", MAX_RANGE_ITEMS) - len(items)
        if left < 0:
            raise jinja2.exceptions.SecurityError(f"it loops over more than {MAX_RANGE_ITEMS} range() "
                                                  "items in one rendering")
        _budget.range_items = left
        return items

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.globals_range = env.globals["range"]
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace, range=limited_range)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from None


def _sized(x: Any) -> bool:
    return isinstance(x, (str, list, tuple))


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Messages are dicts with a string ``role`` and ``content`` (an assistant message that calls
    tools may have none); reasoning, when given, a string on an assistant message; ``tool_calls``,
    when given, OpenAI's ``[{"function": {"name": str, "arguments": JSON string or object}}]`` on an
    assistant message. Which roles a template accepts is the template's business."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"chat messages must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str):
            raise TokenizerError(f"chat message {i}: 'role' must be a string, got {type(m['role']).__name__}")
        if calls is not None:
            _check_calls(i, m, calls)
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise TokenizerError(f"chat message {i}: 'content' must be a string, got {type(m.get('content')).__name__}")
        for field in REASONING_FIELDS:
            value = m.get(field)
            if value is not None and (m["role"] != "assistant" or not isinstance(value, str)):
                raise TokenizerError(f"chat message {i}: '{field}' (reasoning) must be a string on an assistant "
                                     "message")


def _check_calls(i: int, m: dict[str, Any], calls: Any) -> None:
    """An assistant message's ``tool_calls`` in OpenAI's shape (one line naming the field otherwise)."""
    if m["role"] != "assistant":
        raise TokenizerError(f"chat message {i}: 'tool_calls' belong on an assistant message, not {m['role']!r}")
    if not isinstance(calls, (list, tuple)):
        raise TokenizerError(f"chat message {i}: 'tool_calls' must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        where = f"chat message {i}: tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise TokenizerError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}, "
                                 f"got {call!r}"[:300])
        if not isinstance(fn.get("name"), str):
            raise TokenizerError(f"{where}.function.name must be a string, got {fn.get('name')!r}"[:300])
        if not isinstance(fn.get("arguments"), (str, dict)):
            raise TokenizerError(f"{where}.function.arguments must be a JSON string or an object, got "
                                 f"{type(fn.get('arguments')).__name__}")
        try:
            check_depth(fn["arguments"], f"{where}.function.arguments")
        except ToolFormatError as e:
            raise TokenizerError(str(e)) from None


def check_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """The ``tools`` a template is rendered with: OpenAI function tools (dicts, passed on as given, as
    transformers does) or :class:`~nanoseek.tools.format.ToolSpec` objects (as their OpenAI dict),
    each checked by :meth:`ToolSpec.from_openai <nanoseek.tools.format.ToolSpec.from_openai>`; a bad
    one is a :class:`TokenizerError` line naming ``tools[i]`` and the field."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise TokenizerError(f"tools must be a list of function tools, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        tool = tool.to_openai() if isinstance(tool, ToolSpec) else tool
        try:
            ToolSpec.from_openai(tool, f"tools[{k}]")
        except ToolFormatError as e:
            raise TokenizerError(str(e)) from None
        out.append(tool)
    return out


def has_tool_turns(messages: Any) -> bool:
    """Whether ``messages`` hold a ``tool`` message or an assistant message with ``tool_calls``."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or bool(m.get("tool_calls"))) for m in messages)


def _normalise(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers' normalisation: None-valued keys dropped, reasoning aliased (a fresh copy)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _cut(prefix: str, full: str, splitter: re.Pattern | None) -> int:
    """Where ``prefix`` (a rendering of the first messages) ends in ``full``: its length when it is
    a prefix, else the end of the last control token of the part the two have in common."""
    if full.startswith(prefix):
        return len(prefix)
    n = 0
    while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
        n += 1
    ends = [m.end() for m in splitter.finditer(full, 0, n)] if splitter is not None else []
    return ends[-1] if ends else 0


class ChatTemplate:
    """One Jinja chat template and the special-token variables it is rendered with."""

    def __init__(self, source: str, variables: Mapping[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise TokenizerError("chat template must be a non-empty string")
        self.source = source
        self.variables = dict(variables or {})
        compile_template(source)            # a syntax error shows when the tokenizer loads

    def uses(self, text: str) -> bool:
        """Whether ``text`` appears in the template's source (a tag it writes or tests for)."""
        return text in self.source

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               tools: Sequence[Any] | None = None, **kwargs: Any) -> str:
        """The string transformers' ``apply_chat_template(tokenize=False, tools=tools)`` renders."""
        check_messages(messages)
        return self._render(_normalise(messages), add_generation_prompt, kwargs, check_tools(tools))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any],
                tools: list[Any] | None = None) -> str:
        import jinja2

        reserved = sorted(set(kwargs) & RESERVED_KWARGS)
        if reserved:
            raise TokenizerError(f"chat template keyword {reserved[0]!r} is reserved (the template's own variable)")
        variables = {**self.variables, **kwargs}
        template = compile_template(self.source)
        _budget.range_items = MAX_RANGE_ITEMS
        out: list[str] = []
        size = 0
        try:
            for text in template.generate(messages=messages, tools=tools, documents=None,
                                          add_generation_prompt=add_generation_prompt, **variables):
                size += len(text)
                if size > MAX_RENDER_CHARS:
                    raise jinja2.exceptions.SecurityError(f"it writes more than {MAX_RENDER_CHARS} "
                                                          "characters")
                out.append(text)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
        except Exception as e:   # whatever the template's code raises (1/0, MemoryError...) is the template's
            detail = " ".join(str(e).split())[:200]
            raise TokenizerError(f"chat template failed on these messages: {type(e).__name__}"
                                 + (f": {detail}" if detail else "")) from None
        return "".join(out)

    def pieces(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               markup: Iterable[str] = (), tools: Sequence[Any] | None = None, protect: Iterable[str] = (),
               **kwargs: Any) -> tuple[str, list[Piece] | None]:
        """(the rendering, its template/content pieces), pieces None when the template transforms
        content (then the rendering is to be encoded whole, see the module docstring). ``markup``:
        strings (the reasoning tags) that an assistant message's content writes as the template's
        own tokens (template pieces inside that content). ``protect``: the control strings; a tool
        call's name or arguments, or a tool's description or parameters, holding one is content too.
        A template that fails on the sentinels reads the content: pieces None."""
        check_messages(messages)
        tools = check_tools(tools)
        real = self._render(_normalise(messages), add_generation_prompt, kwargs, tools)
        masked, masked_tools, values, markup_owner = _stand_ins(messages, tools, frozenset(protect))
        try:
            parts = _SENTINEL.split(self._render(_normalise(masked), add_generation_prompt, kwargs, masked_tools))
        except TokenizerError:       # a template that refuses the sentinels reads the content: it transforms it
            return real, None
        texts = _fill(parts, values, real)
        if texts is None or any(_NONCE in v for vs in values.values() for v in vs):   # content holding a sentinel
            return real, None                                                          # is never trusted
        splitter = _control_splitter(frozenset(markup))
        out: list[Piece] = []
        for k, (p, text) in enumerate(zip(parts, texts)):
            if not text:
                continue
            if not k % 2:
                out.append(Piece(text, True))
            elif markup_owner.get(p) and splitter is not None:   # assistant content: its reasoning tags are markup
                out += [Piece(x, bool(j % 2)) for j, x in enumerate(splitter.split(text)) if x]
            else:
                out.append(Piece(text, False))
        return real, out

    def assistant_spans(self, messages: Sequence[dict[str, Any]], full: str, control: Iterable[str] = (),
                        tools: Sequence[Any] | None = None, **kwargs: Any) -> list[tuple[int, int]]:
        """Character spans of ``full`` (the rendering of ``messages``) written by the assistant
        (the rule in the module docstring; ``control``: the control-token strings a cut that is not
        a prefix is moved back to)."""
        splitter = _control_splitter(frozenset(control))
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                head = self.render(messages[:i], True, tools, **kwargs)
            except TokenizerError:              # a template that refuses this prefix (roles must alternate...)
                head = self._safe_render(messages[:i], tools, kwargs)
            turn = self._safe_render(messages[:i + 1], tools, kwargs)
            if turn is None or (head is None and i):    # where the turn starts or ends is unknown: no span
                continue
            start, end = (_cut(r or "", full, splitter) for r in (head, turn))
            if end > start:
                spans.append((start, end))
        return spans

    def _safe_render(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None,
                     kwargs: Mapping[str, Any]) -> str | None:
        try:
            return self.render(messages, False, tools, **kwargs)
        except TokenizerError:
            return None


_NEUTRAL = "\ue002"          # what the text of a neutral rendering is made of (in no control string)


def _neutral(messages: Sequence[dict[str, Any]], tools: list[Any] | None, markup: Iterable[str],
             control: Iterable[str], only: Collection[int | str]) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The messages and tools with their text made neutral (the messages whose index is in ``only``,
    the tools when ``"tools"`` is): each character of every content, reasoning, string in a tool
    call's arguments and tool description becomes U+E002, but whitespace (unless a control string
    holds some) and the reasoning tags (``markup``) in an assistant's content stay. The template
    sees text of the same shape (empty stays empty, ``trim`` and a split on the tags work alike)
    from which no transformation makes a control-token string."""
    chars = re.compile(r"(?s)." if any(c.isspace() for t in control for c in t) else r"\S")
    tags = _control_splitter(frozenset(markup))

    def text(s: str, keep_tags: bool = False) -> str:
        parts = tags.split(s) if keep_tags and tags is not None else [s]
        return "".join(p if k % 2 else chars.sub(_NEUTRAL, p) for k, p in enumerate(parts))

    def leaves(value: Any) -> Any:          # the strings of arguments (keys stay: the template may look them up)
        if isinstance(value, str):
            return text(value)
        if isinstance(value, dict):
            return {k: leaves(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [leaves(v) for v in value]
        return value

    out = []
    for i, m in enumerate(messages):
        if i in only:
            m = dict(m)
            for field in ("content", *REASONING_FIELDS):
                if isinstance(m.get(field), str):
                    m[field] = text(m[field], keep_tags=field == "content" and m["role"] == "assistant")
            if m.get("tool_calls"):
                m["tool_calls"] = [{**call, "function": {**call["function"],
                                                         "arguments": leaves(call["function"]["arguments"])}}
                                   for call in m["tool_calls"]]
        out.append(m)
    if tools is not None and "tools" in only:
        tools = [{**t, "function": {**t["function"], "description": text(t["function"]["description"])}}
                 if isinstance(t["function"].get("description"), str) else t for t in tools]
    return out, tools


# How many renderings a refusal spends finding the message to name (each renders the whole chat).
_MAX_SUSPECTS = 32
# Text holding a prefix or suffix of a control string this long (or a whole shorter one), in any
# case, is a suspect (it could complete one across a template's own text, or once lower- or
# upper-cased); shorter pieces ("<t", "|>") are everywhere in ordinary text and code.
_MIN_FRAGMENT = 4


def _fragments(control: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(the casefolded prefixes and suffixes of at least _MIN_FRAGMENT characters of the control
    strings, with those shorter whole; their _MIN_FRAGMENT-character windows, for a quick scan)."""
    parts = set()
    for c in (c.casefold() for c in control):
        parts.add(c)
        parts.update(c[:n] for n in range(_MIN_FRAGMENT, len(c)))
        parts.update(c[-n:] for n in range(_MIN_FRAGMENT, len(c)))
    grams = {p[:_MIN_FRAGMENT] for p in parts}
    return frozenset(parts), frozenset(grams)


def _suspect(text: str, fragments: tuple[frozenset[str], frozenset[str]]) -> bool:
    """Whether ``text`` holds a fragment of a control string (:func:`_fragments`)."""
    parts, grams = fragments
    t = text.casefold()
    starts = [i for i in range(len(t)) if t[i:i + _MIN_FRAGMENT] in grams]
    return any(t.startswith(p, i) for i in starts for p in parts) or any(len(p) < _MIN_FRAGMENT and p in t
                                                                            for p in parts)


def _texts(message: Mapping[str, Any], markup: Iterable[str]) -> str:
    """A message's text a template may rewrite: content (an assistant's reasoning tags left out:
    they are the template's markup there), reasoning, the strings of its tool calls' arguments."""
    parts = [message[f] for f in ("content", *REASONING_FIELDS) if isinstance(message.get(f), str)]
    if message.get("role") == "assistant" and parts and isinstance(message.get("content"), str):
        for tag in markup:
            parts[0] = parts[0].replace(tag, "\n")
    for call in message.get("tool_calls") or ():
        parts.append(json.dumps(call.get("function", {}).get("arguments"), ensure_ascii=False))
    return "\n".join(parts)


def _check_controls(template: ChatTemplate, messages: Sequence[dict[str, Any]], full: str,
                    add_generation_prompt: bool, template_kwargs: Mapping[str, Any], control: Mapping[str, int],
                    markup: Iterable[str], tools: list[Any] | None) -> None:
    """For a template that transforms content (no pieces): the control tokens of ``full`` must be
    exactly those of the chat rendered with the suspect messages' text made neutral (:func:`_neutral`;
    suspects: text holding a fragment of a control string, :func:`_suspect`), so that each one is
    the template's own; otherwise a :class:`TokenizerError` line naming the message whose text makes
    one. Other messages keep their text: a template that branches on it (Qwen3 tests a user turn
    for ``<tool_response>``, Mistral compares turns) renders them as it would."""
    splitter = _control_splitter(frozenset(control))
    if splitter is None:
        return
    fragments = _fragments(control)
    suspects: list[int | str] = [i for i, m in enumerate(messages) if _suspect(_texts(m, markup), fragments)]
    if tools and any(_suspect(t["function"]["description"], fragments) for t in tools
                     if isinstance(t.get("function", {}).get("description"), str)):
        suspects.append("tools")
    if not suspects:                     # no text that could make a control string, whatever the template does
        return
    want = splitter.findall(full)

    def controls(only: Collection[int | str]) -> list[str]:
        neutral, neutral_tools = _neutral(messages, tools, markup, control, only)
        return splitter.findall(template.render(neutral, add_generation_prompt, neutral_tools, **template_kwargs))

    try:
        got = controls(suspects)
    except TokenizerError as e:
        raise TokenizerError(f"this chat template rewrites message text and fails on stand-in text, so the "
                             f"messages cannot be checked for control tokens ({e})") from None
    if got == want:
        return
    where = "the chat messages' text"
    for only in suspects[:_MAX_SUSPECTS]:
        try:
            if controls({only}) != want:
                where = f"chat message {only}: its text" if only != "tools" else "tools: a description"
                break
        except TokenizerError:
            continue
    changes = difflib.SequenceMatcher(None, want, got, autojunk=False).get_opcodes()
    token = next((want[i] for op, i, _, _, _ in changes if op in ("replace", "delete")), None)
    made = f"makes the control token {token!r}" if token else "changes the control tokens"
    raise TokenizerError(f"{where} {made} once this chat template rewrites it, so it cannot be kept as text")


def _json_inner(text: str) -> str:
    """``text`` as it appears inside a JSON string (what ``tojson`` writes between the quotes)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _stand_ins(messages: Sequence[dict[str, Any]], tools: list[Any] | None, protect: frozenset[str]
               ) -> tuple[list[dict[str, Any]], list[Any] | None, dict[str, tuple[str, ...]], dict[str, bool]]:
    """The messages and tools with their content replaced by unique sentinels: (messages, tools,
    sentinel -> the texts it may stand for in the real rendering, sentinel -> whether it is an
    assistant's content). Every content and reasoning string is replaced; a tool call's name and
    arguments, and a tool's description and parameters (each string in them, keys included), only
    when they hold a ``protect`` string (elsewhere they stay template text: templates inspect
    them). Content and reasoning stand for themselves; a tool string may also stand for its
    JSON-escaped form (a template that writes it with ``tojson``), a string inside JSON first for that."""
    values: dict[str, tuple[str, ...]] = {}
    owner: dict[str, bool] = {}
    splitter = _control_splitter(protect)
    holds = (lambda text: splitter.search(text) is not None) if splitter is not None else (lambda text: False)

    def stand_in(text: str, json_first: bool = False, assistant_content: bool = False, raw: bool = False) -> str:
        sentinel = f"\ue000{_NONCE}:{len(values)}\ue001"
        forms = (text,) if raw else (_json_inner(text), text) if json_first else (text, _json_inner(text))
        values[sentinel] = tuple(dict.fromkeys(forms))
        owner[sentinel] = assistant_content
        return sentinel

    def in_json(value: Any) -> Any:
        if isinstance(value, str):
            return stand_in(value, json_first=True) if holds(value) else value
        if isinstance(value, dict):
            return {in_json(k): in_json(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [in_json(v) for v in value]
        return value

    masked = []
    for m in messages:
        m = dict(m)
        for field in ("content", *REASONING_FIELDS):
            if isinstance(m.get(field), str):
                m[field] = stand_in(m[field], assistant_content=field == "content" and m["role"] == "assistant",
                                    raw=True)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call["function"])
                fn["name"] = stand_in(fn["name"]) if holds(fn["name"]) else fn["name"]
                args = fn["arguments"]
                fn["arguments"] = (stand_in(args) if holds(args) else args) if isinstance(args, str) else in_json(args)
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        masked.append(m)
    masked_tools = None
    if tools is not None:
        masked_tools = []
        for tool in tools:
            fn = dict(tool["function"])
            if isinstance(fn.get("description"), str) and holds(fn["description"]):
                fn["description"] = stand_in(fn["description"])
            if "parameters" in fn:
                fn["parameters"] = in_json(fn["parameters"])
            masked_tools.append({**tool, "function": fn})
    return masked, masked_tools, values, owner


def _fill(parts: list[str], values: Mapping[str, tuple[str, ...]], real: str) -> list[str] | None:
    """The text of each part of a sentinel rendering (split on the sentinels) in ``real``: template
    text as it is, each sentinel the first of its forms that ``real`` continues with (and after it
    the next template text); None when the parts do not rebuild ``real`` exactly."""
    texts: list[str] = []
    pos = 0
    for k, part in enumerate(parts):
        if not k % 2:
            if not real.startswith(part, pos):
                return None
            texts.append(part)
            pos += len(part)
            continue
        following = parts[k + 1] if k + 1 < len(parts) else ""
        form = next((f for f in values.get(part, ()) if real.startswith(f, pos)
                     and real.startswith(following, pos + len(f))), None)
        if form is None:
            return None
        texts.append(form)
        pos += len(form)
    return texts if pos == len(real) else None


def _strings(value: Any):
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _content_hazards(messages: Sequence[dict[str, Any]], control: Mapping[str, int], markup: Iterable[str],
                     tools: Sequence[Any] | None = None) -> list[tuple[str, str]]:
    """(where, control string) for each content, reasoning, tool-call name or arguments, or tool
    description or parameters that holds a control-token string, other than ``markup`` (the
    reasoning tags) in an assistant message's content. ``where`` reads "chat message 2: its
    content", "chat message 2: its tool_calls[0].function.arguments", "tools[1].function"."""
    splitter = _control_splitter(frozenset(control))
    if splitter is None:
        return []
    allowed = frozenset(markup)
    out = []

    def first(value: Any, skip: frozenset[str] = frozenset()) -> str | None:
        return next((hit.group(0) for text in _strings(value) for hit in splitter.finditer(text)
                     if hit.group(0) not in skip), None)

    for i, m in enumerate(messages):
        fields = [(f, m.get(f)) for f in ("content", *REASONING_FIELDS)]
        for j, call in enumerate(m.get("tool_calls") or ()):
            fields += [(f"tool_calls[{j}].function.{k}", call["function"].get(k)) for k in ("name", "arguments")]
        for field, value in fields:
            skip = allowed if field == "content" and m.get("role") == "assistant" else frozenset()
            token = first(value, skip)
            if token is not None:
                out.append((f"chat message {i}: its {field}", token))
    for k, tool in enumerate(tools or ()):
        fn = tool["function"]
        token = first([fn.get("description"), fn.get("parameters")])
        if token is not None:
            out.append((f"tools[{k}].function", token))
    return out


def encode_chat(template: ChatTemplate, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: Mapping[str, Any], control: Mapping[str, int],
                encode_text_offsets: Callable[..., tuple[list[int], Offsets]],
                encode_prompt_offsets: Callable[[str], tuple[list[int], Offsets]] | None = None,
                markup: Iterable[str] = (), piecewise: bool = False, *, tools: Sequence[Any] | None = None,
                mask: bool = True) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a chat in any template (the module docstring's paths).

    When no content holds a control-token string, the rendering is encoded whole by
    ``encode_prompt_offsets`` (exactly as ``apply_chat_template(tokenize=True)``); otherwise
    piece by piece (template pieces split on control strings, content as text), which the tests
    prove equal to the whole-string encoding on chats without such strings (``piecewise=True``
    forces it). ``markup``: control strings an assistant's content may hold (the reasoning tags).
    ``tools``: the template's ``tools`` (:func:`check_tools`). ``mask=False``: ids only (a prompt
    for generation; the mask comes back empty and costs nothing). Input nested too deep for Python's
    recursion (a RecursionError anywhere in rendering) is one :class:`TokenizerError` line."""
    try:
        return _encode_chat(template, messages, add_generation_prompt, template_kwargs, control, encode_text_offsets,
                            encode_prompt_offsets, markup, piecewise, tools=tools, mask=mask)
    except RecursionError:
        raise TokenizerError("chat messages or tools nest too deeply to render") from None


def _encode_chat(template: ChatTemplate, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                 template_kwargs: Mapping[str, Any], control: Mapping[str, int],
                 encode_text_offsets: Callable[..., tuple[list[int], Offsets]],
                 encode_prompt_offsets: Callable[[str], tuple[list[int], Offsets]] | None,
                 markup: Iterable[str], piecewise: bool, *, tools: Sequence[Any] | None,
                 mask: bool) -> tuple[list[int], list[int]]:
    markup = tuple(t for t in markup if t in control)
    tools = check_tools(tools)
    full, pieces = template.pieces(messages, add_generation_prompt, markup=markup, tools=tools, protect=control,
                                   **template_kwargs)
    hazards = _content_hazards(messages, control, markup, tools)
    if hazards and pieces is None:
        where, token = hazards[0]
        raise TokenizerError(
            f"{where} holds the control token {token!r}, and this chat template "
            "rewrites message text, so it cannot be kept apart from the template's tokens")
    if pieces is None:
        _check_controls(template, messages, full, add_generation_prompt, template_kwargs, control, markup, tools)
    whole = encode_prompt_offsets is not None and not hazards and not piecewise
    if whole:
        ids, offsets = encode_prompt_offsets(full)
        if pieces is not None:   # a control token formed across a content/template boundary: encode piece-wise
            splitter = _control_splitter(frozenset(control))
            expected = sum(len(splitter.findall(p.text)) for p in pieces if p.template) if splitter else 0
            names = {i: t for t, i in control.items()}
            whole = sum(full[a:b] == names.get(t) for t, (a, b) in zip(ids, offsets)) == expected
    if not whole:
        ids, offsets = encode_pieces_with_offsets(pieces if pieces is not None else [Piece(full, True)], control,
                                                  encode_text_offsets)
    if not mask:
        return ids, []
    spans = template.assistant_spans(messages, full, control, tools=tools, **template_kwargs)
    return ids, mask_from_spans(offsets, spans)


class ChatEncoding:
    """The chat half of a tokenizer, shared by :class:`nanoseek.data.tokenizer.Tokenizer` and the byte
    stand-in. Needs ``chat_template_obj`` (a :class:`ChatTemplate` or None), ``control_tokens``
    (string -> id), ``encode_text`` and ``encode_text_offsets``."""

    chat_template_obj: ChatTemplate | None
    control_tokens: Mapping[str, int]

    def _template(self) -> ChatTemplate:
        if self.chat_template_obj is None:
            raise TokenizerError("this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json "
                                 "and no chat_template.jinja)")
        return self.chat_template_obj

    @property
    def chat_template(self) -> str | None:
        """The Jinja text of the chat template (None when the tokenizer has none)."""
        return None if self.chat_template_obj is None else self.chat_template_obj.source

    think_tags: tuple[str, str] | None = None

    def encode_prompt_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """(ids, character spans) of a rendered chat as ``apply_chat_template(tokenize=True)`` encodes
        it: control-token strings are their ids, the rest text (a vocabulary overrides this with its
        own whole-string encoding)."""
        return encode_pieces_with_offsets([Piece(text, True)], self.control_tokens, self.encode_text_offsets)

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as ``(text, is_template)`` segments: control tokens come
        only from template segments; content segments are text (:func:`encode_pieces`)."""
        return encode_pieces(segments, self.control_tokens, self.encode_text,
                             lambda text: self.encode_text_offsets(text, True)[0])[0]

    @staticmethod
    def thinking_kwargs(thinking: bool | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The template's keywords: the one thinking switch under DeepSeek-V3.1's name ``thinking``
        and Qwen3's ``enable_thinking`` (either may be given; different values are an error)."""
        other = kwargs.get("enable_thinking")
        if thinking is not None and other is not None and bool(other) != bool(thinking):
            raise TokenizerError(f"thinking={str(bool(thinking)).lower()} and enable_thinking="
                                 f"{str(bool(other)).lower()} contradict each other: they are one switch, send one")
        value = bool(next((x for x in (thinking, other) if x is not None), False))
        return {**kwargs, "thinking": value, "enable_thinking": value}

    # ------------------------------------------------------------------ tool use
    location: str | None = None      # the folder the vocabulary was loaded from (named in errors)

    @property
    def tool_tokens(self) -> ToolTokens | None:
        """The ids of DeepSeek-V3.1's seven tool-call tokens when each is one of this vocabulary's
        control tokens (nanoseek's vocabularies since issue 20), else None: this model cannot call tools."""
        return ToolTokens.of(SimpleNamespace(token_to_id=self.control_tokens.get))

    def no_tool_tokens_message(self) -> str:
        """The one line that refuses tools for a vocabulary without the tool-call tokens."""
        where = f"tokenizer at {self.location}" if self.location else "this tokenizer"
        return f"{where} has no tool-call tokens ({TOOL_CALLS_BEGIN}...): this model cannot call tools"

    def require_tool_tokens(self) -> ToolTokens:
        """:attr:`tool_tokens`, or :class:`TokenizerError` with :meth:`no_tool_tokens_message`."""
        tokens = self.tool_tokens
        if tokens is None:
            raise TokenizerError(self.no_tool_tokens_message())
        return tokens

    def _check_tool_use(self, messages: Any, tools: Sequence[Any] | None) -> None:
        """Tools (and, in a template that writes V3.1's tool tokens, tool turns) need the tool tokens;
        ``tools=[]`` asks for nothing."""
        if tools or (has_tool_turns(messages) and self.chat_template_obj is not None
                     and any(map(self.chat_template_obj.uses, TOOL_TOKENS))):
            self.require_tool_tokens()

    # ------------------------------------------------------------------ chats
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            thinking: bool | None = None, tools: Sequence[Any] | None = None,
                            **template_kwargs: Any) -> str:
        """The chat rendered as one string, as transformers renders it (``thinking`` (alias
        ``enable_thinking``, default off) and any other keyword are template variables; ``tools``:
        OpenAI function tools or ToolSpecs, see :meth:`encode_chat`). For display and parity: encode
        chats with :meth:`encode_chat`."""
        self._check_tool_use(messages, tools)
        return self._template().render(messages, add_generation_prompt, tools,
                                       **self.thinking_kwargs(thinking, template_kwargs))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    thinking: bool | None = None, tools: Sequence[Any] | None = None,
                    **template_kwargs: Any) -> tuple[list[int], list[int]]:
        """(token ids, assistant mask) of the chat: control tokens only from the template (and the
        reasoning tags written in an assistant message's content), other content and reasoning as
        text; ``mask[t]`` is 1 on what an assistant message wrote (its reasoning block, answer, tool
        calls and closing token; never a tool's output). Ids equal transformers'
        ``apply_chat_template(tokenize=True, tools=tools)`` for content without control-token
        strings, and decode to :meth:`apply_chat_template`. ``tools``: OpenAI function tools
        (``{"type": "function", "function": {...}}``) or :class:`~nanoseek.tools.format.ToolSpec`
        objects, described in the system turn; tools on a vocabulary without the tool-call tokens
        are one :class:`TokenizerError` line (:meth:`no_tool_tokens_message`)."""
        self._check_tool_use(messages, tools)
        return encode_chat(self._template(), messages, add_generation_prompt,
                           self.thinking_kwargs(thinking, template_kwargs), self.control_tokens,
                           self.encode_text_offsets, self.encode_prompt_offsets, markup=self.think_tags or (),
                           tools=tools)

    def encode_chat_prompt(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                           thinking: bool | None = None, tools: Sequence[Any] | None = None,
                           **template_kwargs: Any) -> list[int]:
        """The ids of :meth:`encode_chat` without the loss mask (a prompt for generation: the mask
        renders every prefix of the chat again, which a long tool-using chat pays for each turn)."""
        self._check_tool_use(messages, tools)
        return encode_chat(self._template(), messages, add_generation_prompt,
                           self.thinking_kwargs(thinking, template_kwargs), self.control_tokens,
                           self.encode_text_offsets, self.encode_prompt_offsets, markup=self.think_tags or (),
                           tools=tools, mask=False)[0]


__all__ = ["TokenizerError", "Piece", "ChatTemplate", "ChatEncoding", "encode_pieces", "encode_pieces_with_offsets",
           "encode_chat", "mask_from_spans", "RESERVED_KWARGS", "check_messages", "check_tools", "has_tool_turns",
           "compile_template", "REASONING_FIELDS", "TEMPLATE_TOKEN_NAMES"]
