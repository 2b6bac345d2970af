"""A byte-level stand-in tokenizer: the engine, the CLIs and the server without a trained vocabulary.

Ids 0-255 are the UTF-8 bytes; DeepSeek's special tokens follow (BOS 256, EOS 257, pad 258,
``<｜User｜>`` 259, ``<｜Assistant｜>`` 260, ``<think>`` 261, ``</think>`` 262), so a model needs
``vocab_size >= 263``. It has the same interface as ``nanoseek.data.tokenizer.Tokenizer``
(``encode``, ``encode_text``, ``encode_segments``, ``encode_chat``, ``decode``, the special ids,
``apply_chat_template``) and the same chat template and rule that only the template makes control
tokens (content is UTF-8 bytes, whatever it holds), which makes tests of the inference engine
need no trained tokenizer and no checkpoint (nanochat does the same). Decoding bytes that are not
valid UTF-8 gives U+FFFD, as the real byte-level BPE does, so incremental detokenisation is
exercised for real.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from nanoseek.data.tokenizer import TokenizerError, chat_pieces, encode_pieces

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]


class ByteTokenizer:
    bos_id, eos_id, pad_id, user_id, assistant_id, think_id, end_think_id = range(256, 263)
    vocab_size = 263

    def __len__(self) -> int:
        return self.vocab_size

    control_tokens = {s: 256 + k for k, s in enumerate(SPECIALS)}

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
                ids.extend(text[i:j].encode("utf-8"))
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
                if not skip_special_tokens or s in (THINK, END_THINK):
                    out.append(s)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_text(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``: special-token strings stay text."""
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # a lone surrogate
            raise TokenizerError(f"cannot encode text (not valid unicode, e.g. a lone surrogate): {e}") from e

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """``(text, is_template)`` segments: control tokens from template segments only."""
        return encode_pieces(segments, self.control_tokens, self.encode_text)[0]

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    thinking: bool = False) -> tuple[list[int], list[int]]:
        """(ids, assistant mask) of the chat; message content is text."""
        return encode_pieces(chat_pieces(messages, add_generation_prompt, thinking), self.control_tokens,
                             self.encode_text)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            thinking: bool = False) -> str:
        return "".join(p.text for p in chat_pieces(messages, add_generation_prompt, thinking))


__all__ = ["ByteTokenizer"]
