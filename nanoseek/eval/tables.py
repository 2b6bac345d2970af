"""Eval results as tables: plain rows (header + string cells) shared by the terminal and the report.

The CLIs render the rows with rich (:func:`rich_table`); ``report.py`` renders the same rows as
Markdown and HTML, so the numbers a user sees are formatted in one place.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .results import Comparison, EvalResult, interval


def pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def ci(d: dict[str, Any] | None) -> str:
    """"42.0% [38.1, 46.0]" from an interval dict."""
    iv = interval(d)
    if iv is None or not math.isfinite(iv.mean):
        return "-"
    return f"{100 * iv.mean:.1f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def signed_ci(iv) -> str:
    if iv is None or not math.isfinite(iv.mean):
        return "-"
    return f"{100 * iv.mean:+.1f} pts [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]"


RESULT_HEADER = ["task", "N", "k", "pass@1 [95% CI]", "pass@k", "maj@k", "strict@1", "format", "tokens", "truncated"]


def summary_row(name: str, s: dict[str, Any]) -> list[str]:
    if not s or not s.get("n"):
        return [name, "0"] + ["-"] * (len(RESULT_HEADER) - 2)
    k = str(s["samples"])
    return [name, str(s["n"]), k, ci(s["pass@1"]), pct(s["pass@k"].get(k)), pct(s["maj@k"].get(k)),
            pct(s["strict@1"]["mean"]), pct(s["format_rate"]["mean"]), f"{s['mean_response_tokens']:.0f}",
            pct(s["truncated_rate"])]


def result_rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """One row per task, then ``overall`` when there are several tasks."""
    rows = [summary_row(t, result.summary(t)) for t in result.task_names]
    if len(rows) > 1:
        rows.append(summary_row("overall", result.summary()))
    return RESULT_HEADER, rows


COMPARISON_HEADER = ["task", "A pass@1", "B pass@1", "B - A [95% CI]", "N paired", "verdict"]


def _iv(iv) -> str:
    return "-" if iv is None else ci(iv.to_dict())


def comparison_rows(comps: Sequence[Comparison]) -> tuple[list[str], list[list[str]]]:
    """One row per task: both pass@1 intervals, the paired difference, its verdict (and any note)."""
    rows = []
    for c in comps:
        verdict = c.verdict + (f" ({c.note})" if c.note else "")
        rows.append([c.task, _iv(c.a), _iv(c.b), signed_ci(c.diff), str(c.n_shared), verdict])
    return COMPARISON_HEADER, rows


TOOL_HEADER = ["task", "N", "pass@1 no tools", "pass@1 with tools", "with - without [95% CI]", "calls/sample",
               "called", "failed calls"]


def tool_rows(with_tools: EvalResult, without: EvalResult | None = None) -> tuple[list[str], list[list[str]]]:
    """Per task evaluated with tools: pass@1 without tools (``without``, the same problems), with
    tools, their paired difference, tool calls per sample, the share of samples that called a tool
    and the share of calls that failed."""
    from .results import paired_comparison

    paired = {c.task: c for c in paired_comparison(without, with_tools)} if without is not None else {}
    rows = []
    for t in with_tools.task_names:
        s = with_tools.summary(t)
        tools = s.get("tools")
        if not tools:
            continue
        c = paired.get(t)
        rows.append([t, str(s["n"]), _iv(c.a) if c else "-", ci(s["pass@1"]), signed_ci(c.diff) if c else "-",
                     f"{tools['calls_per_sample']:.2f}", pct(tools["use_rate"]), pct(tools["failed_rate"])])
    return TOOL_HEADER, rows


PHRASING_HEADER = ["task", "N", "original", "seen wording", "unseen wording", "seen - original [95% CI]",
                   "unseen - original [95% CI]"]


def phrasing_rows(result: EvalResult, original: EvalResult | None = None) -> tuple[list[str], list[list[str]]]:
    """The phrasing robustness of one evaluation of ``reword:GROUP:TASK`` items (the speedrun's
    ``phrasing.json``): per task, pass@1 of the same held-out problems in their original wording, in
    wordings seen in training and in wordings never trained on, with the paired differences (problems
    asked in all three only). The original wording's scores: ``result``'s ``reword:original:TASK`` items,
    else those of ``original`` (the stage's held-out evaluation, ``eval.json``) on the same problem ids."""
    from .stats import mean_interval, paired_difference

    by: dict[str, dict[str, dict[str, float]]] = {}     # task -> group -> problem id -> pass@1
    k = result.config.get("k")
    for p in result.problems:
        prefix, group, task = (p.task.split(":", 2) + ["", ""])[:3]
        if prefix == "reword" and task:
            by.setdefault(task, {}).setdefault(group, {})[p.id] = p.score
    own = {task for task, groups in by.items() if "original" in groups}
    for p in original.problems if original is not None else ():
        if p.task in by and p.task not in own:
            by[p.task].setdefault("original", {})[p.id] = p.score
    rows = []
    for task, groups in by.items():
        shared = sorted(set.intersection(*(set(groups.get(g, {})) for g in ("original", "seen", "unseen"))))
        col = {g: [groups[g][i] for i in shared] for g in ("original", "seen", "unseen")} if shared else {}
        if not shared:
            rows.append([task, "0"] + ["-"] * (len(PHRASING_HEADER) - 2))
            continue
        rows.append([task, str(len(shared))] + [_iv(mean_interval(col[g], samples=k)) for g in ("original", "seen", "unseen")]
                    + [signed_ci(paired_difference(col["original"], col[g])) for g in ("seen", "unseen")])
    return PHRASING_HEADER, rows


def curve_rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """pass@k and maj@k at every k, per task (test-time compute)."""
    header = ["task", "k", "pass@k", "maj@k"]
    rows = []
    for t in result.task_names + (["overall"] if len(result.task_names) > 1 else []):
        s = result.summary(None if t == "overall" else t)
        for k in s.get("pass@k", {}):
            rows.append([t, k, pct(s["pass@k"][k]), pct(s["maj@k"].get(k))])
    return header, rows


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = ""):
    from rich.table import Table

    table = Table(title=title or None, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        style = None
        if r and r[-1].startswith("B better"):
            style = "green"
        elif r and r[-1].startswith("A better"):
            style = "red"
        table.add_row(*r, style=style)
    return table


def result_table(result: EvalResult, title: str = ""):
    return rich_table(*result_rows(result), title=title)


def comparison_table(comps: Sequence[Comparison], label_a: str = "A", label_b: str = "B"):
    return rich_table(*comparison_rows(comps), title=f"A = {label_a}   B = {label_b}")


__all__ = ["result_rows", "comparison_rows", "tool_rows", "curve_rows", "rich_table", "result_table", "comparison_table",
           "pct", "ci", "signed_ci"]
