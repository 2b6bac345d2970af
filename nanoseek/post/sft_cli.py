"""Supervised fine-tuning on chat data (the loss covers the assistant's tokens only).

Data: a JSONL of {"messages": [{"role", "content", "reasoning"?}, ...]}, or tasks:NAME[,NAME] for
generated cold-start reasoning traces from the built-in tasks. Conversations are packed into rows
of [optim] seq_len tokens (or padded: --set sft.mode=pad). The run folder gets metrics.jsonl,
checkpoints and final/ (an HF checkpoint with its tokenizer).

examples:
  nanoseek sft --model runs/tiny --data chats.jsonl --out runs/sft
  nanoseek sft --model runs/tiny --data tasks:arithmetic,countdown --set sft.num_examples=2000
"""

from __future__ import annotations

from .cli_common import add_stage_arguments, run_stage_command


def add_arguments(parser) -> None:
    add_stage_arguments(parser, "sft", "sft", "sft.data", "SFT JSONL or tasks:NAME[,NAME]")


def run(args) -> int:
    return run_stage_command(args, "sft", "sft.data")
