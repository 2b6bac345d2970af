"""Thinking per request: the one default of ``chat``, ``generate`` and ``serve``, and its flag.

DeepSeek-V3.1 made thinking a switch of the chat template rather than of the model: the template
takes a ``thinking`` boolean (vLLM and llama.cpp pass it as a chat-template keyword). Thinking,
the assistant turn opens a ``<think>`` block the model then closes; not thinking, it starts
with the answer. Every chat prompt in nanoseek is rendered as
``tokenizer.encode_chat(messages, add_generation_prompt=True, thinking=<bool>)``, and the engine
reads a reply as reasoning until ``</think>`` when the prompt ends in an open think block.

:data:`DEFAULT_THINKING` is OFF, as in V3.1, and because the speedrun's GRPO policy is sampled in
the "chat" template, without a prefilled think block (the model opens its own when it reasons).
``nanoseek chat``, ``generate`` and ``serve`` all take ``--think/--no-think``
(:func:`add_think_argument`); for ``serve`` it is the default of requests that do not say
(``chat_template_kwargs.thinking`` or ``reasoning_effort``, see ``nanoseek.serve.protocol``).
"""

from __future__ import annotations

import argparse

DEFAULT_THINKING = False


def add_think_argument(p: argparse.ArgumentParser, what: str = "chat prompts") -> None:
    """``--think/--no-think`` (default :data:`DEFAULT_THINKING`) for a command's chat prompts."""
    default = "--think" if DEFAULT_THINKING else "--no-think"
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=DEFAULT_THINKING,
                   help=f"render {what} with the chat template's thinking switch on: the assistant turn opens "
                        f"a <think> block (DeepSeek-V3.1's 'thinking'; default: {default})")


__all__ = ["DEFAULT_THINKING", "add_think_argument"]
