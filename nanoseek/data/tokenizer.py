"""A byte-level BPE vocabulary: nanoseek's own, trained here, or any checkpoint's ``tokenizer.json``.

:class:`Tokenizer` is one vocabulary (HuggingFace ``tokenizers``) with the settings of its
``tokenizer_config.json``: BOS/EOS/pad names and the chat template. Every tokenizer goes through
the same path; nanoseek's own is the case whose settings are nanoseek's defaults.

**Loading** (:meth:`Tokenizer.load`, what serve/generate/chat/eval/post-training use through the
checkpoint loaders) reads, from the folder of ``tokenizer.json``:

* ``tokenizer_config.json``: ``bos_token``/``eos_token``/``pad_token`` (and the other named
  special tokens transformers passes to templates), each a string or an AddedToken dict
  ``{"content": ...}``; ``chat_template`` as a string or HF's list of named templates (the one
  named ``default``); ``add_bos_token`` (kept when saving and for GGUF; string prompts follow
  ``tokenizer.json``'s post-processor, as transformers 5.x does). Without the file the settings
  are nanoseek's own.
* ``chat_template.jinja`` (transformers' newer file) wins over the config's template, as in
  transformers; ``special_tokens_map.json`` (legacy) overrides named tokens, as in transformers.
* ``generation_config.json``'s ``eos_token_id`` (an int or a list), when it is beside them: more
  stop ids (:attr:`Tokenizer.stop_ids`).

BOS is optional (ChatML vocabularies have none), EOS is required, pad falls back to EOS (as HF
generation does). A missing or broken file, or a token name not in the vocabulary, is one
:class:`TokenizerError` line naming the file and the key. **Template upgrade table**
(:data:`TEMPLATE_UPGRADES`): a config whose template is exactly an older nanoseek template is read
as the current one (before issue 19 the thinking switch was called ``think``; it is DeepSeek-V3.1's
``thinking`` now, with the same ids; before issue 20 the template had no tools: the current one
renders every chat without tools to the same text, and refuses tools in one line on a vocabulary
without the tool tokens, see below).

**nanoseek's own tokenizer** (:meth:`Tokenizer.train`, :meth:`Tokenizer.save`):

* **Byte-level BPE.** A ByteLevel pre-tokenizer and decoder with all 256 bytes in the initial
  alphabet: every unicode string (emoji, CJK, control characters, NUL) encodes and decodes back
  unchanged, and there is no unknown token. No normaliser, so nothing is rewritten.
* **Digits one by one.** A ``Digits(individual_digits=True)`` pre-tokenizer runs first, so
  ``12345`` is always the five tokens ``1 2 3 4 5``. Arithmetic is central to the embedded corpus
  and to the RL tasks: with one token per digit, column ``k`` of a sum is always the ``k``-th
  digit token and the carry rule is the same at every position, whereas a learned merge like
  ``"23"`` would give each number an arbitrary segmentation (LLaMA and DeepSeek's own tokenizers
  split numbers for the same reason; DeepSeek-V3 uses groups of up to three digits).
* **Special tokens** carry DeepSeek-V3/R1's names and each is a single id, the first ids of the
  vocabulary (:data:`SPECIAL_TOKENS`): BOS ``<｜begin▁of▁sentence｜>`` (0), EOS
  ``<｜end▁of▁sentence｜>`` (1), padding ``<｜▁pad▁｜>`` (2), the roles ``<｜User｜>`` (3) and
  ``<｜Assistant｜>`` (4), and the reasoning delimiters ``<think>`` (5) and ``</think>`` (6). As in
  R1's released tokenizer, ``<think>`` and ``</think>`` are not marked "special" for HF
  (``skip_special_tokens`` keeps them visible). DeepSeek-V3.1's seven tool-call tokens follow
  (:data:`VOCAB_SPECIAL_TOKENS`, ids 7..13: ``<｜tool▁calls▁begin｜>``, ``<｜tool▁call▁begin｜>``,
  ``<｜tool▁sep｜>``, ``<｜tool▁call▁end｜>``, ``<｜tool▁calls▁end｜>``, ``<｜tool▁output▁begin｜>``,
  ``<｜tool▁output▁end｜>``), special (hidden by ``skip_special_tokens``); vocabularies trained
  before issue 20 lack them and load and encode as before, but cannot call tools.
  A ``TemplateProcessing`` post-processor prepends BOS for HF's ``add_special_tokens=True``, as
  DeepSeek's tokenizer does.
* **Chat template** (:data:`CHAT_TEMPLATE`, DeepSeek-R1 style with V3.1's tool use; one line, wrapped here)::

      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>
      <think>\\n{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>

  System messages (joined by a blank line) go right after BOS; an assistant message's optional
  ``reasoning`` is wrapped in ``<think>``; ``add_generation_prompt`` appends ``<｜Assistant｜>``
  (and ``<think>\\n`` with ``thinking=True``, forcing R1-style reasoning). With ``tools``, the
  system text is followed by ``"\\n\\n"`` and V3.1's description of them
  (:func:`nanoseek.tools.format.tools_system_text`, the same text). An assistant message's
  ``tool_calls`` follow its text as V3.1's block (``arguments`` verbatim when a string, else
  ``tojson``) before its ``<｜end▁of▁sentence｜>``; a ``tool`` message is
  ``<｜tool▁output▁begin｜>{output}<｜tool▁output▁end｜>``; an assistant message after tool outputs
  gets no ``<｜Assistant｜>`` header (it goes on), and neither does the generation prompt there::

      ...<｜Assistant｜>[<think>..</think>\\n\\n][text]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME
      <｜tool▁sep｜>ARGS<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁output▁begin｜>OUT
      <｜tool▁output▁end｜>[<think>..</think>\\n\\n]answer<｜end▁of▁sentence｜>

  :attr:`Tokenizer.tool_tokens` gives the ids (None without them; ``require_tool_tokens`` is the
  one-line refusal callers use).

**Encoding.** The control tokens (:attr:`control_tokens`) are the vocabulary's SPECIAL added
tokens, plus the reasoning tags (and V3.1's tool-call tokens) when they are added tokens the
template writes (non-special in R1's and nanoseek's vocabulary, DeepSeek's tool tokens: template-only
markup). Other added tokens (GPT-NeoX's whitespace
runs, words added with ``add_tokens``; ``<think>`` of a vocabulary whose template never writes it)
are ordinary vocabulary that text reaches as in HF. :meth:`Tokenizer.encode` parses every
added-token string as HF's ``tokenizer(text)`` does, and with ``add_bos`` adds what transformers
adds: it is for raw model input (a ``/v1/completions`` prompt, ``generate``'s ``{"prompt"}``), never
for message content. :meth:`Tokenizer.encode_text` encodes with a copy of the vocabulary whose
control tokens are renamed out of reach (every id stays), so a control-token string in text stays
text and decodes back to itself; documents of a corpus are encoded this way. The model's unknown
token (WordPiece ``[UNK]``, Unigram ``<unk>``) is not out of reach: unknown characters encode to
it as in HF. Any error the tokenizers library raises while encoding is a :class:`TokenizerError`
(a ValueError: the server answers 400). Chats are rendered and encoded by
:mod:`nanoseek.data.chat_template` (``encode_chat``, ``apply_chat_template``), with the thinking
switch (passed as ``thinking`` and ``enable_thinking``) and any other keyword passed to the template.

**Reasoning tags** (:attr:`Tokenizer.think_tags`): ``("<think>", "</think>")`` when the template
writes them or the vocabulary has them as tokens, else None (then the engine's reasoning split is
off); :attr:`think_id`/:attr:`end_think_id` are their ids when each is one token.

The tokenizer hash (sha256 of the canonical ``tokenizer.json``) identifies the vocabulary; token
shards record it and refuse to load with a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from nanoseek.data.chat_template import (TEMPLATE_TOKEN_NAMES, ChatEncoding, ChatTemplate, Piece, TokenizerError,
                                         encode_pieces)
from nanoseek.tools.format import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN,
                                   TOOL_OUTPUT_END, TOOL_SEP, TOOL_TOKENS, TOOLS_FOOTER, TOOLS_HEADER)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
# nanoseek's own vocabulary: these are its first ids, in this order (BOS 0, EOS 1, ...); the byte
# stand-in (nanoseek.data.bytetok) puts them after the 256 bytes.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK)
# ...followed in a vocabulary trained here by DeepSeek-V3.1's seven tool-call tokens (ids 7..13),
# special (skip_special_tokens hides them). Vocabularies trained before issue 20 end at 6.
VOCAB_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + TOOL_TOKENS
# Tokens HF should treat as content, not control (skip_special_tokens keeps them), as in R1.
VISIBLE_SPECIAL_TOKENS = {THINK, END_THINK}
MIN_VOCAB_SIZE = 256 + len(VOCAB_SPECIAL_TOKENS)
THINK_TAGS = (THINK, END_THINK)


def _lit(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _nanoseek_template(thinking: str) -> str:
    """nanoseek's chat template before tool use (issue 20), its thinking switch read from ``thinking``:
    the older templates :data:`TEMPLATE_UPGRADES` maps to the current one."""
    return (
        "{%- set ns = namespace(system='', seen=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}"
        "{%- if ns.seen -%}{%- set ns.system = ns.system + '\\n\\n' + m['content'] -%}"
        "{%- else -%}{%- set ns.system = m['content'] -%}{%- set ns.seen = true -%}{%- endif -%}"
        "{%- elif m['role'] not in ['user', 'assistant'] -%}"
        "{{- raise_exception('unknown chat role: ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- bos_token + ns.system -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- '" + USER + "' + m['content'] -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{- '" + ASSISTANT + "' -}}"
        "{%- if m.get('reasoning') is not none -%}"
        "{{- '" + THINK + "\\n' + m['reasoning'] + '\\n" + END_THINK + "\\n\\n' -}}"
        "{%- endif -%}"
        "{{- m['content'] + '" + EOS + "' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '" + ASSISTANT + "' -}}"
        "{%- if " + thinking + " is defined and " + thinking + " -%}{{- '" + THINK + "\\n' -}}{%- endif -%}"
        "{%- endif -%}"
    )


def _nanoseek_tool_template() -> str:
    """nanoseek's chat template: the one above plus DeepSeek-V3.1's tool use (module docstring)."""
    return (
        "{%- set ns = namespace(system='', seen=false, tool=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}"
        "{%- if ns.seen -%}{%- set ns.system = ns.system + '\\n\\n' + m['content'] -%}"
        "{%- else -%}{%- set ns.system = m['content'] -%}{%- set ns.seen = true -%}{%- endif -%}"
        "{%- elif m['role'] not in ['user', 'assistant', 'tool'] -%}"
        "{{- raise_exception('unknown chat role: ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        # the tools, described as V3.1 does (nanoseek.tools.format.tools_system_text writes the same)
        "{%- if tools -%}"
        "{%- set ns.system = ns.system + '\\n\\n' + " + _lit(TOOLS_HEADER) + " -%}"
        "{%- for t in tools -%}"
        "{%- set p = t['function'].get('parameters') -%}"
        "{%- if p is none -%}{%- set p = {'type': 'object', 'properties': {}} -%}{%- endif -%}"
        "{%- set ns.system = ns.system + '\\n### ' + t['function']['name'] + '\\nDescription: ' + "
        "(t['function'].get('description') or '') + '\\n\\nParameters: ' + p | tojson + '\\n' -%}"
        "{%- endfor -%}"
        "{%- set ns.system = ns.system + " + _lit(TOOLS_FOOTER) + " -%}"
        "{%- endif -%}"
        "{{- bos_token + ns.system -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- '" + USER + "' + m['content'] -}}"
        "{%- set ns.tool = false -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- if not ns.tool -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"   # after tool outputs: no header
        "{%- if m.get('reasoning') is not none -%}"
        "{{- '" + THINK + "\\n' + m['reasoning'] + '\\n" + END_THINK + "\\n\\n' -}}"
        "{%- endif -%}"
        "{{- m.get('content', '') -}}"
        "{%- if m.get('tool_calls') -%}"
        "{{- '" + TOOL_CALLS_BEGIN + "' -}}"
        "{%- for c in m['tool_calls'] -%}"
        "{%- set a = c['function']['arguments'] -%}"
        "{{- '" + TOOL_CALL_BEGIN + "' + c['function']['name'] + '" + TOOL_SEP + "' + "
        "(a if a is string else a | tojson) + '" + TOOL_CALL_END + "' -}}"
        "{%- endfor -%}"
        "{{- '" + TOOL_CALLS_END + "' -}}"
        "{%- endif -%}"
        "{{- '" + EOS + "' -}}"
        "{%- set ns.tool = false -%}"
        "{%- elif m['role'] == 'tool' -%}"
        "{{- '" + TOOL_OUTPUT_BEGIN + "' + m['content'] + '" + TOOL_OUTPUT_END + "' -}}"
        "{%- set ns.tool = true -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and not ns.tool -%}"     # after tool outputs the reply goes on
        "{{- '" + ASSISTANT + "' -}}"
        "{%- if thinking is defined and thinking -%}{{- '" + THINK + "\\n' -}}{%- endif -%}"
        "{%- endif -%}"
    )


# nanoseek's chat template (Jinja), what tokenizer_config.json carries.
CHAT_TEMPLATE = _nanoseek_tool_template()
# Older nanoseek templates, read as the current one: they render every chat without tools to the
# same text (tested), and the current one refuses tools on a vocabulary without the tool tokens
# with one clear line (an old checkpoint's), where the old ones would fail on a 'tool' role or
# drop the tools silently. Before issue 19 the thinking switch was called ``think``.
TEMPLATE_UPGRADES: dict[str, str] = {_nanoseek_template("think"): CHAT_TEMPLATE,
                                     _nanoseek_template("thinking"): CHAT_TEMPLATE}
# The settings of nanoseek's own tokenizer: what Tokenizer(hf) assumes without a config.
NANOSEEK_CONFIG: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}


def _canonical_hash(tokenizer_json: str) -> str:
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _never_prepend(node: Any) -> Any:
    """A pre-tokenizer spec with Metaspace's ``prepend_scheme="first"`` turned to ``"never"`` (recursively)."""
    if isinstance(node, dict):
        out = {k: _never_prepend(v) for k, v in node.items()}
        if out.get("type") == "Metaspace" and out.get("prepend_scheme") == "first":
            out["prepend_scheme"] = "never"
        return out
    if isinstance(node, list):
        return [_never_prepend(v) for v in node]
    return node


def _text_only(hf_tokenizer: _HFTokenizer, control: Mapping[str, int], keep_id: int | None
               ) -> tuple[_HFTokenizer, _HFTokenizer]:
    """Copies of ``hf_tokenizer`` that encode every string as text: (for a run at the start of a
    string, for a run after a control token).

    In the copies the ``control`` added tokens and their model's entries are renamed to a NUL byte
    and a per-process random nonce (so nothing in text matches them; other added tokens stay, as in
    HF, and every id stays where it is), so no text reaches a control id, except ``keep_id`` (the
    model's unknown token: its model entry stays, so unknown text reaches it). The second copy
    never prepends Metaspace's ``▁`` (``prepend_scheme="first"``: HF prepends it only at the start
    of the whole string). ``encode_text`` still checks.
    """
    spec = json.loads(hf_tokenizer.to_str())
    hidden = {token_id: f"\x00{secrets.token_hex(8)}:{token_id}" for token_id in control.values()}
    for t in spec.get("added_tokens", []):   # renamed, not removed: the ids of the added tokens after them stay
        if t.get("content") in control:
            t.update(content=hidden[t["id"]], normalized=False, lstrip=False, rstrip=False, single_word=False)
    spec["post_processor"] = None
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for token, token_id in control.items():
            if vocab.get(token) == token_id and token_id != keep_id:
                del vocab[token]
                vocab[hidden[token_id]] = token_id
    elif isinstance(vocab, list):     # Unigram: [piece, score] by id
        for token, token_id in control.items():
            entry = vocab[token_id] if 0 <= token_id < len(vocab) else None
            if isinstance(entry, list) and entry and entry[0] == token and token_id != keep_id:
                entry[0] = hidden[token_id]
    inner = dict(spec, pre_tokenizer=_never_prepend(spec.get("pre_tokenizer")))
    text = _HFTokenizer.from_str(json.dumps(spec))
    return text, text if inner == spec else _HFTokenizer.from_str(json.dumps(inner))


def _unk_id(hf_tokenizer: _HFTokenizer) -> int | None:
    """The id of the model's unknown token (WordPiece/BPE ``unk_token``, Unigram ``unk_id``), or None."""
    model = json.loads(hf_tokenizer.to_str()).get("model", {})
    if isinstance(model.get("unk_id"), int):
        return model["unk_id"]
    return hf_tokenizer.token_to_id(model["unk_token"]) if isinstance(model.get("unk_token"), str) else None


def _encoding(tk: _HFTokenizer, text: str, add_special_tokens: bool = False):
    """``tk.encode`` with every error of the tokenizers library as one :class:`TokenizerError` line."""
    try:
        return tk.encode(text, add_special_tokens=add_special_tokens)
    except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
        raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e
    except Exception as e:  # the Rust library raises plain Exception (e.g. a WordPiece without its unk token)
        raise TokenizerError(f"this tokenizer cannot encode the text {text[:40]!r}: {e}") from e


def _token_name(config: Mapping[str, Any], key: str, source: str) -> str | None:
    """A named special token of a config: a string, an AddedToken dict ``{"content": ...}`` or None."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{source}: {key} must be a string or an AddedToken dict with 'content', got {value!r}")
    return value


def _config_template(config: Mapping[str, Any], source: str) -> str | None:
    """``chat_template`` of a config: a string, or HF's list of ``{"name", "template"}`` (the default)."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{source}: chat_template is a list of named templates without one named "
                                 f"'default' (names: {sorted(map(str, named))})")
        value = named["default"]
    elif isinstance(value, dict):
        if "default" not in value:
            raise TokenizerError(f"{source}: chat_template has no 'default' template (names: {sorted(value)})")
        value = value["default"]
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{source}: chat_template must be a string, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class Tokenizer(ChatEncoding):
    """A byte-level BPE vocabulary with its special tokens and chat template (module docstring).

    ``config``: the ``tokenizer_config.json`` settings (None: nanoseek's own, :data:`NANOSEEK_CONFIG`);
    ``chat_template``: a template that wins over the config's (``chat_template.jinja``);
    ``extra_stop_ids``: more ids that end a generation (``generation_config.json``); ``source``
    names the settings in errors; ``location``: the folder it was loaded from (named when tools are
    asked of a vocabulary without the tool tokens).
    """

    def __init__(self, hf_tokenizer: _HFTokenizer, config: Mapping[str, Any] | None = None, *,
                 chat_template: str | None = None, extra_stop_ids: Iterable[int] = (),
                 source: str = "tokenizer_config.json", location: str | None = None):
        self._tk = hf_tokenizer
        self.location = location
        self.config = dict(NANOSEEK_CONFIG if config is None else config)
        names = {key: _token_name(self.config, key, source) for key in TEMPLATE_TOKEN_NAMES}
        self.special_tokens_map = {k: v for k, v in names.items() if v is not None}   # the template's variables
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        if self.eos_token is None:
            raise TokenizerError(f"{source}: no eos_token (every chat model needs one to stop)")
        for key in ("bos_token", "eos_token", "pad_token"):
            if names[key] is not None and hf_tokenizer.token_to_id(names[key]) is None:
                raise TokenizerError(f"{source}: {key} {names[key]!r} is not in the vocabulary")
        self.bos_id = None if self.bos_token is None else hf_tokenizer.token_to_id(self.bos_token)
        self.eos_id = hf_tokenizer.token_to_id(self.eos_token)
        # what starts a document in packed pre-training rows and few-shot prompts: BOS, else EOS
        # (vocabularies without BOS separate documents with their end token, as GPT-2 and Qwen do)
        self.document_start_id = self.eos_id if self.bos_id is None else self.bos_id
        self.pad_token = names["pad_token"] or self.eos_token
        self.pad_id = hf_tokenizer.token_to_id(self.pad_token)
        add_bos = self.config.get("add_bos_token")
        self.add_bos_token = bool(add_bos) if add_bos is not None else None
        V = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        extra = []
        for t in extra_stop_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
                raise TokenizerError(f"generation_config.json: eos_token_id {t!r} is not a token id of this "
                                     f"vocabulary [0, {V})")
            extra.append(t)
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *extra]))
        template = chat_template if chat_template is not None else _config_template(self.config, source)
        template = TEMPLATE_UPGRADES.get(template, template)
        try:
            self.chat_template_obj = None if template is None else ChatTemplate(template, self.special_tokens_map)
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None
        self.hash = _canonical_hash(hf_tokenizer.to_str())
        # control tokens: the SPECIAL added tokens, and the reasoning tags and V3.1's tool-call tokens
        # when they are added tokens the template writes (R1 leaves <think> non-special); only template
        # pieces produce them. Other added tokens (whitespace runs, user words) are ordinary vocabulary, as in HF.
        uses = self.chat_template_obj is not None and all(map(self.chat_template_obj.uses, THINK_TAGS))
        writes_tools = self.chat_template_obj is not None and any(map(self.chat_template_obj.uses, TOOL_TOKENS))
        markup = set(THINK_TAGS if uses else ()) | set(TOOL_TOKENS if writes_tools else ())
        added = hf_tokenizer.get_added_tokens_decoder()
        self.control_tokens = {t.content: i for i, t in added.items() if t.special or t.content in markup}
        self.unk_id = _unk_id(hf_tokenizer)
        self._control_ids = frozenset(self.control_tokens.values())
        self._forbidden_ids = self._control_ids - {self.unk_id}      # the unknown token is reachable from text
        self.special_ids = self._control_ids
        self._text_tk, self._inner_tk = _text_only(hf_tokenizer, self.control_tokens, self.unk_id)
        self._whole_tk = _HFTokenizer.from_str(hf_tokenizer.to_str())    # same ids; offsets untrimmed
        self._whole_tk.post_processor = None
        in_vocab = all(t in self.control_tokens or any(a.content == t for a in added.values()) for t in THINK_TAGS)
        self.think_tags: tuple[str, str] | None = THINK_TAGS if uses or in_vocab else None
        single = {t: _encoding(hf_tokenizer, t).ids if self.think_tags else [] for t in THINK_TAGS}
        self.think_id = single[THINK][0] if len(single[THINK]) == 1 else None
        self.end_think_id = single[END_THINK][0] if len(single[END_THINK]) == 1 else None

    # ------------------------------------------------------------------ training and files
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on ``texts``; ``vocab_size`` counts the 256 bytes and the special tokens.

        A small corpus may run out of merges before ``vocab_size``: :attr:`vocab_size` is the size
        actually reached.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: need at least {MIN_VOCAB_SIZE} "
                                 f"(256 bytes + {len(VOCAB_SPECIAL_TOKENS)} special tokens)")
        tk = _HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tk.decoder = decoders.ByteLevel()
        specials = list(VOCAB_SPECIAL_TOKENS)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(texts, trainer)
        # The trainer marks every listed token "special"; R1 leaves <think> / </think> visible.
        spec = json.loads(tk.to_str())
        for added in spec["added_tokens"]:
            added["special"] = added["content"] not in VISIBLE_SPECIAL_TOKENS
        tk = _HFTokenizer.from_str(json.dumps(spec))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tk.token_to_id(BOS))])
        for i, t in enumerate(specials):  # the trainer puts special tokens first, in order
            if tk.token_to_id(t) != i:
                raise TokenizerError(f"special token {t!r} got id {tk.token_to_id(t)}, expected {i}")
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` (or from that file itself), with the
        settings files beside it (module docstring)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no such tokenizer file (train one with `nanoseek tokenizer train`)")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error names the JSON problem, not the file
            raise TokenizerError(f"{file}: cannot read tokenizer: {e}") from e
        folder = file.parent
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else None
        source = str(config_file) if config is not None else f"{file} (no tokenizer_config.json beside it)"
        if (folder / "special_tokens_map.json").is_file():     # legacy file: its names win, as in transformers
            config = dict(config or {})
            config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items()
                           if k in TEMPLATE_TOKEN_NAMES})
        template = None
        if (folder / "chat_template.jinja").is_file():
            try:
                template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{folder / 'chat_template.jinja'}: cannot read: {e}") from None
        extra: list = []
        if (folder / "generation_config.json").is_file():
            eos = _read_json(folder / "generation_config.json").get("eos_token_id")
            extra = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        return cls(tk, config, chat_template=template, extra_stop_ids=extra, source=source, location=str(folder))

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (HF ``AutoTokenizer`` loadable), each
        atomically (:func:`nanoseek.atomic.write_atomic`: a symbolic link there is replaced, never written
        through). The config carries this tokenizer's own token names and template."""
        from nanoseek.atomic import write_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "tokenizer.json", self._tk.to_str(pretty=True))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key in ("bos_token", "eos_token", "pad_token", *TEMPLATE_TOKEN_NAMES):
            if key in self.special_tokens_map:
                config[key] = self.special_tokens_map[key]
        if self.add_bos_token is not None:
            config["add_bos_token"] = self.add_bos_token
        config.update({"clean_up_tokenization_spaces": False, "model_max_length": model_max_length or 1_000_000})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config["nanoseek_tokenizer_hash"] = self.hash
        write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of raw model input ``text``: every added-token string becomes its single id, as in
        HF's ``tokenizer(text)``. ``add_bos``: add the special tokens transformers'
        ``tokenizer(text)`` adds, i.e. run ``tokenizer.json``'s post-processor (transformers 5.x
        ignores ``add_bos_token``/``add_eos_token`` of the config when ``tokenizer.json`` exists):
        BOS for nanoseek's own and Llama-style files, nothing for GPT-2/Qwen-style ones or a file
        without a post-processor. A string prompt thus gives the ids
        ``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`` gives. Never for message content
        (see :meth:`encode_text`)."""
        return _encoding(self._tk, text, add_special_tokens=add_bos).ids

    def encode_prompt_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character spans) of a rendered chat ``text`` encoded exactly as
        ``apply_chat_template(tokenize=True)`` encodes it (every added token parsed, no BOS added)."""
        enc = _encoding(self._whole_tk, text)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as text: a control-token string in it (``<｜User｜>``, ``<think>``...)
        is encoded byte by byte like any other text and decodes back to itself."""
        return self.encode_text_offsets(text)[0]

    def encode_text_offsets(self, text: str, after_control: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode_text` with each token's character span in ``text``; ``after_control``: the
        run follows a control token in a prompt (no Metaspace ``▁`` prepended, as in HF)."""
        enc = _encoding(self._inner_tk if after_control else self._text_tk, text)
        if not self._forbidden_ids.isdisjoint(enc.ids):
            raise TokenizerError(f"this vocabulary encodes the text {text[:40]!r} to a control token; "
                                 "it cannot keep message content apart from the chat template")
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """:meth:`encode` over many texts at once (parallel in the Rust library)."""
        try:
            return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_bos)]
        except Exception as e:
            raise TokenizerError(f"cannot encode text: {e}") from e

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_text` over many texts at once: documents of a corpus are text, so a
        control-token string in a web page stays text in the shards."""
        try:
            out = [e.ids for e in self._text_tk.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e
        except Exception as e:  # the Rust library raises plain Exception
            raise TokenizerError(f"this tokenizer cannot encode document text: {e}") from e
        if any(not self._forbidden_ids.isdisjoint(ids) for ids in out):
            raise TokenizerError("this vocabulary encodes document text to a control token; "
                                 "it cannot keep text apart from the chat template")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; an incomplete UTF-8 byte sequence decodes to U+FFFD."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


__all__ = ["Tokenizer", "TokenizerError", "Piece", "encode_pieces", "CHAT_TEMPLATE", "TEMPLATE_UPGRADES",
           "SPECIAL_TOKENS", "VOCAB_SPECIAL_TOKENS", "MIN_VOCAB_SIZE", "BOS", "EOS", "PAD", "USER", "ASSISTANT",
           "THINK", "END_THINK", "THINK_TAGS"]
