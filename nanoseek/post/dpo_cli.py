"""Direct preference optimisation against the frozen starting model.

Data: a JSONL of {"prompt" | "messages", "chosen", "rejected"}, or auto:SOURCE to build pairs from
verifier-labelled samples of the starting model on RL prompts (SOURCE: built-in task names, a
prompts .jsonl or rg:NAME): a correct sample is chosen, a wrong one rejected. The reference
log-probs are computed once before training. Logged: loss, chosen/rejected rewards, margin,
accuracy.

examples:
  nanoseek dpo --model runs/sft --data prefs.jsonl --set dpo.beta=0.1
  nanoseek dpo --model runs/sft --data auto:arithmetic --set dpo.auto_prompts=128
"""

from __future__ import annotations

from .cli_common import add_stage_arguments, run_stage_command


def add_arguments(parser) -> None:
    add_stage_arguments(parser, "dpo", "dpo", "dpo.data", "preferences JSONL or auto:PROMPT_SOURCE")


def run(args) -> int:
    return run_stage_command(args, "dpo", "dpo.data")
