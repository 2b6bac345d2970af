"""Which problems get tools: the one setting SFT traces, GRPO rollouts, evaluation and the speedrun share.

A stage or an evaluation that uses tools names the built-ins (``tools = "calculator"``, any names of
:data:`nanoseek.tools.toolbox.BUILTINS`) and, optionally, the tasks that get them (``tool_tasks =
"big_arithmetic"``; empty: every built-in task that has a tool call,
:meth:`~nanoseek.tasks.generators.Task.tool_call`). :class:`ToolUse` is that pair, checked: a
problem of a task that gets the tools is prompted with their description in the system turn, its
SFT trace calls the tool (:func:`nanoseek.tasks.reply.tool_sft_messages`), and its samples run
through the engine's tool loop; every other problem is prompted and sampled as without tools, so
one run can ask the model for head math on the easy levels and for tool use on the hard ones.

``describe_tools`` (default on): whether those prompts carry the tools' description in the system
turn (DeepSeek-V3.1's, written by the chat template). Off, the tools are *built in*, as nanochat's
calculator is: the prompt is the question alone and the model learns from its traces when to call
them. The speedrun turns it off: with its 1024-token vocabulary V3.1's description of the
calculator is 160-410 tokens, several times the whole tool-using reply.

A task named with a share (``tool_tasks = "big_arithmetic,arithmetic=0.05"``) gets the tools in its
prompts, rollouts and evaluation like any other, but only that share of its cold-start traces calls
them (:meth:`ToolUse.calls`: a fixed draw per problem id); the rest are solved in the head. So the
cold start shows that the tool exists for the task and GRPO, which runs the tools on its prompts,
learns how often the call pays: with every trace calling, the call is imitated, not chosen.

Deliberately left out: user-registered Python tools in configs (library users pass their own
Toolbox in code).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nanoseek.tasks.generators import TASKS, Task, split_specs


@dataclass(frozen=True)
class ToolUse:
    """Built-in tools (comma-separated names; empty: off) and the tasks that get them (task names;
    empty: every built-in task with a tool call)."""

    tools: str = ""
    tasks: str = ""
    describe: bool = True

    @classmethod
    def of(cls, tools: str | list[str] | None, tasks: str | list[str] | None = "", describe: bool = True) -> ToolUse:
        """From config values (strings or lists of names), checked: ValueError naming a bad name."""
        norm = [",".join(split_specs(x)) if x else "" for x in (tools, tasks)]
        return cls(*norm, describe=bool(describe)).validate()

    @property
    def enabled(self) -> bool:
        return bool(self.tools)

    @property
    def names(self) -> list[str]:
        return split_specs(self.tools) if self.tools else []

    @property
    def task_names(self) -> list[str]:
        return [name for name, _ in self.task_shares]

    @cached_property
    def task_shares(self) -> list[tuple[str, float]]:
        """(task name, share of its cold-start traces that call the tools) of each ``tasks`` entry
        (``NAME`` or ``NAME=SHARE``; SHARE in (0, 1], default 1)."""
        out = []
        for item in split_specs(self.tasks) if self.tasks else []:
            name, eq, share = item.partition("=")
            try:
                value = float(share) if eq else 1.0
            except ValueError:
                raise ValueError(f"tool_tasks: {item!r}: the share after '=' must be a number in (0, 1]") from None
            if not 0.0 < value <= 1.0:
                raise ValueError(f"tool_tasks: {item!r}: the share after '=' must be in (0, 1], got {value:g}")
            name = name.strip()
            if any(n == name and v != value for n, v in out):
                raise ValueError(f"tool_tasks: {name!r} is named twice with different shares")
            out.append((name, value))
        return out

    def validate(self) -> ToolUse:
        from nanoseek.tools.toolbox import BUILTINS

        for n in self.names:
            if n not in BUILTINS:
                raise ValueError(f"tools: unknown built-in tool {n!r}; built-ins: {', '.join(sorted(BUILTINS))}")
        if self.tasks and not self.tools:
            raise ValueError(f"tool_tasks = {self.tasks!r} names tasks for tools, but no tools are on (tools = \"\")")
        for t in self.task_names:
            if t not in TASKS:
                raise ValueError(f"tool_tasks: unknown task {t!r}; built-in tasks: {', '.join(sorted(TASKS))}")
        return self

    def toolbox(self):
        """A fresh :class:`~nanoseek.tools.toolbox.Toolbox` of the built-ins (None when off)."""
        from nanoseek.tools.toolbox import Toolbox

        return Toolbox.builtin(self.names) if self.enabled else None

    def applies(self, task: str) -> bool:
        """Whether problems of ``task`` get the tools."""
        if not self.enabled:
            return False
        if self.tasks:
            return task in self.task_names
        t = TASKS.get(task)
        return t is not None and type(t).tool_call is not Task.tool_call

    def calls(self, problem) -> bool:
        """Whether ``problem``'s cold-start trace calls the tools: its task gets them, and the problem's
        fixed draw (a hash of its id, the same in every process) falls within the task's share."""
        if not self.applies(problem.task):
            return False
        share = dict(self.task_shares).get(problem.task, 1.0)      # parsed once per ToolUse (cached)
        return share >= 1.0 or zlib.crc32(str(problem.id).encode()) % 1_000_000 < share * 1_000_000

    def specs_for(self, task: str) -> list[dict[str, Any]] | None:
        """The OpenAI function definitions a prompt of ``task`` describes (None: no tools, or built-in
        tools that prompts do not describe)."""
        return self.toolbox().openai_tools() if self.describe and self.applies(task) else None


def require_tool_tokens(tokenizer, where: str) -> None:
    """ValueError, one line naming ``where``, when ``tokenizer`` lacks the tool-call tokens (a model
    trained with such a vocabulary cannot call tools; its traces would spell the control strings as text)."""
    from nanoseek.tools.format import TOOL_TOKENS, ToolTokens

    if ToolTokens.of(tokenizer) is None:
        raise ValueError(f"{where}: the tokenizer has no tool-call tokens ({TOOL_TOKENS[0]}...): this model "
                         "cannot call tools")


OFF = ToolUse()

__all__ = ["ToolUse", "OFF", "require_tool_tokens"]
