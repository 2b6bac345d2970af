"""OpenAI's two logprobs formats, built from the engine's logprobs (``nanoseek.infer.sampling``).

The engine gives, per position, the chosen token's logprob and its top-N alternatives as
``(token id, logprob)`` (logprobs of the model's distribution before temperature/top-p/top-k);
the API speaks in token strings:

* ``/v1/completions`` (OpenAI's legacy format, what lm-evaluation-harness parses):
  ``{"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
  "text_offset": [int]}``. ``top_logprobs[i]`` holds the N most likely tokens and always the
  chosen one too (so up to N + 1 entries, as OpenAI documents); two tokens with the same string
  share a key, which keeps the larger logprob, so ``token_logprob == max(top.values())`` still
  says whether the chosen token was the most likely. With ``echo`` the prompt's tokens come
  first: the first one has None for both (nothing precedes it).
* ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}]}]}`` with exactly N alternatives per token.

Every generated token is listed, the reasoning's and the final EOS included (the token ids the
engine reports, as many as ``usage.completion_tokens``). The rule is vLLM's: logprobs describe
what the model sampled, the text is what the client gets. So a stop string is cut from the text
but the token(s) it was cut from stay listed (``stop: " "`` after `` world`` returns text ending
before the space, and the last token is `` world``; a stop string spanning tokens lists all of
them, and ``text_offset`` counts the uncut text, so a token wholly inside the stop string
starts at or past the end of the returned text), and a control token left out of the text (``skip_special_tokens``) is listed with the
offset where the next text starts. Streamed responses carry exactly the same tokens, logprobs
and offsets as whole ones, one token per chunk (a chunk's text may be empty while text is
withheld or cut). A token's string is its own text, or ``bytes:\\xNN...`` (OpenAI's and tiktoken's
notation) when it is part of a UTF-8 character; ``bytes`` are its raw bytes (:class:`TokenPieces`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from nanoseek.infer.streaming import IncrementalDetokenizer

NEG_INF_LOGPROB = -9999.0    # JSON has no -Infinity (vLLM's stand-in)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else NEG_INF_LOGPROB


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenPieces:
    """Each token's bytes and display string, cached by id.

    The bytes of a byte-level BPE token (every nanoseek tokenizer, DeepSeek's, GPT-2's) come from
    its vocabulary entry through the byte alphabet, so a token holding half of a UTF-8 character
    gets its real bytes; the entry is trusted only when those bytes decode to what the tokenizer
    decodes the token to, else (another vocabulary, a control token) the bytes are the UTF-8 of
    ``decode([id])``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            text = self.tokenizer.decode([token_id])
            b = text.encode("utf-8", "surrogatepass")
            entry = getattr(self.tokenizer, "id_to_token", lambda _: None)(token_id)
            table = _byte_decoder()
            if entry and (m := _BYTE_FALLBACK.fullmatch(entry)):      # SentencePiece's byte fallback
                b = bytes([int(m.group(1), 16)])
            elif entry and all(ch in table for ch in entry):
                raw = bytes(table[ch] for ch in entry)
                if raw.decode("utf-8", "replace") == text or (raw and "\ufffd" in text and text.strip("\ufffd") == ""):
                    b = raw
            self._bytes[token_id] = b
        return b

    def text(self, token_id: int) -> str:
        b = self.bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class TextOffsets:
    """``push(token id) -> offset``: where each token's text starts in the decoded text (plus ``start``).

    Text is counted as the incremental detokenizer lets it out; a token pushed while earlier ones
    are withheld (part of a UTF-8 character, or invalid bytes) starts after what those decode to
    alone, so the token after an invalid byte starts after its U+FFFD. Used for the prompt (echo)
    and, token by token, for the completion, so streamed and whole responses agree. A token in
    ``skip`` (a control token the completion's text leaves out) adds no text: it starts where the
    next text starts."""

    def __init__(self, tokenizer, start: int = 0, skip: frozenset[int] = frozenset()):
        self.tokenizer, self.n, self.skip = tokenizer, start, skip
        self.detok = IncrementalDetokenizer(tokenizer)
        self.pending: list[int] = []

    def push(self, token_id: int) -> int:
        offset = self.n + (len(self.tokenizer.decode(self.pending)) if self.pending else 0)
        if token_id in self.skip:
            return offset
        delta = self.detok.push(token_id)
        if delta:
            self.n += len(delta)
            self.pending = []
        else:
            self.pending.append(token_id)
        return offset


def text_offsets(tokenizer, ids: list[int], start: int = 0) -> list[int]:
    """:class:`TextOffsets` of every token of ``ids``."""
    tracker = TextOffsets(tokenizer, start)
    return [tracker.push(t) for t in ids]


def legacy_top(pieces: TokenPieces, top: list[tuple[int, float]] | None, chosen: int, chosen_lp: float) -> dict:
    """``{token string: logprob}``: the top N and the chosen token; a shared string keeps the larger logprob."""
    out: dict[str, float] = {}
    for tid, lp in list(top or []) + [(chosen, chosen_lp)]:
        key = pieces.text(tid)
        out[key] = max(out.get(key, -math.inf), _finite(lp))
    return out


def legacy_logprobs(pieces: TokenPieces, ids: list[int], lps: list[float | None],
                    tops: list[list[tuple[int, float]] | None], offsets: list[int]) -> dict[str, list]:
    """OpenAI's legacy ``logprobs`` object for tokens ``ids`` (None logprob: the prompt's first token)."""
    return {"tokens": [pieces.text(t) for t in ids],
            "token_logprobs": [None if lp is None else _finite(lp) for lp in lps],
            "top_logprobs": [None if lp is None else legacy_top(pieces, top, t, lp) for t, lp, top in zip(ids, lps, tops)],
            "text_offset": list(offsets)}


def merge_legacy(parts: list[dict[str, list]]) -> dict[str, list]:
    """Concatenate legacy logprobs objects (the echoed prompt's, then the completion's)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [x for p in parts for x in p[k]] for k in keys}


def chat_entry(pieces: TokenPieces, token_id: int, lp: float) -> dict[str, Any]:
    return {"token": pieces.text(token_id), "logprob": _finite(lp), "bytes": list(pieces.bytes(token_id))}


def chat_logprobs(pieces: TokenPieces, ids: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]] | None]) -> dict[str, list]:
    """The chat ``logprobs`` object: ``{"content": [...], "refusal": None}``."""
    content = []
    for t, lp, top in zip(ids, lps, tops):
        entry = chat_entry(pieces, t, lp)
        entry["top_logprobs"] = [chat_entry(pieces, a, alp) for a, alp in (top or [])]
        content.append(entry)
    return {"content": content, "refusal": None}


__all__ = ["TokenPieces", "TextOffsets", "text_offsets", "legacy_logprobs", "legacy_top", "merge_legacy", "chat_logprobs",
           "NEG_INF_LOGPROB"]
