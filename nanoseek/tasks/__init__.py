"""What a verifiable task is: its problems, the reply format the model answers in, and how a reply is graded.

Below post-training and evaluation, above the tokenizer: ``post/`` (SFT data, GRPO rollouts,
distillation), ``eval/`` (held-out accuracy) and ``infer/`` (reasoning display) all consume these
modules, and none of them imports ``post/``.

* :mod:`~nanoseek.tasks.generators`: the built-in tasks (seeded generators, worked solutions,
  exact verifiers, train/test split by content hash) and task specs (``NAME:LEVELS``);
* :mod:`~nanoseek.tasks.phrasing`: the many wordings of a built-in task's problem (original, seen in
  training, held out of training), the same problem, answer and split under each;
* :mod:`~nanoseek.tasks.sources`: the registry that resolves a task spec's items (built-in tasks,
  ``rg:`` reasoning-gym datasets, ``humaneval``, any registered prefix) to task sources
  (:mod:`~nanoseek.tasks.source`'s interface): held-out problems, training problems, few-shot
  examples, prompts and stop rules, and the grading of replies (one at a time or in a batch);
* :mod:`~nanoseek.tasks.rg`: reasoning-gym's datasets (``rg:NAME(config)``) as tasks: a hash split
  disjoint from training, seed streams, its ``score_answer``, the worked steps some datasets carry;
* :mod:`~nanoseek.tasks.humaneval`: HumanEval's 164 problems (``humaneval``, ``humaneval:A-B``) as an
  evaluation-only source: prompts per mode, its stop sequences, code run in the sandbox in parallel;
* :mod:`~nanoseek.tasks.tool_use`: which problems get tools (``tools`` / ``tool_tasks``, shared by SFT
  traces, GRPO rollouts, evaluation and the speedrun); a task's ideal call is its ``tool_call``;
* :mod:`~nanoseek.tasks.reply`: DeepSeek-R1's reply format (prompt templates, stop rules, the
  scored text, the ``<think>`` split, answer extraction, the format check, SFT targets);
* :mod:`~nanoseek.tasks.rewards`: DeepSeek-R1's rule-based rewards (accuracy and format) over a
  batch, with their config, and the reward function a post-training stage builds from it;
* :mod:`~nanoseek.tasks.code_reward` and :mod:`~nanoseek.tasks.sandbox`: code tasks, graded by
  running the model's program on the task's tests inside the sandbox; an assertion test is
  compiled (``assert_compile``, ``assert_plan``) and judged here (``assert_eval`` over the
  bounded values of ``assert_values``), the sandbox only computing what needs the code.
"""
