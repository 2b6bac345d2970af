"""Which problems get tools: the one setting SFT traces, GRPO rollouts, evaluation and the speedrun share.

A stage or an evaluation that uses tools names the built-ins (``tools = "calculator"``, any names of
:data:`nanoseek.tools.toolbox.BUILTINS`) and, optionally, the tasks that get them (``tool_tasks =
"big_arithmetic"``; empty: every built-in task that has a tool call,
:meth:`~nanoseek.tasks.generators.Task.tool_call`). :class:`ToolUse` is that pair, checked: a
problem of a task that gets the tools is prompted with their description in the system turn, its
SFT trace calls the tool (:func:`nanoseek.tasks.reply.tool_sft_messages`), and its samples run
through the engine's tool loop; every other problem is prompted and sampled as without tools, so
one run can ask the model for head math on the easy levels and for tool use on the hard ones.

``describe_tools``: what those prompts say of the tools (:data:`DESCRIBE`):

* ``"full"`` (default; ``true``): their description in the system turn, DeepSeek-V3.1's, written by
  the chat template;
* ``"names"``: a system turn that names them (``Tools: calculator.``, :func:`tools_named_text`), a few
  tokens: the model can tell a prompt with tools from one without, which the description says at a
  cost the speedrun cannot pay (with its 1024-token vocabulary V3.1's description of the calculator
  is 160-410 tokens, several times the whole tool-using reply);
* ``"none"`` (``false``): nothing, the tools are *built in*, as nanochat's calculator is: the prompt is
  the question alone and the model learns from its traces when to call them. It then cannot know
  whether a tool will run: a model that learned to call for a task calls for it without tools too.

A task named with a share (``tool_tasks = "big_arithmetic,arithmetic=0.05"``) gets the tools in its
prompts, rollouts and evaluation like any other, but only that share of its cold-start traces calls
them (:meth:`ToolUse.calls`: a fixed draw per problem id); the rest are solved in the head. So the
cold start shows that the tool exists for the task and GRPO, which runs the tools on its prompts,
learns how often the call pays: with every trace calling, the call is imitated, not chosen.

``offer`` (default 1): the share of such a task's *training* problems (cold-start traces, GRPO
prompts) that are asked with the tools (a second fixed draw per problem id); the others are asked
without them and worked in the head. With prompts that say whether tools are there (``describe``
"full" or "names") the model so learns both policies: call where the tools are offered and it pays,
head math where they are not. Tasks whose every trace calls (no share) are always offered, and
evaluation always offers the tools to the tasks that get them.

Deliberately left out: user-registered Python tools in configs (library users pass their own
Toolbox in code).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from nanoseek.tasks.generators import TASKS, Task, split_specs

DESCRIBE = ("full", "names", "none")   # what a prompt with tools says of them (module docstring)


def describe_mode(value: bool | str, where: str = "describe_tools") -> str:
    """A ``describe`` setting as one of :data:`DESCRIBE` (``true``: "full", ``false``: "none");
    ValueError naming ``where`` otherwise."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in DESCRIBE:
        raise ValueError(f"{where} must be one of {', '.join(DESCRIBE)} (or true / false), got {value!r}")
    return value


def with_system(messages: list[dict[str, Any]], text: str | None) -> list[dict[str, Any]]:
    """``messages`` with ``text`` in the system turn: after the conversation's own system text (a
    blank line between, as V3.1's template appends the tools' description), or as a new first turn;
    without ``text`` (nothing to name) the messages as they are."""
    msgs = [dict(m) for m in messages]
    if not text:
        return msgs
    if msgs and msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}" if msgs[0]["content"] else text
        return msgs
    return [{"role": "system", "content": text}] + msgs


def announce(messages: list[dict[str, Any]], toolbox, describe: bool | str) -> tuple[list[dict[str, Any]], dict]:
    """(messages, the template's extra keyword arguments) of a chat prompt with ``toolbox``'s tools in
    ``describe`` mode: ``{"tools": ...}`` to describe them ("full"), a system turn naming them ("names"),
    or nothing ("none", no toolbox or an empty one)."""
    mode = describe_mode(describe)
    if toolbox is None or not len(toolbox) or mode == "none":
        return list(messages), {}
    if mode == "full":
        return list(messages), {"tools": toolbox.openai_tools()}
    return with_system(messages, tools_named_text([s.name for s in toolbox.specs()])), {}


def add_describe_argument(parser) -> None:
    """``--describe-tools {full,names,none}`` (and ``--no-describe-tools``, the same as ``none``) on an
    argparse parser or group: what the prompts say of ``--tools`` (dest ``describe_tools``; default
    None: :func:`describe_for` the model)."""
    parser.add_argument("--describe-tools", dest="describe_tools", choices=DESCRIBE, default=None,
                        help="what the prompts say of --tools: full (DeepSeek-V3.1's description in the system turn), "
                             "names (a system turn naming them) or none (built in); default: what the model was "
                             "trained with (its stage.json), else full")
    parser.add_argument("--no-describe-tools", dest="describe_tools", action="store_const", const="none",
                        help="the same as --describe-tools none")


def trained_describe(checkpoint: str | Path) -> str | None:
    """What the prompts of the post-training stage that made ``checkpoint`` said of their tools (its
    ``stage.json`` ``describe_tools``, written by :func:`nanoseek.post.stage.run_trainer`; the file
    sits in the stage folder, the parent of ``final/``, or two up from ``checkpoints/step-N``);
    None where no stage record says."""
    p = Path(checkpoint)
    for folder in (p, p.parent, p.parent.parent):
        try:
            record = json.loads((folder / "stage.json").read_text())
        except (OSError, ValueError):
            continue
        value = record.get("describe_tools") if isinstance(record, dict) else None
        return value if value in DESCRIBE else None
    return None


def describe_for(given: str | None, checkpoint: str | Path | None) -> str:
    """A command's ``--describe-tools``: as given, else as the model was trained (:func:`trained_describe`),
    else "full" (V3.1's description, what a DeepSeek checkpoint expects)."""
    if given is not None:
        return describe_mode(given, "--describe-tools")
    return (trained_describe(checkpoint) if checkpoint is not None else None) or "full"


def tools_named_text(names: list[str]) -> str:
    """The system turn of a prompt whose tools are named, not described (``describe = "names"``)."""
    return f"Tools: {', '.join(names)}."


@dataclass(frozen=True)
class ToolUse:
    """Built-in tools (comma-separated names; empty: off), the tasks that get them (task names;
    empty: every built-in task with a tool call), what prompts say of them and the share of a
    partly-calling task's training problems offered them (module docstring)."""

    tools: str = ""
    tasks: str = ""
    describe: str = "full"
    offer: float = 1.0

    @classmethod
    def of(cls, tools: str | list[str] | None, tasks: str | list[str] | None = "", describe: bool | str = True,
           offer: float = 1.0) -> ToolUse:
        """From config values (strings or lists of names), checked: ValueError naming a bad name."""
        norm = [",".join(split_specs(x)) if x else "" for x in (tools, tasks)]
        return cls(*norm, describe=describe_mode(describe), offer=float(offer)).validate()

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
        describe_mode(self.describe)
        if not 0.0 < self.offer <= 1.0:
            raise ValueError(f"tool offer must be in (0, 1] (the share of training problems asked with the tools), "
                             f"got {self.offer:g}")
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

    def _share(self, task: str) -> float:
        return dict(self.task_shares).get(task, 1.0)               # parsed once per ToolUse (cached)

    def offers(self, problem) -> bool:
        """Whether training asks ``problem`` with the tools: its task gets them and, for a task with a
        share of calling traces, the problem's second fixed draw falls within ``offer``."""
        if not self.applies(problem.task):
            return False
        return self.offer >= 1.0 or self._share(problem.task) >= 1.0 or _draw(problem.id, "offer") < self.offer

    def calls(self, problem) -> bool:
        """Whether ``problem``'s cold-start trace calls the tools: training offers them, and the
        problem's fixed draw (a hash of its id, the same in every process) falls within the task's share."""
        if not self.offers(problem):
            return False
        share = self._share(problem.task)
        return share >= 1.0 or _draw(problem.id) < share

    def specs_for(self, task: str) -> list[dict[str, Any]] | None:
        """The OpenAI function definitions a prompt of ``task`` describes (None: no tools, or tools
        that prompts do not describe)."""
        return self.toolbox().openai_tools() if self.describe == "full" and self.applies(task) else None

    def prompt_tools(self, task: str) -> dict[str, Any]:
        """What a prompt of ``task`` that has the tools carries: ``render_prompt``'s ``tools`` (their
        description, "full") and ``system`` (their names, "names"); both None otherwise."""
        return {"tools": self.specs_for(task), "system": self.system_for(task)}

    def system_for(self, task: str) -> str | None:
        """The system turn of a prompt of ``task`` that names its tools (``describe = "names"``), else None."""
        return tools_named_text(self.names) if self.describe == "names" and self.applies(task) else None


def _draw(problem_id: Any, salt: str = "") -> float:
    """A fixed number in [0, 1) per problem id: the same in every process. The call draw (no salt) is
    CRC-32's, as before offers existed; a salted draw is SHA-256's, independent of it (CRC-32 is
    linear, so a salted CRC would follow the unsalted one)."""
    if not salt:
        return zlib.crc32(str(problem_id).encode()) % 1_000_000 / 1_000_000
    return int.from_bytes(hashlib.sha256(f"{salt}:{problem_id}".encode()).digest()[:8], "big") / 2 ** 64


def require_tool_tokens(tokenizer, where: str) -> None:
    """ValueError, one line naming ``where``, when ``tokenizer`` lacks the tool-call tokens (a model
    trained with such a vocabulary cannot call tools; its traces would spell the control strings as text)."""
    from nanoseek.tools.format import TOOL_TOKENS, ToolTokens

    if ToolTokens.of(tokenizer) is None:
        raise ValueError(f"{where}: the tokenizer has no tool-call tokens ({TOOL_TOKENS[0]}...): this model "
                         "cannot call tools")


OFF = ToolUse()

__all__ = ["DESCRIBE", "ToolUse", "OFF", "add_describe_argument", "announce", "describe_for", "describe_mode", "require_tool_tokens", "tools_named_text", "trained_describe", "with_system"]
