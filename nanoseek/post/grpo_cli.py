"""GRPO with rule-based rewards (DeepSeek-R1-Zero / R1), or a whole multi-stage recipe.

Each step samples G completions per prompt with the inference engine, rewards them with the
verifiers (format + accuracy), normalises the rewards within each group, and takes
[grpo] num_iterations policy-gradient steps ([grpo] policy_loss: GRPO's clipped surrogate, GSPO's
sequence-level ratio or CISPO's clipped IS weights; optional k3 KL to the starting model with
[grpo] beta > 0). Prompts: built-in task names ("arithmetic,countdown"), a JSONL of
{"prompt", "answer", "task"}, or rg:NAME (reasoning-gym; mixed with task names: "arithmetic:1,rg:chain_sum").

Shipped configs: r1-zero (GRPO straight from the base model with the R1-Zero template) and r1
(cold-start SFT -> GRPO -> rejection-sampling SFT -> GRPO, a multi-stage recipe).

examples:
  nanoseek grpo --config r1-zero --model runs/tiny --steps 200
  nanoseek grpo --config r1 --model runs/tiny --out runs/r1
  nanoseek grpo --config r1-zero --model runs/tiny --set grpo.loss_agg=dr_grpo --set grpo.scale_rewards=false
  nanoseek grpo --config r1-zero --model runs/tiny --set grpo.policy_loss=gspo --set grpo.num_iterations=2
"""

from __future__ import annotations

from .cli_common import add_stage_arguments, run_stage_command


def add_arguments(parser) -> None:
    add_stage_arguments(parser, "grpo", "r1-zero", "grpo.prompts", "RL prompts: task names, a .jsonl, or rg:NAME")


def run(args) -> int:
    return run_stage_command(args, "grpo", "grpo.prompts")
