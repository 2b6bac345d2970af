"""Supervised fine-tuning on chat data: the loss covers the assistant's tokens only.

Each conversation is rendered with the tokenizer's chat template (DeepSeek-R1 style, an assistant
``reasoning`` field becoming ``<think>\\n...\\n</think>\\n\\n``) and turned into next-token labels
that are ``-100`` everywhere except on what the assistant wrote (its reasoning, its answer and its
closing EOS): system and user text and the role headers are context, not targets. Message content
and reasoning are encoded as text (``encode_chat``): a control-token string in the data
(``<｜User｜>``, ``<think>``...) stays text; only the template makes control tokens, so reasoning
belongs in the ``reasoning`` field, not as ``<think>`` tags inside ``content``.

Two batching modes:

* ``pack`` (default): whole conversations are packed first-fit into rows of ``max_seq_len``
  tokens (no conversation is split across rows; the rest of a row is padding), like DeepSeek's
  document packing without cross-document attention masks. Few padding tokens, many examples
  per row.
* ``pad``: one conversation per row, right-padded to the longest row of the micro-batch.

A conversation longer than ``max_seq_len`` is truncated on the right (counted and reported).
The cold-start data of the R1 recipe can come straight from task generators (``data =
"tasks:arithmetic,countdown"``, any task spec of :mod:`nanoseek.tasks.sources`): question ->
``<think>`` worked steps -> answer. ``data = "rg:NAME"`` (short for ``tasks:rg:NAME``) takes
reasoning-gym's train split: the worked steps where the dataset carries them
(:data:`nanoseek.tasks.rg.TRACES`: ``gsm_symbolic``'s solution, the string-rewriting datasets'
states), else the answer alone after an empty ``<think></think>`` (no reasoning to imitate). With
``tools = "calculator"`` (and ``tool_tasks``, :mod:`nanoseek.tasks.tool_use`) the traces of the tasks
that get the tool describe or name it in the system turn (``describe_tools``; ``tool_offer``: the share of
a partly-calling task's problems that have it) and call it (DeepSeek-V3.1's format, the tool's real
output in a ``tool`` message, :func:`nanoseek.tasks.reply.tool_sft_messages`); the template's mask
leaves the tool's output out of the loss.

:class:`SFTTask` plugs into the shared trainer; :func:`train_sft` runs the whole stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import IGNORE, IndexStream, StreamBatches, chat_row, pad_rows
from .datasets import DataError, SFTExample, check_file, read_sft, source_key, training_sources

SFT_MODES = ("pack", "pad")


@dataclass
class SFTSection:
    """The ``[sft]`` table. Rows are at most ``[optim] seq_len`` tokens, ``[optim] micro_batch_size``
    rows per micro-batch."""

    data: str = ""                   # SFT JSONL, "tasks:SPEC" (built-in tasks, rg:NAME) or "rg:NAME": generated traces
    num_examples: int = 0            # examples used (0: the whole file; required with tasks: / rg:)
    template: str = "r1"             # tasks: data only: "r1" (chat, "Answer: X") or "r1-zero" (<answer> tags)
    tools: str = ""                  # tasks: data only: built-in tools ("calculator") whose calls the traces show
    tool_tasks: str = ""             # ...for these tasks ("": every task with a tool call; NAME=SHARE: that share
                                     # of its traces, the rest in the head; nanoseek.tasks.tool_use)
    describe_tools: bool | str = "full"  # what prompts say of the tools: full, names or none (nanoseek.tasks.tool_use)
    tool_offer: float = 1.0          # share of a partly-calling tool task's problems asked with the tools
    mode: str = "pack"               # pack | pad
    tokenizer: str = ""              # tokenizer directory (default: found next to the checkpoint)
    seed: int = 0                    # data order / packing

    def validate(self) -> "SFTSection":
        if self.mode not in SFT_MODES:
            raise ValueError(f"mode = {self.mode!r}: must be one of {SFT_MODES}")
        from nanoseek.tasks.reply import ANSWER_FORMS

        if self.template not in ANSWER_FORMS:
            raise ValueError(f"template = {self.template!r}: must be 'r1' or 'r1-zero'")
        if self.num_examples < 0:
            raise ValueError(f"num_examples = {self.num_examples}: must be >= 0")
        use = self.tool_use
        if use.enabled and self.template != "r1":
            raise ValueError(f"tools = {self.tools!r}: tool-using traces are chat turns (template = \"r1\"), "
                             f"not {self.template!r}")
        return self

    @property
    def tool_use(self):
        from nanoseek.tasks.tool_use import ToolUse

        return ToolUse.of(self.tools, self.tool_tasks, self.describe_tools, self.tool_offer)

    @property
    def eval_mode(self) -> str:
        """The prompt template the trained model answers in (recorded in stage.json): the chat template."""
        return "chat"

    def check_sources(self) -> None:
        """The data source, checked without a model (:func:`~nanoseek.post.stage.parse_stage_config`
        calls it): a DataError ``data: why`` for what :func:`load_sft_examples` would refuse."""
        if self.data:          # empty: the caller passes the examples (else train_sft refuses it)
            with source_key("data"):
                check_sft_data(self.data, self.num_examples)


def task_spec(data: str) -> str | None:
    """The task spec of generated SFT data (``tasks:SPEC`` or ``rg:...``), None for a file."""
    if data.startswith("tasks:"):
        return data[len("tasks:"):]
    return data if data.startswith("rg:") else None


def check_sft_data(data: str, n: int = 0) -> None:
    """What :func:`load_sft_examples` refuses before reading: generated data (``tasks:`` / ``rg:``)
    without a number of examples or with a bad task spec, a file that is missing or not a regular file."""
    spec = task_spec(data)
    if spec is not None:
        if n <= 0:
            raise DataError(f"SFT data {data!r} needs a number of examples (num_examples > 0)")
        _with_gold(training_sources(spec))
    else:
        check_file(data)


def _with_gold(sources: list) -> list:
    """``sources``, or a DataError naming the first whose problems carry no gold answer to train on."""
    for src in sources:
        if not src.has_gold:
            raise DataError(f"SFT data: {src.name} has no gold answers (its score_answer accepts many): nothing to "
                            "imitate; use it as GRPO prompts or to evaluate")
    return sources


def task_sft_examples(source: str, n: int, split: str = "train", seed: int = 0,
                      template: str = "r1", tool_use=None) -> list[SFTExample]:
    """Cold-start SFT examples from a task spec ``"a,b"`` (levels optional: ``"a:1-2,b"``;
    reasoning-gym: ``"rg:NAME"``), in equal shares: user question -> reasoning + answer.

    ``template="r1"``: chat turns with the worked steps as ``reasoning`` and ``Answer: X``;
    ``"r1-zero"``: the R1-Zero prompt as the user turn and ``<answer>X</answer>`` as the answer.
    ``tool_use`` (a :class:`~nanoseek.tasks.tool_use.ToolUse`): the problems it calls the tools for
    (:meth:`~nanoseek.tasks.tool_use.ToolUse.calls`: the tasks it applies to, a share of a task named
    ``NAME=SHARE``) are prompted with the tools and answered by calling them
    (:func:`~nanoseek.tasks.reply.tool_sft_messages`, the tool's real output); the others in the head,
    prompted with the tools when training offers them (:meth:`~nanoseek.tasks.tool_use.ToolUse.offers`).
    """
    from nanoseek.tasks.reply import sft_messages, tool_sft_messages
    from nanoseek.tasks.tool_use import with_system

    sources = _with_gold(training_sources(source))
    toolbox = tool_use.toolbox() if tool_use is not None and tool_use.enabled else None
    out: list[SFTExample] = []
    for k, src in enumerate(sources):
        share = n // len(sources) + (1 if k < n % len(sources) else 0)
        try:
            problems = src.problems(split, share, seed)
        except ValueError as e:
            raise DataError(str(e)) from None
        for p in problems:
            offered = toolbox is not None and tool_use.offers(p)     # the prompt has the tools; a share of those calls
            calls = offered and tool_use.calls(p)
            prompt = tool_use.prompt_tools(p.task) if offered else {"tools": None, "system": None}
            try:
                messages = (tool_sft_messages(p, toolbox) if calls else None) or sft_messages(p, template)
            except ValueError as e:
                raise DataError(str(e)) from None
            out.append(SFTExample(messages=with_system(messages, prompt["system"]), meta={"id": p.id, "task": p.task},
                                  where=f"task {p.id}", tools=prompt["tools"]))
    return out


def load_sft_examples(data: str, n: int = 0, seed: int = 0, template: str = "r1", tool_use=None) -> list[SFTExample]:
    """A JSONL file, or generated cold-start traces (``tasks:SPEC`` / ``rg:NAME``, ``n`` of them;
    ``tool_use``: which of them call tools, :func:`task_sft_examples`)."""
    check_sft_data(data, n)
    spec = task_spec(data)
    if spec is not None:
        return task_sft_examples(spec, n, seed=seed, template=template, tool_use=tool_use)
    examples = read_sft(data)
    return examples[:n] if n else examples


@dataclass
class SFTRows:
    """Tokenised examples (each a row of ids and labels) and what tokenising them cost."""

    ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0
    trained_tokens: int = 0


def tokenize_examples(tokenizer, examples: list[SFTExample], max_seq_len: int) -> SFTRows:
    rows = SFTRows([], [])
    tooled = next((ex for ex in examples if getattr(ex, "tools", None)), None)
    if tooled is not None:
        from nanoseek.tasks.tool_use import require_tool_tokens

        try:
            require_tool_tokens(tokenizer, f"{tooled.where or 'SFT data'}: a tool-using example")
        except ValueError as e:
            raise DataError(str(e)) from None
    for ex in examples:
        ids, labels, cut = chat_row(tokenizer, ex.messages, max_seq_len, getattr(ex, "tools", None))
        n = sum(x != IGNORE for x in labels)
        if n == 0:
            raise DataError(f"{ex.where or 'example'}: no assistant token within max_seq_len={max_seq_len} "
                            "(raise max_seq_len or shorten the prompt)")
        rows.ids.append(ids)
        rows.labels.append(labels)
        rows.truncated += cut
        rows.trained_tokens += n
    return rows


def pack_rows(rows: SFTRows, max_seq_len: int, seed: int = 0) -> list[list[int]]:
    """First-fit packing of whole examples (in a seeded order) into rows of <= max_seq_len tokens;
    returns the example indices of every packed row."""
    import random

    order = list(range(len(rows.ids)))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows.ids[i])
        for b in range(len(bins)):
            if space[b] >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_seq_len - n)
    return bins


class SFTTask:
    """SFT as a task of the shared trainer."""

    def __init__(self, rows: SFTRows, pad_id: int, micro_batch_size: int, max_seq_len: int,
                 mode: str = "pack", seed: int = 0, mtp_lambda: float = 0.0):
        if mode not in SFT_MODES:
            raise ValueError(f"SFT mode must be one of {SFT_MODES}, got {mode!r}")
        self.rows, self.pad_id, self.mode, self.max_seq_len = rows, pad_id, mode, max_seq_len
        self.mtp_lambda = mtp_lambda
        self.units = pack_rows(rows, max_seq_len, seed) if mode == "pack" else [[i] for i in range(len(rows.ids))]
        self.stream = IndexStream(len(self.units), micro_batch_size, seed)

    @property
    def padding_fraction(self) -> float:
        """Share of padding tokens in the packed rows (pack mode) at length max_seq_len."""
        used = sum(len(self.rows.ids[i]) for u in self.units for i in u)
        return 1 - used / (len(self.units) * self.max_seq_len)

    def make_batch(self, unit_indices: list[int]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for u in unit_indices:
            ids.append([t for i in self.units[u] for t in self.rows.ids[i]])
            labels.append([t for i in self.units[u] for t in self.rows.labels[i]])
        n = max(len(r) for r in ids)
        return {"input_ids": pad_rows(ids, self.pad_id, n), "labels": pad_rows(labels, IGNORE, n)}

    def batches(self):
        return StreamBatches(self.stream, self.make_batch)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
        loss = out.loss
        metrics = {"ce": float(out.loss.detach()), "tokens": int((batch["labels"] != IGNORE).sum())}
        if out.mtp_loss is not None and self.mtp_lambda > 0:
            loss = loss + self.mtp_lambda * out.mtp_loss
            metrics["mtp_loss"] = float(out.mtp_loss.detach())
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            metrics["aux_loss"] = float(out.aux_loss.detach())
        return loss, metrics


def train_sft(cfg, *, model=None, tokenizer=None, examples: list[SFTExample] | None = None,
              resume: bool | str = False, quiet: bool = False, progress: bool | None = None):
    """Run an SFT stage (:class:`~nanoseek.post.stage.StageConfig` of kind "sft" or "distill").

    ``model`` / ``tokenizer`` / ``examples`` override what the config names (the recipe and the
    tests pass them in); returns a :class:`~nanoseek.post.stage.StageResult` whose ``extra`` holds
    the example, row and truncation counts.
    """
    from .stage import check_vocab, load_model, load_tokenizer_for, run_trainer

    a, o = cfg.algo, cfg.optim
    ckpt = None
    if model is None:
        model, ckpt = load_model(cfg.model, cfg.train.device)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(ckpt, a.tokenizer)
    check_vocab(model, tokenizer)
    if examples is None:
        if not a.data:
            raise DataError(f"{cfg.source}: [{cfg.kind}] data is empty: give an SFT JSONL or tasks:NAME")
        examples = load_sft_examples(a.data, a.num_examples, a.seed, a.template, getattr(a, "tool_use", None))
    rows = tokenize_examples(tokenizer, examples, o.seq_len)
    model.use_mtp = cfg.train.mtp_lambda > 0 and model.config.num_nextn_predict_layers > 0
    task = SFTTask(rows, tokenizer.pad_id, o.micro_batch_size, o.seq_len, a.mode, a.seed, cfg.train.mtp_lambda)
    extra: dict[str, Any] = {"examples": len(examples), "rows": len(task.units), "truncated": rows.truncated,
                             "padding_fraction": round(task.padding_fraction, 4),
                             "trained_tokens_per_epoch": rows.trained_tokens}
    if rows.truncated and not quiet:
        print(f"sft: {rows.truncated} of {len(examples)} conversations were longer than seq_len={o.seq_len} "
              "and were truncated on the right")
    return run_trainer(model, task, cfg, tokenizer, resume=resume, quiet=quiet, progress=progress, extra=extra)


__all__ = ["SFT_MODES", "SFTSection", "train_sft", "task_sft_examples", "check_sft_data", "load_sft_examples",
           "SFTRows", "tokenize_examples", "pack_rows", "SFTTask"]
