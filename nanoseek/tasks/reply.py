"""DeepSeek-R1's reply format in one place: how a question is put to the model, where its reply
stops, what text of it is scored, and how the reasoning, the answer and the format are read back.

Everyone who talks to a model in this format consumes this module: GRPO's rollouts, distillation
and DPO's sampled pairs (``post/``), cold-start SFT data, the evaluation harness (``eval/``), the
chat display and the engine's ``<think>`` split (``infer/``), and the rule-based rewards beside it
(:mod:`nanoseek.tasks.rewards`).

**Prompt templates** (:data:`TEMPLATES`, :func:`render_prompt`):

* ``r1-zero``: DeepSeek-R1-Zero's plain-text prompt (:data:`R1_ZERO_TEMPLATE`, the R1 report's
  Table 1) after BOS, straight from the base model: no chat markup; the reply reasons in
  ``<think>`` tags, answers in ``<answer>`` tags, and generation stops at ``</answer>`` (or EOS);
* ``chat``: the question as one user turn of the chat template with the generation prompt; the
  model writes ``<think>...</think>`` itself;
* ``chat-think``: the same with ``<think>\\n`` pre-filled (R1's template), so the reply starts
  inside the think block;
* ``fewshot`` (evaluation of base models only, :data:`EVAL_TEMPLATES`): worked examples rendered as
  pre-training documents (``Question: ...\\nSolution:\\n...\\nAnswer: X``), each after a BOS, then
  ``BOS Question: {question}\\nSolution:\\n``; generation stops at ``"\\nQuestion:"``, BOS or EOS.

In every template the question is text (``encode_text``, ``encode_chat``, ``encode_segments``):
only the template makes control tokens, so a question holding ``<｜Assistant｜>`` cannot forge a turn.

**Stop rule and scored text**: :func:`stop_rule` gives a template's stop strings and stop token
ids (EOS always stops); the engine cuts a stop string from the text, but ``</answer>`` is part of
the R1-Zero format, so :func:`completion_text` puts it back before scoring.

**Reading a reply**: :func:`split_reasoning` splits it the way DeepSeek's API fills
``reasoning_content`` and ``content`` (the engine's streaming splitter,
:class:`nanoseek.infer.reasoning.ReasoningSplitter`, yields the same sections delta by delta);
:func:`split_leading_think` takes the one leading, closed think block of a sampled trace off its
answer (for turning traces into SFT / DPO messages); :func:`extract_answer` finds the final answer;
:func:`check_format` checks R1's format; :func:`canonical_answer` / :func:`majority_vote` compare
and vote answers. Two *answer forms* (:data:`ANSWER_FORMS`) are told apart by the format check and
SFT data: ``r1`` (free text, e.g. ``Answer: X``, after ``</think>``) and ``r1-zero``
(``<answer>X</answer>``); :func:`reward_format` maps a prompt template to the form it is checked
in. :func:`format_response` and :func:`sft_messages` render the ideal reply of a built-in problem,
the target of cold-start SFT.

**Tool use** (DeepSeek-V3.1's format, :mod:`nanoseek.tools`): a prompt describes its tools in the
system turn (:func:`encode_chat_tools`: the template's ``tools=`` keyword); a reply may call them,
read their outputs and go on to its final answer. :func:`tool_sft_messages` is the ideal tool-using
reply of a built-in problem (its task's :meth:`~nanoseek.tasks.generators.Task.tool_call`, made
with the real tool, answered with the tool's output); :func:`completion_text` scores a reply that
ran tools on its opening (the reasoning before the first call) and its final text (after the last
tool output), so the format check and the answer never see the tool's output.

Deliberately left out: multi-turn conversations with a user (one question per prompt).
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Any, Sequence

from nanoseek.data.tokenizer import END_THINK, THINK
from nanoseek.tasks.generators import NUMBER, TASKS, Problem, corpus_document, tool_reasoning
from nanoseek.tools.format import TOOL_CALLS_BEGIN, tojson, tools_system_text, ToolSpec

ANSWER, END_ANSWER = "<answer>", "</answer>"

TEMPLATES = ("r1-zero", "chat", "chat-think")                  # what a policy is sampled in (GRPO, distill)
EVAL_TEMPLATES = ("fewshot", "chat", "chat-think", "r1-zero")  # plus base models' few-shot prompt
DEFAULT_TEMPLATE = "r1-zero"                                   # GRPO's template unless told (R1-Zero)
ANSWER_FORMS = ("r1", "r1-zero")                               # free-text answer | <answer> tags

FEWSHOT_STOP = "\nQuestion:"
R1_ZERO_STOP = END_ANSWER
THINK_PREFILL = THINK + "\n"     # what chat-think's generation prompt ends with

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt} Assistant:"
)  # DeepSeek-R1 report, Table 1 ("User: prompt. Assistant:"); r1_zero_prompt ends the prompt with "."


# ----------------------------------------------------------------------------- prompts


def _question(question_or_problem: Any) -> str:
    """The question text of a string, a :class:`Problem` or anything with a ``prompt`` (an RLPrompt)."""
    return question_or_problem if isinstance(question_or_problem, str) else question_or_problem.prompt


def r1_zero_segments(question_or_problem: Any) -> list[tuple[str, bool]]:
    """The R1-Zero prompt as ``(text, is_template)`` segments: the template's own text (its
    ``<think>`` tags are control tokens) and the question (content: always text). Encode them
    with the tokenizer's ``encode_segments``."""
    question = _question(question_or_problem).strip()
    if not question.endswith((".", "?", "!")):
        question += "."
    head, _, tail = R1_ZERO_TEMPLATE.partition("{prompt}")
    return [(head, True), (question, False), (tail, True)]


def r1_zero_prompt(question_or_problem: Any) -> str:
    """The R1-Zero prompt (:data:`R1_ZERO_TEMPLATE`) around a problem or a question text."""
    return "".join(text for text, _ in r1_zero_segments(question_or_problem))


def encode_chat_tools(tokenizer, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                      **kwargs: Any) -> tuple[list[int], list[int]]:
    """``tokenizer.encode_chat(messages, tools=tools, **kwargs)``: (ids, assistant mask) of a chat
    whose system turn describes ``tools`` (OpenAI function definitions), as V3.1's template does.
    A template that does not take ``tools`` gets the same description as a system message
    (system text, a blank line, :func:`~nanoseek.tools.format.tools_system_text`)."""
    if not tools:
        return tokenizer.encode_chat(list(messages), **kwargs)
    from nanoseek.data.chat_template import TokenizerError

    try:
        return tokenizer.encode_chat(list(messages), tools=list(tools), **kwargs)
    except TokenizerError as e:
        if "'tools'" not in str(e):
            raise
    text = tools_system_text([ToolSpec.from_openai(t, f"tools[{i}]") for i, t in enumerate(tools)])
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}"
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return tokenizer.encode_chat(msgs, **kwargs)


def render_prompt(tokenizer, question_or_problem: Any, template: str, examples: Sequence[Problem] = (),
                  tools: Sequence[dict[str, Any]] | None = None, system: str | None = None) -> list[int]:
    """Token ids of the prompt a reply follows, in ``template`` (one of :data:`EVAL_TEMPLATES`; see
    the module docstring). ``question_or_problem``: the question text, a :class:`Problem` or an
    RLPrompt; ``examples``: the worked problems of ``fewshot`` (ignored by the other templates);
    ``tools``: OpenAI function definitions described in the system turn; ``system``: a system turn
    (tools named, not described: :meth:`~nanoseek.tasks.tool_use.ToolUse.system_for`); chat templates only."""
    if (tools or system) and template not in ("chat", "chat-think"):
        raise ValueError(f"tools need a chat template (chat or chat-think), not {template!r}")
    if template in ("chat", "chat-think"):
        turns = [{"role": "system", "content": system}] if system else []
        ids, _ = encode_chat_tools(tokenizer, turns + [{"role": "user", "content": _question(question_or_problem)}],
                                   tools, add_generation_prompt=True, thinking=template == "chat-think")
        return ids
    if template == "r1-zero":
        return [int(tokenizer.document_start_id)] + tokenizer.encode_segments(r1_zero_segments(question_or_problem))
    if template == "fewshot":
        bos = int(tokenizer.document_start_id)
        ids: list[int] = []
        for e in examples:
            ids += [bos] + tokenizer.encode_text(corpus_document(e))
        return ids + [bos] + tokenizer.encode_text(f"Question: {_question(question_or_problem)}\nSolution:\n")
    raise ValueError(f"unknown template {template!r}; expected one of {EVAL_TEMPLATES}")


# ----------------------------------------------------------------------------- stopping and the scored text


def stop_rule(tokenizer, template: str) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) of a template; EOS always stops."""
    if template == "fewshot":
        return [FEWSHOT_STOP], [int(tokenizer.document_start_id)]
    if template == "r1-zero":
        return [R1_ZERO_STOP], []
    return [], []


def ran_tools(completion) -> bool:
    """Whether the engine's tool loop appended anything to ``completion`` (its ``model_mask`` has a 0)."""
    mask = getattr(completion, "model_mask", None)
    return bool(mask) and not all(mask)


def tool_counts(completion) -> tuple[int, int]:
    """(tool calls made, calls that failed: ``ToolResult.ok`` False) of one completion (0, 0 without tools)."""
    results = getattr(completion, "tool_results", None) or []
    calls = max(len(getattr(completion, "tool_calls", None) or []), len(results))
    return calls, sum(not r.ok for r in results)


def completion_text(completion, template: str, tokenizer=None) -> str:
    """The text that is scored: the engine's text (no EOS), with r1-zero's ``</answer>`` put back
    when that stop string ended it (the engine cuts stop strings; the tag is part of the format).
    A completion that ran tools (and a ``tokenizer`` to read its tokens) is scored on what the model
    wrote before its first call (its reasoning) followed by its ``final_text`` (after the last tool
    output): the tool's output and the call's arguments are neither the answer nor the format."""
    if tokenizer is not None and ran_tools(completion):
        ids = list(completion.token_ids)
        begin = tokenizer.token_to_id(TOOL_CALLS_BEGIN)
        head = tokenizer.decode(ids[:ids.index(begin)] if begin in ids else [])
        return head + completion.final_text
    text = completion.text
    if template == "r1-zero" and getattr(completion, "stop_reason", None) == "stop_string":
        text += R1_ZERO_STOP
    return text


def prefilled_text(template: str) -> str:
    """What the prompt of ``template`` already wrote of the reply: ``<think>\\n`` for chat-think."""
    return THINK_PREFILL if template == "chat-think" else ""


def reward_format(template: str) -> tuple[str, bool]:
    """(answer form, think pre-filled) a reply to a prompt in ``template`` is format-checked with:
    r1-zero replies need ``<answer>`` tags, chat-think replies continue the pre-filled ``<think>``."""
    return ("r1-zero" if template == "r1-zero" else "r1"), template == "chat-think"


# ----------------------------------------------------------------------------- reading a reply


class ReplySection:
    """One section of a reply (reasoning or answer) with DeepSeek-style whitespace stripping:
    leading whitespace dropped, trailing whitespace held until non-space text follows (so text
    added piece by piece gives the same section as added at once), blocks after the first joined
    by a newline. :func:`split_reasoning` and the engine's streaming splitter both build on it."""

    def __init__(self):
        self.started = False
        self.pending_ws = ""
        self.text: list[str] = []

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        self.text.append(body)
        return body

    def resume(self) -> None:
        """A new block of this section begins: separate it from the previous one by a newline."""
        self.pending_ws = "\n" if self.started else ""


def split_reasoning(text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) as DeepSeek's API fills ``reasoning_content`` / ``content``: what lies
    inside ``<think>...</think>`` blocks and what lies outside, each stripped (several think
    blocks joined by a newline); reasoning None when there is no think block. A reply that
    ``starts_in_think`` (the prompt ended in ``<think>``) begins in the reasoning; an unclosed
    think block is all reasoning."""
    in_think, saw_think = starts_in_think, starts_in_think
    reasoning, answer = ReplySection(), ReplySection()
    rest = text
    while True:
        tag = END_THINK if in_think else THINK
        section = reasoning if in_think else answer
        i = rest.find(tag)
        if i < 0:
            section.add(rest)
            break
        section.add(rest[:i])
        rest = rest[i + len(tag):]
        in_think = not in_think
        if in_think:
            saw_think = True
            reasoning.resume()
        else:
            answer.resume()
    return ("".join(reasoning.text) if saw_think else None), "".join(answer.text)


def split_leading_think(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a sampled trace ``<think>\\nR\\n</think>\\n\\nA`` that opens with one
    closed think block (newlines around R stripped, A stripped); (None, the stripped text) when it
    does not. Turns traces into ``{"role": "assistant", "reasoning", "content"}`` messages."""
    body = text.strip()
    if body.startswith(THINK) and END_THINK in body:
        inner, _, rest = body[len(THINK):].partition(END_THINK)
        return inner.strip("\n"), rest.strip()
    return None, body


def _matching_brace(text: str, open_idx: int) -> int:
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def extract_answer(text: str, *, block: bool = False, as_written: bool = False) -> str | None:
    """The final answer a model response states, or None when nothing is extractable.

    ``block`` (a task whose gold answers span several lines: a grid, a board, a list of moves):
    an answer after ``Answer:`` is the whole block from the last line-start ``Answer:`` to the end
    of the reply, stripped, not its first line. ``as_written``: a trailing period is kept (an
    external task's own scorer grades the text; see :mod:`nanoseek.tasks.rg`).

    Only the text after the last ``</think>`` is searched when there is one (the reasoning holds
    intermediate numbers). In that region, in order: the last ``<answer>...</answer>`` (an
    unclosed ``<answer>`` runs to the end), the last ``\\boxed{...}``, the rest of the line after
    the last "Answer:" / "answer is", the whole region if it is one short line (so a Countdown
    expression or a hedge like "7 or 8" reaches the verifier intact), else the last number.
    """
    if not isinstance(text, str):
        return None
    region = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    found: str | None = None
    if "<answer>" in region:
        tail = region.rsplit("<answer>", 1)[1]
        found = tail.split("</answer>", 1)[0]
    elif (i := region.rfind("\\boxed{")) >= 0:
        j = _matching_brace(region, i + len("\\boxed"))
        found = region[i + len("\\boxed{"): j if j >= 0 else len(region)]
    elif block and (ms := list(re.finditer(r"(?m)^[ \t]*Answer[ \t]*:", region))):
        found = region[ms[-1].end():]
    else:
        ms = list(re.finditer(r"\banswer\s*(?:is\b\s*:?|:)", region, re.I))
        if ms:
            found = region[ms[-1].end():].strip().split("\n", 1)[0]
        else:
            stripped = region.strip()
            if stripped and "\n" not in stripped and len(stripped) <= 64:
                found = stripped
            else:
                nums = re.findall(NUMBER, region)
                found = nums[-1] if nums else None
    if found is None:
        return None
    found = found.strip()
    if not as_written and found.endswith(".") and not found.endswith(".."):
        found = found[:-1].strip()
    return found or None


def check_format(response: str, template: str = "r1", think_prefilled: bool = False,
                 min_think_chars: int = 0) -> tuple[bool, str]:
    """(ok, reason) for R1's format. ``template`` is the answer form (:data:`ANSWER_FORMS`).

    A response is well formed when, after stripping leading whitespace, it starts with ``<think>``
    (no other text before it), has exactly one ``<think>`` and one ``</think>`` in that order, and
    after ``</think>`` comes a non-empty answer: either free text (the ``r1`` form) or exactly one
    ``<answer>...</answer>`` with non-empty content and nothing but whitespace around it (the
    ``r1-zero`` form). ``"r1-zero"`` requires the tags; ``"r1"`` accepts both forms. The thinking
    may be empty unless ``min_think_chars`` says otherwise. With ``think_prefilled`` the prompt
    already ended in ``<think>`` and the response is checked as ``"<think>" + response``.
    """
    if not isinstance(response, str):
        return False, "response is not a string"
    text = (THINK + response) if think_prefilled else response
    body = text.lstrip()
    if not body.startswith(THINK):
        return False, "text before <think>" if THINK in body else "no <think>"
    if body.count(THINK) != 1 or body.count(END_THINK) != 1:
        return False, "need exactly one <think> and one </think>"
    think, _, tail = body[len(THINK):].partition(END_THINK)
    if not _:
        return False, "no </think> after <think>"
    if len("".join(think.split())) < min_think_chars:
        return False, f"thinking shorter than {min_think_chars} characters"
    if ANSWER in tail or END_ANSWER in tail:
        m = re.fullmatch(r"\s*<answer>(.*?)</answer>\s*", tail, re.S)
        if not m or tail.count(ANSWER) != 1 or tail.count(END_ANSWER) != 1:
            return False, "malformed <answer> block"
        if not m.group(1).strip():
            return False, "empty <answer>"
        return True, "ok (r1-zero)"
    if template == "r1-zero":
        return False, "no <answer> block"
    if not tail.strip():
        return False, "no answer after </think>"
    return True, "ok (r1)"


def states_answer_line(text: str) -> bool:
    """The few-shot format: the completion states an ``Answer:`` line (as the documents it continues)."""
    return re.search(r"(?m)^\s*Answer:\s*\S", text) is not None


def canonical_answer(answer: str | None) -> str | None:
    """The form answers are compared in for voting: numbers by exact value, else lower-case text
    with whitespace collapsed; None / empty stays None (no vote)."""
    if answer is None:
        return None
    text = " ".join(str(answer).split())
    if not text:
        return None
    number = text.replace(",", "")
    try:
        if "/" in number:
            a, b = number.split("/", 1)
            return str(Fraction(int(a), int(b)))
        return str(Fraction(number))
    except (ValueError, ZeroDivisionError):
        return text.lower()


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common canonical answer (ties: the one seen first); None if nobody answered."""
    votes = [a for a in (canonical_answer(x) for x in answers) if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


# ----------------------------------------------------------------------------- the ideal reply (SFT targets)


def format_response(p: Problem, template: str = "r1") -> str:
    """The ideal assistant response, the target of cold-start SFT: ``<think>`` steps, then the
    answer as ``Answer: X`` (template "r1") or ``<answer>X</answer>`` (template "r1-zero")."""
    if template == "r1":
        return f"<think>\n{p.reasoning}\n</think>\nAnswer: {p.answer}"
    if template == "r1-zero":
        return f"<think>\n{p.reasoning}\n</think>\n<answer>{p.answer}</answer>"
    raise ValueError(f"template must be 'r1' or 'r1-zero', got {template!r}")


def sft_messages(p: Problem, template: str = "r1") -> list[dict[str, str]]:
    """A built-in problem as a cold-start SFT chat (user question -> reasoning + answer); ValueError
    for an unknown ``template``. ``"r1"``: the question as the user turn, the worked steps as
    ``reasoning`` and ``Answer: X``; ``"r1-zero"``: the R1-Zero prompt as the user turn and
    ``<answer>X</answer>`` as the answer."""
    if template == "r1":
        user, content = p.prompt, f"Answer: {p.answer}"
    elif template == "r1-zero":
        user, content = r1_zero_prompt(p), f"<answer>{p.answer}</answer>"
    else:
        raise ValueError(f"unknown SFT template {template!r}; expected 'r1' or 'r1-zero'")
    return [{"role": "user", "content": user}, {"role": "assistant", "reasoning": p.reasoning, "content": content}]


def tool_sft_messages(p: Problem, toolbox) -> list[dict[str, Any]] | None:
    """The ideal tool-using reply of a built-in problem as a chat, or None when its task has no tool
    call (:meth:`~nanoseek.tasks.generators.Task.tool_call`) or ``toolbox`` lacks the tool:
    ``[user, assistant{reasoning, tool_calls}, tool{output}, assistant{"Answer: OUTPUT"}]``. The call
    runs in ``toolbox`` (the real tool), and the answer is its output; ValueError when that output
    is an error or not the gold answer (the trace would teach a wrong reply)."""
    task = TASKS.get(p.task)
    made = task.tool_call(p) if task is not None else None
    if made is None or made[0] not in toolbox:
        return None
    from nanoseek.tools.format import ToolCall

    name, args = made
    call = ToolCall(name, tojson(args), id="call_0")
    result = toolbox.run(call)
    if not result.ok or not task.verify(result.output, p):
        raise ValueError(f"{p.id}: the {name} tool answers {result.output!r} to {call.arguments}, not {p.answer!r}")
    return [{"role": "user", "content": p.prompt},
            {"role": "assistant", "reasoning": tool_reasoning(name), "content": "",
             "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": result.output},
            {"role": "assistant", "content": f"Answer: {result.output}"}]


__all__ = ["THINK", "END_THINK", "ANSWER", "END_ANSWER", "TEMPLATES", "EVAL_TEMPLATES", "DEFAULT_TEMPLATE",
           "ANSWER_FORMS", "FEWSHOT_STOP", "R1_ZERO_STOP", "THINK_PREFILL", "R1_ZERO_TEMPLATE", "r1_zero_segments",
           "r1_zero_prompt", "render_prompt", "stop_rule", "completion_text", "prefilled_text", "reward_format",
           "ReplySection", "split_reasoning", "split_leading_think", "extract_answer", "check_format", "states_answer_line",
           "canonical_answer", "majority_vote", "format_response", "sft_messages", "encode_chat_tools", "ran_tools", "tool_counts",
           "tool_sft_messages"]
