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

The tokenizer hash (sha256 of the canonical ``tokenizer.json``) identifies the vocabulary; token
shards record it and refuse to load with a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (HF ``AutoTokenizer`` loadable)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self._tk.to_str(pretty=True), encoding="utf-8")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000,
            "chat_template": CHAT_TEMPLATE,
            "nanoseek_tokenizer_hash": self.hash,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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
        """Token ids of ``text``; special-token strings in ``text`` become their single ids."""
        try:
            return self._tk.encode(text, add_special_tokens=add_bos).ids
        except TypeError as e:  # lone surrogates cannot be encoded as UTF-8
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """:meth:`encode` over many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; an incomplete UTF-8 byte sequence decodes to U+FFFD."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def _chat_segments(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                       think: bool) -> list[tuple[str, bool]]:
        """The rendered chat as (text, trained-on) pieces; every boundary falls on a special token."""
        _check_messages(messages)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        segments: list[tuple[str, bool]] = [(BOS, False), (system, False)]
        for m in messages:
            if m["role"] == "user":
                segments += [(USER, False), (m["content"], False)]
            elif m["role"] == "assistant":
                body = m["content"]
                if m.get("reasoning") is not None:
                    body = f"{THINK}\n{m['reasoning']}\n{END_THINK}\n\n{body}"
                segments += [(ASSISTANT, False), (body, True), (EOS, True)]
        if add_generation_prompt:
            segments.append((ASSISTANT, False))
            if think:
                segments.append((f"{THINK}\n", False))
        return [(text, train) for text, train in segments if text]

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            think: bool = False) -> str:
        """Render ``messages`` ({"role", "content", optional "reasoning"}) as one string."""
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt, think))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    think: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and the SFT loss mask.

        ``assistant_mask[i]`` is 1 for the tokens an assistant wrote (its reasoning block, its
        answer and its closing EOS) and 0 for BOS, system and user text and the role headers.
        The ids equal ``encode(apply_chat_template(...))``.
        """
        ids: list[int] = []
        mask: list[int] = []
        for text, train in self._chat_segments(messages, add_generation_prompt, think):
            piece = self.encode(text)
            ids += piece
            mask += [int(train)] * len(piece)
        return ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
