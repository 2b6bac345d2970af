"""Token-by-token text for streaming: incremental detokenisation and stop strings.

Two small state machines sit between the sampled token ids and the text a client sees:

* :class:`IncrementalDetokenizer` turns one token id at a time into a text delta. A byte-level
  BPE token can end in the middle of a UTF-8 character (emoji, CJK); decoding it alone gives
  U+FFFD. The detokenizer decodes the window of tokens since the last clean boundary and
  withholds text that ends in U+FFFD until the next token completes the character (or until
  ``MAX_PENDING_TOKENS`` tokens show the bytes are simply invalid), so the concatenated deltas
  equal ``tokenizer.decode(all ids)``. Two differences are by design, both after invalid bytes
  (the deferred text, ``Sample._final_text``, is the whole decoding): text let out after
  ``MAX_PENDING_TOKENS`` can split a character the next token completes; and in a vocabulary with
  byte-fallback tokens (``<0xNN>``, Llama/Mistral-style), whose decoder turns every byte of a run
  that is not valid UTF-8 into U+FFFD, characters of a run already streamed stay characters when
  a later byte of the run is invalid. Holding every run until it ends would make the stream exact
  there, but would hold valid text (a CJK answer spelled in bytes) and stop strings for as long as
  the run lasts.
* :class:`StopStringFilter` cuts the text at the first stop string and never lets a partial stop
  string out: it holds back the longest suffix that is a prefix of some stop string until the
  next delta decides it. The deltas it emits therefore never contain (part of) a stop string
  that ends up matching, and their concatenation is the final, cut text.

Control tokens the model generates (BOS, ``<｜Assistant｜>``...) add no text when the request
skips special tokens (vLLM's ``skip_special_tokens``, on by default): :func:`skipped_token_ids`
names them, and they are never pushed to the detokenizer. They are the tokens HF's
``decode(..., skip_special_tokens=True)`` drops, except the reasoning tags (``think_tags``), which
the reasoning split needs whatever a tokenizer marks them.

The reasoning splitter (``reasoning.py``) then runs on the filtered text.
"""

from __future__ import annotations

import functools


MAX_PENDING_TOKENS = 8   # a UTF-8 character spans at most 4 bytes: longer runs are invalid bytes, let them out


@functools.lru_cache(maxsize=16)
def skipped_token_ids(tokenizer) -> frozenset[int]:
    """The control tokens that add no text with ``skip_special_tokens`` (module docstring)."""
    candidates = set(getattr(tokenizer, "special_ids", ()) or ())
    candidates |= set((getattr(tokenizer, "control_tokens", None) or {}).values())
    tags = set(getattr(tokenizer, "think_tags", None) or ())
    out = set()
    for t in candidates:
        text = tokenizer.decode([t])
        if text and text not in tags and tokenizer.decode([t], skip_special_tokens=True) == "":
            out.add(t)
    return frozenset(out)


class IncrementalDetokenizer:
    """``push(token_id) -> text delta``; ``flush()`` releases a withheld incomplete character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0     # start of the window being decoded
        self.read_offset = 0       # tokens before this are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        window = self.ids[self.prefix_offset:]
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(window)
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith("\ufffd") and len(self.ids) - self.read_offset < MAX_PENDING_TOKENS:
            return ""                                          # wait for the rest of a character
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still withheld (an incomplete character decodes to U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStringFilter:
    """``push(text) -> (safe text, matched)``: cut at the first stop string, hold partial ones."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [(i, s) for s in self.stops if (i := self.buffer.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            self.matched = s
            out, self.buffer = self.buffer[:i], ""
            return out, True
        hold = 0
        for s in self.stops:                       # longest suffix that is a proper prefix of a stop
            for n in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back tail at the end of generation (it did not become a stop string)."""
        out, self.buffer = self.buffer, ""
        return out


__all__ = ["IncrementalDetokenizer", "StopStringFilter", "skipped_token_ids"]
