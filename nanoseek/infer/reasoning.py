"""Split generated text into reasoning (inside ``<think>...</think>``) and answer, while streaming.

The streaming side of :func:`nanoseek.tasks.reply.split_reasoning` (the reply format lives in
:mod:`nanoseek.tasks.reply`; this module keeps what only inference needs: deltas, held tags).

DeepSeek-R1 writes its chain of thought between ``<think>`` and ``</think>`` and the answer
after it; R1's chat template may already end the prompt with ``<think>\\n``, so a completion can
*start* inside a think block (``starts_in_think``). :class:`ReasoningSplitter` consumes text
deltas and returns ``(reasoning_delta, answer_delta)`` pairs such that

* a tag is never split across deltas: a suffix that could be the start of the next tag
  (``<``, ``<th``, ``</thi``...) is held back until the following text decides it;
* each section is stripped like DeepSeek's API strips ``reasoning_content`` and ``content``:
  leading whitespace of a section is dropped and trailing whitespace is held until non-space
  text follows (and dropped if none does), so the concatenated deltas equal the stripped
  section; several think blocks are joined by a newline;
* the concatenation of all deltas plus :meth:`flush` equals ``reply.split_reasoning`` of the
  whole text (tests check this for every way of cutting the text into deltas).

An unclosed think block (generation stopped mid-thought) is all reasoning and no answer.

The tags come from the tokenizer (``tokenizer.think_tags``: ``("<think>", "</think>")`` when its
chat template writes them or its vocabulary has them, None otherwise): with ``tags=None`` the
splitter is off and everything is answer, as for a model that does not reason in tags.
"""

from __future__ import annotations

from nanoseek.tasks.reply import END_THINK, THINK, ReplySection


class ReasoningSplitter:
    """Streaming ``<think>`` splitter: ``push(text) -> (reasoning_delta, answer_delta)``."""

    def __init__(self, starts_in_think: bool = False, enabled: bool = True,
                 tags: tuple[str, str] | None = (THINK, END_THINK)):
        self.enabled = enabled and tags is not None
        self.open_tag, self.close_tag = tags or (THINK, END_THINK)
        self.in_think = starts_in_think and self.enabled
        self.saw_think = self.in_think
        self.buffer = ""
        self.reasoning, self.answer = ReplySection(), ReplySection()

    def push(self, text: str) -> tuple[str, str]:
        if not self.enabled:
            self.answer.text.append(text)
            return "", text
        self.buffer += text
        r_out: list[str] = []
        a_out: list[str] = []
        while True:
            tag = self.close_tag if self.in_think else self.open_tag
            section, out = (self.reasoning, r_out) if self.in_think else (self.answer, a_out)
            i = self.buffer.find(tag)
            if i < 0:
                hold = _partial_suffix(self.buffer, tag)
                cut = len(self.buffer) - hold
                out.append(section.add(self.buffer[:cut]))
                self.buffer = self.buffer[cut:]
                break
            out.append(section.add(self.buffer[:i]))
            self.buffer = self.buffer[i + len(tag):]
            self.in_think = not self.in_think
            if self.in_think:
                self.saw_think = True
                self.reasoning.resume()
            else:
                self.answer.resume()
        return "".join(r_out), "".join(a_out)

    def flush(self) -> tuple[str, str]:
        """End of generation: a held partial tag is ordinary text after all."""
        if not self.enabled or not self.buffer:
            return "", ""
        rest, self.buffer = self.buffer, ""
        if self.in_think:
            return self.reasoning.add(rest), ""
        return "", self.answer.add(rest)

    @property
    def reasoning_text(self) -> str | None:
        """The reasoning so far; None when no think block was seen (or splitting is off)."""
        return "".join(self.reasoning.text) if self.saw_think else None

    @property
    def answer_text(self) -> str:
        return "".join(self.answer.text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prompt_ends_in_think(prompt_ids: list[int], tokenizer) -> bool:
    """Whether the prompt leaves a think block open (its last think tag is the opening one);
    False for a tokenizer without think tags (``tokenizer.think_tags`` None)."""
    tags = getattr(tokenizer, "think_tags", None)
    if tags is None:
        return False
    think = getattr(tokenizer, "think_id", None)      # the tags' ids when each is one token
    end = getattr(tokenizer, "end_think_id", None)
    if think is not None and end is not None:
        for t in reversed(prompt_ids):
            if t == think:
                return True
            if t == end:
                return False
    text = tokenizer.decode(prompt_ids)              # tokenizers without single-id think tags
    return text.rfind(tags[0]) > text.rfind(tags[1])


__all__ = ["ReasoningSplitter", "prompt_ends_in_think"]
