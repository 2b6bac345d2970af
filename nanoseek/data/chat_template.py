"""Any tokenizer's Jinja chat template, rendered as transformers renders it, encoded so content stays text.

A checkpoint's tokenizer brings its own chat template (``chat_template`` in
``tokenizer_config.json`` or ``chat_template.jinja``); nanoseek's own template
(:data:`nanoseek.data.tokenizer.CHAT_TEMPLATE`) is one such template. This module is everything
between a list of messages and token ids, for every template alike:

* **Rendering** (:class:`ChatTemplate`, :meth:`~ChatTemplate.render`) is transformers'
  ``apply_chat_template(tokenize=False)``: a jinja2 ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks``/``lstrip_blocks`` and ``loopcontrols``, the globals ``raise_exception``,
  ``strftime_now``, ``namespace`` and ``dict``, transformers' ``tojson`` filter, the variables
  ``messages``, ``tools=None``, ``documents=None``, ``add_generation_prompt``, the tokenizer's
  named special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword (``thinking``...).
  Messages are normalised the same way: keys whose value is None are dropped, and a reasoning
  field (``reasoning_content``, ``thinking`` or ``reasoning``) is copied under the first two names.
  A template error (``raise_exception``, a syntax error, a sandbox violation) is one
  :class:`TokenizerError` line.
* **Only the template makes control tokens** (:meth:`~ChatTemplate.pieces`). The chat is rendered
  twice: with the real messages, and with every content and reasoning string replaced by a unique
  sentinel. When putting the strings back into the sentinel rendering gives the real rendering
  exactly, the template used them verbatim, and the prompt can be cut into template text and
  content. Encoding (:func:`encode_chat`):

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
    :class:`TokenizerError` naming the message.
  - **Reasoning tags in an assistant's content** (``<think>...</think>answer``, the common SFT form
    and what a client sends back) are the template's markup there, not a control-token string
    to neutralise: rendered and encoded as transformers does (R1/V3.1 drop them from history).
    In system, user and tool content and in reasoning fields they stay text (or refused, above).
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
  text). A token is trained when its characters overlap a span (transformers' ``{% generation %}``
  rule).

``{% generation %}`` blocks (transformers' assistant-mask marker) are rendered as their body.
Deliberately left out: tools and documents (rendered as None), multimodal content (content must
be a string), ``continue_final_message``, added tokens with ``lstrip``/``rstrip`` (matched
literally).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple


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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from None


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Messages are dicts with a string ``role`` and ``content``; reasoning, when given, a string on
    an assistant message. Which roles a template accepts is the template's business."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"chat messages must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str):
            raise TokenizerError(f"chat message {i}: 'role' must be a string, got {type(m['role']).__name__}")
        if not isinstance(m["content"], str):
            raise TokenizerError(f"chat message {i}: 'content' must be a string, got {type(m['content']).__name__}")
        for field in REASONING_FIELDS:
            value = m.get(field)
            if value is not None and (m["role"] != "assistant" or not isinstance(value, str)):
                raise TokenizerError(f"chat message {i}: '{field}' (reasoning) must be a string on an assistant message")


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

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The string transformers' ``apply_chat_template(tokenize=False)`` renders."""
        check_messages(messages)
        return self._render(_normalise(messages), add_generation_prompt, kwargs)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any]) -> str:
        import jinja2

        reserved = sorted(set(kwargs) & RESERVED_KWARGS)
        if reserved:
            raise TokenizerError(f"chat template keyword {reserved[0]!r} is reserved (the template's own variable)")
        variables = {**self.variables, **kwargs}
        try:
            return compile_template(self.source).render(messages=messages, tools=None, documents=None,
                                                        add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TokenizerError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None

    def pieces(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               markup: Iterable[str] = (), **kwargs: Any) -> tuple[str, list[Piece] | None]:
        """(the rendering, its template/content pieces), pieces None when the template transforms
        content (then the rendering is to be encoded whole, see the module docstring). ``markup``:
        strings (the reasoning tags) that an assistant message's content writes as the template's
        own tokens (template pieces inside that content)."""
        check_messages(messages)
        real = self._render(_normalise(messages), add_generation_prompt, kwargs)
        values: dict[str, str] = {}
        owner: dict[str, str] = {}
        nonce = _NONCE
        masked = []
        for i, m in enumerate(messages):
            m = dict(m)
            for field in ("content", *REASONING_FIELDS):
                if isinstance(m.get(field), str):
                    sentinel = f"\ue000{nonce}:{i}:{field}\ue001"
                    values[sentinel] = m[field]
                    owner[sentinel] = "assistant-content" if field == "content" and m["role"] == "assistant" else ""
                    m[field] = sentinel
            masked.append(m)
        sentinel_render = self._render(_normalise(masked), add_generation_prompt, kwargs)
        parts = _SENTINEL.split(sentinel_render)
        pieces = [Piece(values[p], False) if k % 2 else Piece(p, True) for k, p in enumerate(parts)
                  if (k % 2 and p in values) or (not k % 2 and p)]
        if (any(k % 2 and p not in values for k, p in enumerate(parts)) or "".join(p.text for p in pieces) != real
                or any(_NONCE in v for v in values.values())):       # content holding a sentinel: never trusted
            return real, None
        splitter = _control_splitter(frozenset(markup))
        out: list[Piece] = []
        for k, p in enumerate(parts):
            if not p:
                continue
            if not k % 2:
                out.append(Piece(p, True))
            elif owner[p] and splitter is not None:      # assistant content: its reasoning tags are markup
                out += [Piece(x, bool(j % 2)) for j, x in enumerate(splitter.split(values[p])) if x]
            else:
                out.append(Piece(values[p], False))
        return real, out

    def assistant_spans(self, messages: Sequence[dict[str, Any]], full: str, control: Iterable[str] = (),
                        **kwargs: Any) -> list[tuple[int, int]]:
        """Character spans of ``full`` (the rendering of ``messages``) written by the assistant
        (the rule in the module docstring; ``control``: the control-token strings a cut that is not
        a prefix is moved back to)."""
        splitter = _control_splitter(frozenset(control))
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                head = self.render(messages[:i], True, **kwargs)
            except TokenizerError:              # a template that refuses this prefix (roles must alternate...)
                head = self._safe_render(messages[:i], kwargs)
            turn = self._safe_render(messages[:i + 1], kwargs)
            start, end = (_cut(r, full, splitter) for r in (head, turn))
            if end > start:
                spans.append((start, end))
        return spans

    def _safe_render(self, messages: Sequence[dict[str, Any]], kwargs: Mapping[str, Any]) -> str:
        try:
            return self.render(messages, False, **kwargs)
        except TokenizerError:
            return ""


def _content_hazards(messages: Sequence[dict[str, Any]], control: Mapping[str, int], markup: Iterable[str]
                     ) -> list[tuple[int, str, str]]:
    """(message, field, control string) where a content or reasoning string holds a control-token
    string, other than ``markup`` (the reasoning tags) in an assistant message's content."""
    splitter = _control_splitter(frozenset(control))
    allowed = frozenset(markup)
    out = []
    for i, m in enumerate(messages):
        for field in ("content", *REASONING_FIELDS):
            value = m.get(field)
            if not isinstance(value, str) or splitter is None:
                continue
            for hit in splitter.finditer(value):
                if not (field == "content" and m.get("role") == "assistant" and hit.group(0) in allowed):
                    out.append((i, field, hit.group(0)))
                    break
    return out


def encode_chat(template: ChatTemplate, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: Mapping[str, Any], control: Mapping[str, int],
                encode_text_offsets: Callable[..., tuple[list[int], Offsets]],
                encode_prompt_offsets: Callable[[str], tuple[list[int], Offsets]] | None = None,
                markup: Iterable[str] = (), piecewise: bool = False) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a chat in any template (the module docstring's paths).

    When no content holds a control-token string, the rendering is encoded whole by
    ``encode_prompt_offsets`` (exactly as ``apply_chat_template(tokenize=True)``); otherwise
    piece by piece (template pieces split on control strings, content as text), which the tests
    prove equal to the whole-string encoding on chats without such strings (``piecewise=True``
    forces it). ``markup``: control strings an assistant's content may hold (the reasoning tags)."""
    markup = tuple(t for t in markup if t in control)
    full, pieces = template.pieces(messages, add_generation_prompt, markup=markup, **template_kwargs)
    hazards = _content_hazards(messages, control, markup)
    if hazards and pieces is None:
        i, field, token = hazards[0]
        raise TokenizerError(
            f"chat message {i}: its {field} holds the control token {token!r}, and this chat template "
            "rewrites message text, so it cannot be kept apart from the template's tokens")
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
    spans = template.assistant_spans(messages, full, control, **template_kwargs)
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

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            thinking: bool | None = None, **template_kwargs: Any) -> str:
        """The chat rendered as one string, as transformers renders it (``thinking`` (alias
        ``enable_thinking``, default off) and any other keyword are template variables). For display
        and parity: encode chats with :meth:`encode_chat`."""
        return self._template().render(messages, add_generation_prompt, **self.thinking_kwargs(thinking, template_kwargs))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    thinking: bool | None = None, **template_kwargs: Any) -> tuple[list[int], list[int]]:
        """(token ids, assistant mask) of the chat: control tokens only from the template (and the
        reasoning tags written in an assistant message's content), other content and reasoning as
        text; ``mask[t]`` is 1 on what an assistant message wrote (its reasoning block, answer and
        closing token). Ids equal transformers' ``apply_chat_template(tokenize=True)`` for content
        without control-token strings, and decode to :meth:`apply_chat_template`."""
        return encode_chat(self._template(), messages, add_generation_prompt,
                           self.thinking_kwargs(thinking, template_kwargs), self.control_tokens,
                           self.encode_text_offsets, self.encode_prompt_offsets, markup=self.think_tags or ())


__all__ = ["TokenizerError", "Piece", "ChatTemplate", "ChatEncoding", "encode_pieces", "encode_pieces_with_offsets",
           "encode_chat", "mask_from_spans", "RESERVED_KWARGS", "check_messages", "compile_template", "REASONING_FIELDS",
           "TEMPLATE_TOKEN_NAMES"]
