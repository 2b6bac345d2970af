"""Distil verified reasoning traces from a teacher into a student (as DeepSeek did for R1-Distill).

The teacher ([distill] teacher: a nanoseek run or an HF DeepSeek-V3/R1 checkpoint) samples
[distill] samples_per_prompt completions per RL prompt; the verified ones (right answer, R1
format) are written to RUN/distill.jsonl in the SFT format and the student ([model]: a checkpoint
via init_from, or a preset + config fields for a fresh dense or MoE model) is fine-tuned on them.
With no teacher, the [model] checkpoint samples for itself: rejection sampling.

examples:
  nanoseek distill --set distill.teacher=runs/r1/final_rl --model runs/small --out runs/distill
  nanoseek distill --set distill.teacher=runs/big --set model.preset=tiny --set model.n_routed_experts=0
"""

from __future__ import annotations

from .cli_common import add_stage_arguments, run_stage_command


def add_arguments(parser) -> None:
    add_stage_arguments(parser, "distill", "distill", "distill.prompts",
                        "RL prompts the teacher answers: task names, a .jsonl, or rg:NAME")


def run(args) -> int:
    return run_stage_command(args, "distill", "distill.prompts")
