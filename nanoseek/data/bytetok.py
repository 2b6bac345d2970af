"""A byte-level stand-in tokenizer: the engine, the CLIs and the server without a trained vocabulary.

Ids 0-255 are the UTF-8 bytes; nanoseek's special tokens follow in their usual order
(:data:`nanoseek.data.tokenizer.SPECIAL_TOKENS`: BOS 256, EOS 257, pad 258, ``<｜User｜>`` 259,
``<｜Assistant｜>`` 260, ``<think>`` 261, ``</think>`` 262), then DeepSeek-V3.1's seven tool-call tokens
(:data:`nanoseek.tools.format.TOOL_TOKENS`, 263-269), so a model needs ``vocab_size >= 270``.
It has the interface of :class:`nanoseek.data.tokenizer.Tokenizer` that inference and
post-training use (``encode``, ``encode_text``, ``encode_segments``, ``encode_chat``,
``apply_chat_template``, ``decode``, ``token_to_id``, ``bos_id``/``eos_id``/``pad_id``/``document_start_id``,
``stop_ids``, ``control_tokens``, ``special_ids``, ``chat_template``, ``think_tags``) and renders
chats through the same :mod:`nanoseek.data.chat_template` path with nanoseek's template, so only
the template makes control tokens (content is UTF-8 bytes, whatever it holds). Tests of the
inference engine need no trained tokenizer and no checkpoint (nanochat does the same). Decoding
bytes that are not valid UTF-8 gives U+FFFD, as the real byte-level BPE does, so incremental
detokenisation is exercised for real. Left out: ``id_to_token`` (bits-per-byte counts ids 0-255
as one byte each instead).
"""

from __future__ import annotations

from nanoseek.data.chat_template import ChatEncoding, ChatTemplate, TokenizerError
from nanoseek.data.tokenizer import BOS, CHAT_TEMPLATE, END_THINK, EOS, PAD, SPECIAL_TOKENS, THINK, THINK_TAGS
from nanoseek.tools.format import TOOL_TOKENS

SPECIALS = list(SPECIAL_TOKENS) + [t for t in TOOL_TOKENS if t not in SPECIAL_TOKENS]


class ByteTokenizer(ChatEncoding):
    bos_token, eos_token, pad_token = BOS, EOS, PAD
    bos_id, eos_id, pad_id = 256, 257, 258
    document_start_id = bos_id
    think_id, end_think_id = 256 + SPECIALS.index(THINK), 256 + SPECIALS.index(END_THINK)
    think_tags = THINK_TAGS
    stop_ids = (257,)
    add_bos_token = None
    vocab_size = 256 + len(SPECIALS)
    control_tokens = {s: 256 + k for k, s in enumerate(SPECIALS)}
    special_ids = frozenset(control_tokens.values())
    special_tokens_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    chat_template_obj = ChatTemplate(CHAT_TEMPLATE, special_tokens_map)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of a special-token string or of a one-byte string, else None."""
        if token in self.control_tokens:
            return self.control_tokens[token]
        raw = token.encode("utf-8", errors="replace")
        return raw[0] if len(raw) == 1 else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Raw model input: UTF-8 bytes, with special-token strings mapped to their single ids."""
        ids = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            for k, s in enumerate(SPECIALS):
                if text.startswith(s, i):
                    ids.append(256 + k)
                    i += len(s)
                    break
            else:
                j = min((p for s in SPECIALS if (p := text.find(s, i)) >= 0), default=len(text))
                ids.extend(self.encode_text(text[i:j]))
                i = j
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run = bytearray()
        for t in ids:
            t = int(t)
            if t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if t - 256 < len(SPECIALS):
                s = SPECIALS[t - 256]
                if not skip_special_tokens or s in THINK_TAGS:
                    out.append(s)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_text(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``: special-token strings stay text."""
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # a lone surrogate
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e

    def encode_text_offsets(self, text: str, after_control: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode_text` with each byte's character span (every byte of a character gets its span;
        ``after_control`` changes nothing for bytes)."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for k, ch in enumerate(text):
            b = self.encode_text(ch)
            ids += b
            offsets += [(k, k + 1)] * len(b)
        return ids, offsets


__all__ = ["ByteTokenizer"]
