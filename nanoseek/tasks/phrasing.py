"""How a built-in task's problem is worded: many surface forms of one underlying problem.

A ~1M-parameter model trained on one template per task learns the template, not the skill: the
speedrun model solved ~10 % of its own "What is 93 + 35?" but ~1 % of reasoning-gym's "93 + 35 ="
(issue 25). So every built-in task (:mod:`nanoseek.tasks.generators`) words its training problems
in many ways, drawn here from the problem's *canonical content* (the numbers that decide its split)
and its original prompt:

* question frames ("What is E?", "E =", "Compute E.", "Find the value of E.", "What is the sum of
  A and B?", "Subtract B from A.", ...), imperative and question forms, operand order where the
  operation allows it ("Add B to A");
* the expression itself with symbols, without spaces, in words ("plus", "minus", "times") or with
  typographic signs ("−", "×"); large numbers with thousands separators;
* lead-ins that carry no information ("Quick question: ", "Here is a problem. ") and endings that
  ask for a form ("Answer with a number.");
* word problems, Countdown and the sanity task keep their stories and get the lead-ins and endings.

Three **groups** of wordings per task: ``original`` (the one template the tasks had before, index 0
of the frames), ``seen`` (the other training wordings) and ``unseen`` (frames, lead-ins and endings
that no training draw ever uses: the robustness table of the speedrun report asks held-out problems
in them, so it separates "learned the wordings it saw" from "learned the skill"). A training draw in
the ``varied`` phrasing picks the original wording or a seen one; the ``fixed`` phrasing keeps the
original wording (and the original number ranges) exactly as before, so old runs reproduce.

The wording never changes the problem: its canonical content, its split (a hash of that content:
a paraphrase of a held-out problem is held out), its id, its gold answer and its verifier are the
same under every wording. None of the frames is one of reasoning-gym's evaluation templates
(chain_sum's "State the final answer to the following arithmetic problem: E =", basic_arithmetic's
"Calculate E."), so the external evaluation measures wordings the model never trained on.
Deliberately left out: paraphrasing the word problems' stories sentence by sentence.
"""

from __future__ import annotations

import random
import re

PHRASINGS = ("varied", "fixed")      # a task spec's ``@PHRASING`` (nanoseek.tasks.generators.parse_task_items)
DEFAULT_PHRASING = "varied"
GROUPS = ("original", "seen", "unseen")

# ----------------------------------------------------------------------------- generic lead-ins and endings
LEADS = ("Quick question: ", "Here is a problem. ", "Please help me with this. ", "Try this one: ",
         "A question for you. ", "Homework help: ", "Next one. ")
ENDS = (" Answer with a number.", " Give only the final answer.", " Show your work.", " Thanks!",
        " Be careful.")
UNSEEN_LEADS = ("Read the following and respond. ", "Puzzle of the day: ")
UNSEEN_ENDS = (" Reply with the result only.", " What do you get?")

# ----------------------------------------------------------------------------- arithmetic expressions
# {e}: the whole expression; {a}, {b}: the two operands of a two-term sum or difference
EXPR_FRAMES = ("What is {e}?", "{e} =", "{e} = ?", "Compute {e}.", "Work out {e}.", "Find the value of {e}.",
               "Evaluate: {e}", "How much is {e}?", "Solve {e}.", "What does {e} equal?", "{e}?",
               "What do you get from {e}?", "Find {e}.")
SUM_FRAMES = ("What is the sum of {a} and {b}?", "Add {a} and {b}.", "Add {b} to {a}.", "Find the total of {a} and {b}.",
              "What do {a} and {b} add up to?", "{a} and {b} together make how much?")
DIFF_FRAMES = ("Subtract {b} from {a}.", "What is {a} take away {b}?", "Take {b} away from {a}.",
               "What is {b} less than {a}?", "Start at {a} and go down by {b}. Where do you end up?")
UNSEEN_EXPR_FRAMES = ("Determine the result of {e}.", "Tell me what {e} comes to.", "Please evaluate the expression {e}",
                      "Result of {e}, please.")
UNSEEN_SUM_FRAMES = ("Combine {a} with {b}: what is the total?",)
UNSEEN_DIFF_FRAMES = ("How much remains when {b} is removed from {a}?",)
SIGNS = {"sym": {"+": " + ", "-": " - ", "*": " * "},
         "tight": {"+": "+", "-": "-", "*": "*"},
         "words": {"+": " plus ", "-": " minus ", "*": " times "},
         "typo": {"+": " + ", "-": " − ", "*": " × "}}

# ----------------------------------------------------------------------------- compare and modular
COMPARE_FRAMES = ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "What is the larger of {a} and {b}?",
                  "Which is greater, {a} or {b}?", "Pick the larger number: {a}, {b}.", "{a} or {b}: which one is more?",
                  "What is the maximum of {a} and {b}?", "Between {a} and {b}, which is the bigger number?",
                  "max({a}, {b}) =")
UNSEEN_COMPARE_FRAMES = ("Of the two numbers {a} and {b}, name the greater one.", "Tell me which is higher: {a} or {b}.")
MODULAR_FRAMES = ("What is {a} mod {m}?", "What is the remainder when {a} is divided by {m}?", "{a} mod {m} =",
                  "Find {a} modulo {m}.", "Compute {a} % {m}.", "What is left over when you divide {a} by {m}?",
                  "{a} divided by {m} leaves what remainder?", "{a} % {m} = ?")
UNSEEN_MODULAR_FRAMES = ("Give the remainder of {a} / {m}.", "What remains after dividing {a} into groups of {m}?")

_TERM_RE = re.compile(r"\d+|[-+*]")


def _terms(canonical: str) -> list:
    return [int(t) if t.isdigit() else t for t in _TERM_RE.findall(canonical)]


def _num(x: int, rng: random.Random, commas: bool) -> str:
    return f"{x:,}" if commas and abs(x) >= 1000 and rng.random() < 0.5 else str(x)


def _expression(canonical: str, rng: random.Random, group: str) -> str:
    """A wording of the expression ``canonical`` ("12 + 34 * 2", "-" signs between terms only)."""
    terms = _terms(canonical)
    numbers = [t for t in terms if isinstance(t, int)]
    ops = [t for t in terms if isinstance(t, str)]
    style = "sym" if group != "seen" else rng.choice(tuple(SIGNS))
    commas = group == "seen" and max(numbers) >= 1000
    e = _num(numbers[0], rng, commas) + "".join(SIGNS[style][op] + _num(n, rng, commas)
                                                 for op, n in zip(ops, numbers[1:]))
    if group == "original":
        return EXPR_FRAMES[0].format(e=e)
    frames = list(EXPR_FRAMES[1:] if group == "seen" else UNSEEN_EXPR_FRAMES)
    if len(numbers) == 2 and ops[0] in "+-":
        extra = {("seen", "+"): SUM_FRAMES, ("seen", "-"): DIFF_FRAMES,
                 ("unseen", "+"): UNSEEN_SUM_FRAMES, ("unseen", "-"): UNSEEN_DIFF_FRAMES}[(group, ops[0])]
        frames += list(extra) * (2 if group == "seen" else 1)   # the operation named in words: about half of them
    a, b = (_num(n, rng, commas) for n in numbers[:2])
    return rng.choice(frames).format(e=e, a=a, b=b)


def _pair(canonical: str, sep: str) -> tuple[str, str]:
    a, b = canonical.split(sep)
    return a, b


def _compare(canonical: str, rng: random.Random, group: str, original: str) -> str:
    if group == "original":
        return original
    a, b = _pair(canonical, ",")
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice(COMPARE_FRAMES[1:] if group == "seen" else UNSEEN_COMPARE_FRAMES).format(a=a, b=b)


def _modular(canonical: str, rng: random.Random, group: str, original: str) -> str:
    if group == "original":
        return original
    a, m = _pair(canonical, "%")
    return rng.choice(MODULAR_FRAMES[1:] if group == "seen" else UNSEEN_MODULAR_FRAMES).format(a=a, m=m)


def _story(canonical: str, rng: random.Random, group: str, original: str) -> str:
    """Tasks whose prompt is a story or an instruction: lead-ins and endings around it."""
    if group == "original":
        return original
    if group == "unseen":
        return rng.choice((rng.choice(UNSEEN_LEADS) + original, original + rng.choice(UNSEEN_ENDS)))
    return rng.choice((rng.choice(LEADS) + original, original + rng.choice(ENDS),
                       rng.choice(LEADS) + original + rng.choice(ENDS)))


def _arithmetic(canonical: str, rng: random.Random, group: str, original: str) -> str:
    return original if group == "original" else _expression(canonical, rng, group)


# task name -> (canonical, rng, group, original prompt) -> prompt; a task not here keeps its original wording
WORDINGS = {"arithmetic": _arithmetic, "big_arithmetic": _arithmetic, "compare": _compare, "modular": _modular,
            "word_problems": _story, "countdown": _story, "digit7": _story}
FRAMED = ("arithmetic", "big_arithmetic", "compare", "modular")     # frames of their own; lead-ins may wrap them


def reword(task: str, canonical: str, original: str, group: str, rng: random.Random) -> str:
    """The prompt of the problem ``canonical`` of ``task`` (whose original wording is ``original``) in a
    wording of ``group`` ("original", "seen", "unseen"), chosen with ``rng``."""
    if group not in GROUPS:
        raise ValueError(f"wording group must be one of {GROUPS}, got {group!r}")
    make = WORDINGS.get(task)
    if make is None:
        return original
    text = make(canonical, rng, group, original)
    if task in FRAMED and group == "seen" and rng.random() < 0.3:   # a lead-in or an ending around a frame
        text = rng.choice(LEADS) + text if rng.random() < 0.6 else text + rng.choice(ENDS)
    return text


def training_wording(task: str, canonical: str, original: str, rng: random.Random) -> str:
    """A training draw's wording in the ``varied`` phrasing: the original one a quarter of the time, else a seen one."""
    return reword(task, canonical, original, "original" if rng.random() < 0.25 else "seen", rng)


def check_phrasing(phrasing: str, where: str = "phrasing") -> str:
    if phrasing not in PHRASINGS:
        raise ValueError(f"{where}: phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    return phrasing


__all__ = ["PHRASINGS", "DEFAULT_PHRASING", "GROUPS", "WORDINGS", "reword", "training_wording", "check_phrasing"]
