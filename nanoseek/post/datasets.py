"""Post-training data: validated readers for SFT chats, preference pairs and RL prompts.

Three JSONL formats, one JSON object per line (blank lines are skipped):

* **SFT**: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
  "reasoning": str (assistant only, optional)}, ...], "tools": [...] (optional)}``. At least one
  assistant turn; the loss covers the assistant tokens only (the tokenizer's ``encode_chat`` mask:
  a tool's output is context, never a target). Tool use (DeepSeek-V3.1's format): ``tools`` are
  OpenAI function definitions (described in the system turn), an assistant message may carry
  OpenAI's ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``) and
  a ``tool`` message answers one with its ``content`` (and ``tool_call_id``).
* **Preferences** (DPO): ``{"prompt": str}`` or ``{"messages": [...]}`` (the conversation before
  the response, ending with a user turn), plus ``"chosen"`` and ``"rejected"``, each a string
  (the assistant's content) or an assistant message ``{"role": "assistant", "content", "reasoning"}``.
* **RL prompts** (GRPO): ``{"prompt": str, "answer": str, "task": str}``; ``task`` names the
  verifier: a built-in task (``arithmetic``, ``countdown``... : its exact checker), ``math``
  (math-verify equivalence) or ``code`` (needs ``"tests"``: run in the sandbox); other keys
  (``id``, ``tests``...) are kept in ``extra`` for the verifier.

Any other key, a wrong type, a missing field or invalid JSON raises :class:`DataError` naming
``file:line`` and the field, so a bad record is never silently dropped or half-used.

RL prompts can also come from generators instead of a file (:func:`load_rl_prompts`): a task spec
resolved by :mod:`nanoseek.tasks.sources`: built-in tasks of ``nanoseek.tasks.generators`` by name
(the same generators that feed the pre-training corpus) and reasoning-gym datasets (``rg:NAME`` or
``rg:NAME(key=value, ...)``, :mod:`nanoseek.tasks.rg`: their train split, graded by their own
``score_answer``), mixed in one list.

What the readers would refuse about a source before reading it (:func:`check_file`,
:func:`check_rl_source`, :func:`check_task_level`; a task spec naming a source for evaluation only,
such as ``humaneval``, by :func:`training_sources`) is also what each stage section's
``check_sources`` runs when its config is read, with :func:`source_key` naming the config key, so
a missing file or a bad task spec fails before a model is loaded or an earlier stage trains.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nanoseek.atomic import write_atomic
from nanoseek.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "reasoning", "tool_calls", "tool_call_id"}
SFT_KEYS = {"messages", "tools", "id", "source", "task"}  # id/source/task: provenance, kept as metadata
PREF_KEYS = {"prompt", "messages", "chosen", "rejected", "id", "source", "task"}
RL_KEYS = {"prompt", "answer", "task"}                   # required; anything else goes to ``extra``
EXTERNAL_VERIFIERS = ("math", "code")                    # checkers of nanoseek.tasks.rewards besides the tasks


class DataError(UserError, ValueError):
    """A post-training data file is malformed; the message starts with ``file:line:``."""


@dataclass
class SFTExample:
    messages: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""                  # "file:line" for later error messages
    tools: list[dict[str, Any]] | None = None   # OpenAI function definitions the system turn describes


@dataclass
class PreferenceExample:
    prompt: list[dict[str, Any]]     # the conversation before the response (ends with a user turn)
    chosen: dict[str, Any]           # an assistant message
    rejected: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass
class RLPrompt:
    """One question for RL with what its verifier needs."""

    prompt: str                      # the question text (the template is applied by the trainer)
    answer: str                      # gold answer
    task: str                        # verifier name
    id: str = ""
    problem: Any = None              # the nanoseek.tasks.generators.Problem when built-in
    extra: dict[str, Any] = field(default_factory=dict)
    score_answer: Callable[[str | None], float] | None = None  # external verifier (reasoning-gym)
    extract: Callable[[str], str | None] | None = None  # its answer extraction (None: extract_answer)

    def record(self) -> Any:
        """What ``nanoseek.tasks.rewards.score`` takes: the Problem, or a plain record dict."""
        if self.problem is not None:
            return self.problem
        return {"prompt": self.prompt, "answer": self.answer, "task": self.task, "id": self.id, **self.extra}


# ----------------------------------------------------------------------------- JSONL reading


def check_file(path: str | Path) -> Path:
    """``path`` as a Path when it is an existing regular file; otherwise a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    return path


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line", object) for every non-blank line; invalid JSON or a non-object raises."""
    path = check_file(path)
    with path.open("rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte offset "
                                f"{offset + e.start} of the file)") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _unknown(where: str, obj: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise DataError(f"{where}: unknown key(s) {extra} in {what}; allowed: {sorted(allowed)}")


def check_message(where: str, m: Any, i: int | str) -> dict[str, Any]:
    """Validate one chat message; returns it with only the known keys."""
    ctx = f"{where}: messages[{i}]"
    if not isinstance(m, dict):
        raise DataError(f"{ctx}: expected an object with 'role' and 'content', got {type(m).__name__}")
    _unknown(ctx, m, MESSAGE_KEYS, "a message")
    if m.get("content") is None and m.get("tool_calls") is not None:   # OpenAI: a call's content may be null
        m = {**m, "content": ""}
    for key in ("role", "content"):
        if key not in m:
            raise DataError(f"{ctx}: missing field '{key}'")
    if m["role"] not in ROLES:
        raise DataError(f"{ctx}.role: unknown role {m['role']!r}; expected one of {list(ROLES)}")
    if not isinstance(m["content"], str):
        raise DataError(f"{ctx}.content: must be a string, got {type(m['content']).__name__}")
    if m.get("reasoning") is not None:
        if m["role"] != "assistant":
            raise DataError(f"{ctx}.reasoning: only assistant messages may carry reasoning")
        if not isinstance(m["reasoning"], str):
            raise DataError(f"{ctx}.reasoning: must be a string, got {type(m['reasoning']).__name__}")
    if m.get("tool_calls") is not None:
        if m["role"] != "assistant":
            raise DataError(f"{ctx}.tool_calls: only assistant messages may call tools")
        _check_tool_calls(f"{ctx}.tool_calls", m["tool_calls"])
    if m.get("tool_call_id") is not None and (m["role"] != "tool" or not isinstance(m["tool_call_id"], str)):
        raise DataError(f"{ctx}.tool_call_id: a string, on tool messages only")
    return {k: m[k] for k in ("role", "content", "reasoning", "tool_calls", "tool_call_id") if m.get(k) is not None}


def _check_tool_calls(ctx: str, calls: Any) -> None:
    """OpenAI's ``tool_calls`` shape: a non-empty list of ``{"id", "type": "function", "function":
    {"name", "arguments"}}`` (arguments a JSON string or an object)."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{ctx}: must be a non-empty list of calls")
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise DataError(f"{ctx}[{i}].function: missing or not an object")
        if c.get("type", "function") != "function":
            raise DataError(f"{ctx}[{i}].type: must be 'function', got {c.get('type')!r}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{ctx}[{i}].function.name: must be a non-empty string")
        if not isinstance(fn.get("arguments"), (str, dict)):
            raise DataError(f"{ctx}[{i}].function.arguments: must be a JSON string or an object")


def check_tools(where: str, tools: Any) -> list[dict[str, Any]]:
    """A record's ``tools``: OpenAI function definitions (:meth:`ToolSpec.from_openai` checks each)."""
    from nanoseek.tools.format import ToolFormatError, ToolSpec

    if not isinstance(tools, list) or not tools:
        raise DataError(f"{where}: 'tools' must be a non-empty list of function definitions")
    for i, t in enumerate(tools):
        try:
            ToolSpec.from_openai(t, f"tools[{i}]")
        except ToolFormatError as e:
            raise DataError(f"{where}: {e}") from None
    return tools


def _messages(where: str, obj: dict) -> list[dict[str, Any]]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    return [check_message(where, m, i) for i, m in enumerate(msgs)]


def _meta(obj: dict) -> dict[str, Any]:
    return {k: obj[k] for k in ("id", "source", "task") if k in obj}


def parse_sft(where: str, obj: dict) -> SFTExample:
    _unknown(where, obj, SFT_KEYS, "an SFT record")
    if "messages" not in obj:
        raise DataError(f"{where}: missing field 'messages' (SFT records are {{\"messages\": [...]}})")
    msgs = _messages(where, obj)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message: nothing to train on")
    tools = check_tools(where, obj["tools"]) if obj.get("tools") is not None else None
    return SFTExample(messages=msgs, meta=_meta(obj), where=where, tools=tools)


def _response(where: str, obj: dict, key: str) -> dict[str, Any]:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    v = obj[key]
    if isinstance(v, str):
        return {"role": "assistant", "content": v}
    if isinstance(v, dict):
        m = check_message(where, v, key)
        if m["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must be an assistant message, got role {m['role']!r}")
        return m
    raise DataError(f"{where}: '{key}' must be a string or an assistant message, got {type(v).__name__}")


def parse_preference(where: str, obj: dict) -> PreferenceExample:
    _unknown(where, obj, PREF_KEYS, "a preference record")
    if ("prompt" in obj) == ("messages" in obj):
        raise DataError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        prompt = [{"role": "user", "content": obj["prompt"]}]
    else:
        prompt = _messages(where, obj)
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: 'messages' must end with a user message (the response follows it)")
    chosen, rejected = _response(where, obj, "chosen"), _response(where, obj, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, meta=_meta(obj), where=where)


def parse_rl_prompt(where: str, obj: dict) -> RLPrompt:
    for key in ("prompt", "answer", "task"):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}' (RL prompts are {{\"prompt\", \"answer\", \"task\"}})")
    if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(obj["answer"], bool) or not isinstance(obj["answer"], (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number, got {type(obj['answer']).__name__}")
    from nanoseek.tasks.generators import TASKS, Problem

    task = obj["task"]
    valid = sorted(TASKS) + list(EXTERNAL_VERIFIERS)
    if task not in valid:
        raise DataError(f"{where}: unknown task {task!r} (the verifier); valid: {', '.join(valid)}")
    if task == "code":
        from nanoseek.tasks.rewards import check_code_tests

        try:
            check_code_tests(obj.get("tests"), obj.get("entry_point"))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    extra = {k: v for k, v in obj.items() if k not in RL_KEYS and k != "id"}
    item = RLPrompt(prompt=obj["prompt"], answer=str(obj["answer"]), task=task, id=str(obj.get("id", where)),
                    extra=extra)
    if task in TASKS:  # a built-in task's exact verifier checks a Problem
        item.problem = Problem(task=task, id=item.id, prompt=item.prompt, answer=item.answer, reasoning="", level=0)
    return item


def read_sft(path: str | Path) -> list[SFTExample]:
    return _read(path, parse_sft, "SFT")


def read_preferences(path: str | Path) -> list[PreferenceExample]:
    return _read(path, parse_preference, "preference")


def read_rl_prompts(path: str | Path) -> list[RLPrompt]:
    return _read(path, parse_rl_prompt, "RL prompt")


def _read(path, parse, what: str) -> list:
    out = [parse(where, obj) for where, obj in iter_jsonl(path)]
    if not out:
        raise DataError(f"{path}: no {what} records (the file is empty)")
    return out


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write records one per line (UTF-8), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------- RL prompt sources


def task_specs(source: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """``"arithmetic:1-2,compare"`` -> (name, levels) pairs; a DataError naming a bad item."""
    from nanoseek.tasks.generators import parse_task_specs

    try:
        return parse_task_specs(source)
    except ValueError as e:
        raise DataError(str(e)) from None


def task_prompts(name: str, n: int, split: str = "train", seed: int = 0,
                 level: int | Sequence[int] | None = None) -> list[RLPrompt]:
    """``n`` prompts of the built-in task ``name`` (repeats allowed when a level is small)."""
    from nanoseek.tasks.generators import get_task

    try:
        task = get_task(name)
    except KeyError as e:
        raise DataError(str(e.args[0])) from None
    try:
        problems = task.generate(split, n, seed=seed, level=level)
    except ValueError:  # the level's space is smaller than n: draw with repeats
        problems = task.generate(split, n, seed=seed, level=level, unique=False)
    return [RLPrompt(prompt=p.prompt, answer=p.answer, task=p.task, id=p.id, problem=p) for p in problems]


def task_sources(source: str) -> list:
    """The task sources of a spec (:func:`nanoseek.tasks.sources.parse_sources`); a DataError naming a bad item."""
    from nanoseek.tasks.sources import parse_sources

    try:
        return parse_sources(source)
    except ValueError as e:
        raise DataError(str(e)) from None


def training_sources(source: str) -> list:
    """The task sources of a spec to train on (RL prompts, SFT traces, DPO pairs); a DataError naming a bad
    item or one that is for evaluation only (HumanEval: no training split)."""
    sources = task_sources(source)
    for src in sources:
        if not src.trainable:
            raise DataError(f"task {src.name!r} is for evaluation only (it has no training split); evaluate "
                            f"it with nanoseek eval --tasks {src.name}")
    return sources


def source_prompts(src, n: int, seed: int = 0, level: int | None = None, split: str = "train") -> list[RLPrompt]:
    """``n`` prompts of ``split`` of one task source: a built-in task's Problems (graded by its exact
    verifier), or an external dataset's (graded by its own scorer, e.g. reasoning-gym's ``score_answer``)."""
    out = []
    try:
        problems = src.problems(split, n, seed, level)
    except ValueError as e:
        raise DataError(str(e)) from None
    for p in problems:
        scorer = src.external_scorer(p)
        out.append(RLPrompt(prompt=p.prompt, answer=p.answer, task=p.task, id=p.id,
                            problem=None if scorer else p, score_answer=scorer,
                            extract=src.extractor(p) if scorer else None))
    return out


def reasoning_gym_prompts(name: str, n: int, seed: int = 0) -> list[RLPrompt]:
    """``n`` train prompts of reasoning-gym's dataset ``name`` (``NAME`` or ``NAME(key=value, ...)``),
    verified by its own ``score_answer``."""
    [src] = task_sources("rg:" + name)
    return source_prompts(src, n, seed)


def load_rl_prompts(source: str, n: int, split: str = "train", seed: int = 0,
                    level: int | None = None, weights: str = "") -> list[RLPrompt]:
    """RL prompts from ``source``: a ``.jsonl`` file, or a task spec: built-in task names and
    reasoning-gym datasets separated by commas (``"arithmetic:1-2,rg:leg_counting"``: mixed in equal
    shares, shuffled); a built-in name's levels (``"arithmetic:1-2"``) override ``level``, which
    reasoning-gym datasets do not have. ``weights`` (``"big_arithmetic=0.25"``,
    :func:`parse_weights`): a named source's share relative to the others' 1.

    For a file, ``n`` = 0 keeps all records, otherwise the first ``n``.
    """
    specs = check_rl_source(source)
    check_task_level(specs, level)
    check_prompt_weights(source, weights)
    if _is_file_source(source):
        items = read_rl_prompts(source)
        return items[:n] if n else items
    sources = training_sources(source)
    out: list[RLPrompt] = []
    for src, share in zip(sources, weighted_shares(n, [s.name for s in sources], parse_weights(weights, sources))):
        out += source_prompts(src, share, seed, level, split)
    random.Random(seed).shuffle(out)
    return out


def parse_weights(weights: str, sources: list | None = None) -> dict[str, float]:
    """``"NAME=W,NAME=W"`` (a source's name as its spec writes it, ``arithmetic`` or
    ``rg:leg_counting``; W > 0) as a dict; with ``sources``, every NAME must be one of theirs. A
    DataError naming the item otherwise."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in weights.split(",")) if weights.strip() else ():
        name, eq, value = item.rpartition("=")
        try:
            w = float(value) if eq and name.strip() else float("nan")
        except ValueError:
            w = float("nan")
        if not (w > 0 and math.isfinite(w)):
            raise DataError(f"{item!r} must be NAME=WEIGHT with a weight > 0")
        out[name.strip()] = w
    if sources is not None:
        names = [s.name for s in sources]
        for name in out:
            if name not in names:
                raise DataError(f"{name!r} is not one of the prompt sources ({', '.join(names)})")
    return out


def check_prompt_weights(source: str, weights: str) -> None:
    """``weights`` for the RL prompt ``source``: task specs whose sources it names (DataError otherwise)."""
    if not weights.strip():
        return
    if _is_file_source(source):
        raise DataError(f"{weights!r} weighs task specs, not the prompt file {source}")
    parse_weights(weights, training_sources(source))


def weighted_shares(n: int, names: list[str], weights: dict[str, float]) -> list[int]:
    """``n`` split over ``names`` in proportion to their weights (1 where not given): the floors, then
    one more for the largest remainders, the first source first among equals (equal weights give
    the equal split: ``n // k``, plus one for the first ``n % k``)."""
    w = [weights.get(name, 1.0) for name in names]
    exact = [n * x / sum(w) for x in w] if names else []
    shares = [math.floor(e) for e in exact]
    for k in sorted(range(len(names)), key=lambda k: (-(exact[k] - shares[k]), k))[:n - sum(shares)]:
        shares[k] += 1
    return shares


def _is_file_source(source: str) -> bool:
    """Whether ``source`` names a prompt file rather than task specs (a spec longer than the
    system's file-name limit, e.g. several reasoning-gym configs, is not a file: no OSError)."""
    if source.endswith(".jsonl"):
        return True
    try:
        return Path(source).is_file()
    except OSError:
        return False


def check_rl_source(source: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """What :func:`load_rl_prompts` would refuse about ``source``, found without reading a record or
    building a model: a file that is missing or not a regular file, an empty source, a bad task spec
    (an unknown reasoning-gym dataset or config key included), a task for evaluation only. Returns the
    built-in tasks' specs (empty for a file)."""
    if _is_file_source(source):
        check_file(source)
        return []
    if not source.strip(", "):
        raise DataError("empty RL prompt source: give a .jsonl file, rg:NAME or built-in task names")
    from nanoseek.tasks.sources import BuiltinSource

    return [(s.name, s.levels) for s in training_sources(source) if isinstance(s, BuiltinSource)]


def check_task_level(specs: list[tuple[str, tuple[int, ...] | None]], level: int | None) -> None:
    """``level`` (a stage's default difficulty) against the tasks of ``specs`` that take it (those
    written without their own levels); a DataError naming the task and its levels otherwise."""
    from nanoseek.tasks.generators import get_task

    for name, levels in specs:
        if levels is None and level is not None and level not in get_task(name).levels:
            raise DataError(f"task {name!r} has levels {list(get_task(name).levels)}, not {level}")


@contextmanager
def source_key(key: str) -> Iterator[None]:
    """Prefix a ValueError raised inside (a DataError, a bad task spec, no checkpoint) with the
    config key that named the source: a stage section's ``check_sources`` reports ``key: why``."""
    try:
        yield
    except ValueError as e:
        raise DataError(f"{key}: {e}") from None


__all__ = ["check_prompt_weights", "parse_weights", "weighted_shares", "DataError", "SFTExample", "PreferenceExample", "RLPrompt", "iter_jsonl", "check_message",
           "check_tools", "parse_sft", "parse_preference", "parse_rl_prompt", "read_sft", "read_preferences",
           "read_rl_prompts", "write_jsonl", "check_file", "check_rl_source", "check_task_level", "source_key",
           "task_prompts", "task_sources", "training_sources", "source_prompts", "reasoning_gym_prompts", "load_rl_prompts"]
