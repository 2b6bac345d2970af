"""Byte-level BPE tokenizer with DeepSeek's special tokens and chat template.

The tokenizer is trained with HuggingFace ``tokenizers`` on the user's corpus and saved as
``tokenizer.json`` + ``tokenizer_config.json``, so ``transformers.AutoTokenizer.from_pretrained``
loads the same vocabulary and renders chats with the same template as :class:`Tokenizer`.

Design:

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
  vocabulary: BOS ``<｜begin▁of▁sentence｜>`` (0), EOS ``<｜end▁of▁sentence｜>`` (1), padding
  ``<｜▁pad▁｜>`` (2), the roles ``<｜User｜>`` (3) and ``<｜Assistant｜>`` (4), and the reasoning
  delimiters ``<think>`` (5) and ``</think>`` (6). As in R1's released tokenizer, ``<think>`` and
  ``</think>`` are not marked "special" for HF (``skip_special_tokens`` keeps them visible).
  A ``TemplateProcessing`` post-processor prepends BOS when asked (``add_bos=True`` here,
  ``add_special_tokens=True`` in HF), as DeepSeek's tokenizer does.
* **Chat template** (DeepSeek-R1 style; one line, wrapped here)::

      <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>
      <think>\\n{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>

  System messages (joined by a blank line) go right after BOS; an assistant message's optional
  ``reasoning`` field is wrapped in ``<think>``; ``add_generation_prompt`` appends
  ``<｜Assistant｜>`` (and ``<think>\\n`` with ``think=True``, forcing R1-style reasoning).
  :data:`CHAT_TEMPLATE` is the same template in Jinja for ``tokenizer_config.json``.
* **Only the template makes control tokens.** A prompt is rendered as pieces, each either
  template (the chat template's own structure, or a fixed prompt like R1-Zero's) or content (a
  message, a question, reasoning). :func:`encode_pieces` turns the control-token strings of
  template pieces into their single ids and encodes content as plain text with
  :meth:`Tokenizer.encode_text` (a copy of the vocabulary without its added tokens, whose ids
  are then unreachable from text), so a message holding ``<｜Assistant｜>`` or
  ``<｜end▁of▁sentence｜>`` can neither close its own turn nor write the assistant's: every added
  token of the vocabulary stays text inside content, and decodes back to the same string. Adjacent text is encoded as one run, so for content without
  control-token strings the ids equal HF's encoding of the whole rendered string:
  :meth:`Tokenizer.encode_chat` equals ``transformers``' ``apply_chat_template(tokenize=True)``.
  It differs (on purpose) when content holds such strings: transformers renders the chat to a
  string and tokenizes it, so its ids turn them into control tokens. :meth:`Tokenizer.encode`
  parses control-token strings as HF's ``tokenizer(text)`` does: it is for raw model input
  (a ``/v1/completions`` prompt, ``generate``'s ``{"prompt"}``, pre-training documents), never
  for message content.

The tokenizer hash (sha256 of the canonical ``tokenizer.json``) identifies the vocabulary; token
shards record it and refuse to load with a different tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
# In id order: BOS is 0, EOS 1, ... The attribute names of the ids on Tokenizer.
SPECIAL_TOKENS: dict[str, str] = {
    "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "user_id": USER, "assistant_id": ASSISTANT,
    "think_id": THINK, "end_think_id": END_THINK,
}
# Tokens HF should treat as content, not control (skip_special_tokens keeps them), as in R1.
VISIBLE_SPECIAL_TOKENS = {THINK, END_THINK}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
ROLES = ("system", "user", "assistant")

# Jinja twin of Tokenizer.apply_chat_template (tests check they render identically).
CHAT_TEMPLATE = (
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
    "{%- if think is defined and think -%}{{- '" + THINK + "\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class TokenizerError(ValueError):
    """A tokenizer file is missing or inconsistent, or a chat message is malformed."""


def _canonical_hash(tokenizer_json: str) -> str:
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise TokenizerError(f"chat message {i}: unknown chat role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise TokenizerError(f"chat message {i}: 'content' must be a string, got {type(m['content']).__name__}")
        reasoning = m.get("reasoning")
        if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
            raise TokenizerError(f"chat message {i}: 'reasoning' must be a string on an assistant message")


class Piece(NamedTuple):
    """A piece of a rendered prompt. ``template``: the prompt's own structure, whose control-token
    strings become control tokens; otherwise content, always encoded as text. ``train``: written
    by the assistant (the SFT loss mask)."""

    text: str
    template: bool
    train: bool = False


def chat_pieces(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                think: bool = False) -> list[Piece]:
    """The chat template (module docstring) as pieces; the only template pieces are its own markup.

    The train flag changes only at a control token (the assistant header before, the user header
    after an assistant turn), so no text run spans trained and untrained pieces.
    """
    _check_messages(messages)
    pieces: list[Piece] = [Piece(BOS, True)]
    for k, m in enumerate(m for m in messages if m["role"] == "system"):
        pieces += ([Piece("\n\n", True)] if k else []) + [Piece(m["content"], False)]
    for m in messages:
        if m["role"] == "user":
            pieces += [Piece(USER, True), Piece(m["content"], False)]
        elif m["role"] == "assistant":
            pieces.append(Piece(ASSISTANT, True))
            if m.get("reasoning") is not None:
                pieces += [Piece(f"{THINK}\n", True, True), Piece(m["reasoning"], False, True),
                           Piece(f"\n{END_THINK}\n\n", True, True)]
            pieces += [Piece(m["content"], False, True), Piece(EOS, True, True)]
    if add_generation_prompt:
        pieces.append(Piece(ASSISTANT, True))
        if think:
            pieces.append(Piece(f"{THINK}\n", True))
    return [p for p in pieces if p.text]


@functools.lru_cache(maxsize=16)
def _control_splitter(control: frozenset[str]) -> re.Pattern | None:
    """A regex splitting text on the control strings, longest first (a capture group keeps them)."""
    pattern = "|".join(re.escape(t) for t in sorted(control, key=lambda t: (-len(t), t)))
    return re.compile(f"({pattern})") if pattern else None


def encode_pieces(pieces: Iterable[Piece | tuple[str, bool] | tuple[str, bool, bool]], control: Mapping[str, int],
                  encode_text: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """(ids, train mask) of ``pieces``: ``(text, template[, train])``.

    Template text is split on the ``control`` strings (leftmost-longest, as HF matches added
    tokens), each becoming its id; everything else, content whole, is text. Adjacent text with
    the same train flag is one run for ``encode_text``, so the ids equal HF's encoding of the
    joined string whenever content holds no control string (HF splits on the same tokens).
    """
    splitter = _control_splitter(frozenset(control))
    runs: list[tuple[str | int, bool]] = []   # text runs and control ids, with their train flag

    def add_text(text: str, train: bool) -> None:
        if runs and isinstance(runs[-1][0], str) and runs[-1][1] == train:
            runs[-1] = (runs[-1][0] + text, train)
        else:
            runs.append((text, train))

    for piece in pieces:
        text, template, train = piece[0], bool(piece[1]), bool(piece[2]) if len(piece) > 2 else False
        if not isinstance(text, str):
            raise TokenizerError(f"prompt piece must be a string, got {type(text).__name__}")
        if not template or splitter is None:
            add_text(text, train)
            continue
        for k, part in enumerate(splitter.split(text)):
            if k % 2:
                runs.append((control[part], train))
            elif part:
                add_text(part, train)
    ids: list[int] = []
    mask: list[int] = []
    for run, train in runs:
        piece_ids = [run] if isinstance(run, int) else encode_text(run)
        ids += piece_ids
        mask += [int(train)] * len(piece_ids)
    return ids, mask


def _text_only(hf_tokenizer: _HFTokenizer) -> tuple[_HFTokenizer, dict[str, int]]:
    """A copy of ``hf_tokenizer`` that encodes every string as text, and its added tokens (str -> id).

    The copy has no added tokens (so nothing is split out of the text) and its model's entries
    for those ids are renamed to strings no pre-tokenizer can produce (a NUL byte is never a
    byte-level symbol), so no text reaches a control id. ``encode_text`` still checks.
    """
    added = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items()}
    spec = json.loads(hf_tokenizer.to_str())
    spec["added_tokens"] = []
    spec["post_processor"] = None
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for token, token_id in added.items():
            if vocab.get(token) == token_id:
                del vocab[token]
                vocab[f"\x00control:{token_id}"] = token_id
    return _HFTokenizer.from_str(json.dumps(spec)), added


class Tokenizer:
    """A trained byte-level BPE vocabulary with nanoseek's special tokens and chat template."""

    def __init__(self, hf_tokenizer: _HFTokenizer):
        self._tk = hf_tokenizer
        for attr, token in SPECIAL_TOKENS.items():
            token_id = hf_tokenizer.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"tokenizer has no special token {token!r} (needed for {attr})")
            setattr(self, attr, token_id)
        self.special_ids = frozenset(getattr(self, a) for a in SPECIAL_TOKENS)
        self.hash = _canonical_hash(hf_tokenizer.to_str())
        # every added token (DeepSeek's seven and any other) is a control token: only template
        # pieces produce them; _text_tk encodes content as text.
        self._text_tk, self.control_tokens = _text_only(hf_tokenizer)
        self._control_ids = frozenset(self.control_tokens.values())

    # ------------------------------------------------------------------ training and files
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on ``texts``; ``vocab_size`` counts the 256 bytes and the special tokens.

        A small corpus may run out of merges before ``vocab_size``: :attr:`vocab_size` is the size
        actually reached.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: need at least {MIN_VOCAB_SIZE} "
                                 f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        tk = _HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tk.decoder = decoders.ByteLevel()
        specials = list(SPECIAL_TOKENS.values())
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
        """Load from a directory holding ``tokenizer.json`` (or from that file itself)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no such tokenizer file (train one with `nanoseek tokenizer train`)")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error names the JSON problem, not the file
            raise TokenizerError(f"{file}: cannot read tokenizer: {e}") from e
        try:
            return cls(tk)
        except TokenizerError as e:
            raise TokenizerError(f"{file}: {e}") from e

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (HF ``AutoTokenizer`` loadable), each
        atomically (:func:`nanoseek.atomic.write_atomic`: a symbolic link there is replaced, never written through)."""
        from nanoseek.atomic import write_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "tokenizer.json", self._tk.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000,
            "chat_template": CHAT_TEMPLATE,
            "nanoseek_tokenizer_hash": self.hash,
        }
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
        """Token ids of raw model input ``text``: control-token strings become their single ids,
        as in HF's ``tokenizer(text)``. Never for message content (see :meth:`encode_text`)."""
        try:
            return self._tk.encode(text, add_special_tokens=add_bos).ids
        except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as text: a control-token string in it (``<｜User｜>``, ``<think>``...)
        is encoded byte by byte like any other text and decodes back to itself."""
        try:
            ids = self._text_tk.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e
        if not self._control_ids.isdisjoint(ids):  # unreachable for byte-level BPE; a guard for odd vocabularies
            raise TokenizerError(f"this vocabulary encodes the text {text[:40]!r} to a control token; "
                                 "it cannot keep message content apart from the chat template")
        return ids

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as ``(text, is_template)`` segments: control tokens come
        only from template segments; content segments are text (:func:`encode_pieces`)."""
        return encode_pieces(segments, self.control_tokens, self.encode_text)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """:meth:`encode` over many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_bos)]

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_text` over many texts at once: documents of a corpus are text, so a
        control-token string in a web page stays text in the shards."""
        try:
            out = [e.ids for e in self._text_tk.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e
        if any(not self._control_ids.isdisjoint(ids) for ids in out):
            raise TokenizerError("this vocabulary encodes document text to a control token; "
                                 "it cannot keep text apart from the chat template")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; an incomplete UTF-8 byte sequence decodes to U+FFFD."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            thinking: bool = False) -> str:
        """Render ``messages`` ({"role", "content", optional "reasoning"}) as one string, for display
        and HF parity. A string cannot tell markup from content: encode chats with :meth:`encode_chat`."""
        return "".join(p.text for p in chat_pieces(messages, add_generation_prompt, thinking))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    thinking: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and the SFT loss mask.

        Control tokens come only from the template; message content and reasoning are text.
        ``assistant_mask[i]`` is 1 for the tokens an assistant wrote (its reasoning block, its
        answer and its closing EOS) and 0 for BOS, system and user text and the role headers.
        For content without control-token strings the ids equal ``encode(apply_chat_template(...))``
        and transformers' ``apply_chat_template(tokenize=True)``; decoding them always gives
        ``apply_chat_template(...)`` back.
        """
        return encode_pieces(chat_pieces(messages, add_generation_prompt, thinking), self.control_tokens,
                             self.encode_text)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
