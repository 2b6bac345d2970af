"""The run report: ``report.md`` and a self-contained ``report.html`` built from a run folder.

:func:`write_report` reads whatever the run folder holds (layout in :mod:`nanoseek.eval.runs`:
``run.json``, and per stage ``metrics.jsonl``, ``eval.json``, ``samples.jsonl``,
``config.toml``, ``final/config.json``) and writes, in this order:

1. **Summary**: per stage its status, steps, tokens, wall time, median tokens/s, final train
   loss, last validation loss and bits per byte, skipped spikes and rollbacks; the totals.
   run.json's stage entry wins, then the stage's ``stage.json``, then the metrics themselves.
2. **Model**: the architecture and parameter counts, total and activated per token
   (:func:`nanoseek.model.params.count_params`), of the last checkpoint found.
3. **Training**: per stage, loss curves (train, validation, MTP, skipped spikes) with tokens/s
   and MFU; expert balance (MaxVio per MoE layer over steps as a heat map, the aux-loss-free
   bias range per layer, layers x experts load snapshots when ``expert_load`` is logged); GRPO's
   reward, accuracy, format rate and response length.
4. **Held-out evaluation**: accuracy per stage and task with N and 95% intervals, the paired
   differences between consecutive stages (same problem ids), bits per byte. Then, where stages
   have an ``external.json``, **Held-out evaluation on external tasks**: the same table and paired
   differences on tasks nanoseek did not write (the speedrun's reasoning-gym datasets); where stages
   have a ``phrasing.json``, **Phrasing robustness**: the same held-out problems in their original wording,
   in wordings seen in training and in wordings never trained on, with paired differences; where stages
   have a ``tools.json``, **Tool use**: the tool tasks' accuracy with and without tools (paired),
   calls per sample, the share of samples that called a tool, failed calls.
5. **Test-time compute**: pass@k and maj@k against k per stage.
6. **Samples**: a few evaluated conversations with their reasoning, and GRPO rollouts.
7. **Configuration**: run.json's ``resolved`` settings (every setting of the run, defaults filled
   in) and its ``config`` (the recipe as written; older run.json files have only this one), and
   each stage's ``config.toml``.
8. **Notes**: every piece that was missing or unreadable and so skipped (never a crash); a
   figure that fails to draw is skipped with its error here too.

The HTML embeds its figures as base64 PNGs and its CSS inline: no external asset, so the file
can be mailed or opened offline. ``report.md`` links the same PNGs, written to
``report_files/``. A live run (run.json ``status`` "running", or ``refresh_s`` given) gets a
``<meta http-equiv="refresh">`` so an open page reloads itself as the speedrun rewrites it.

Run it as ``python -m nanoseek.eval.report RUN [--refresh S]``, or call :func:`write_report`
after each stage of a pipeline (it is cheap: a few seconds of matplotlib).
"""

from __future__ import annotations

import argparse

from nanoseek import limits
import base64
import html
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanoseek.atomic import write_atomic

from . import plots
from .results import EvalResult, paired_comparison, with_tools
from .runs import (Stage, events, find_stages, fmt_count, fmt_duration, numeric, read_jsonl, read_run_json, series,
                   step_records, validation_series, vector_series)
from .tables import (PHRASING_HEADER, RESULT_HEADER, TOOL_HEADER, comparison_rows, curve_rows, phrasing_rows, summary_row,
                     tool_rows)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FILES_DIR = "report_files"
DEFAULT_REFRESH_S = 30
MAX_CONFIG_LINES = 200
SAMPLES_PER_STAGE = 2


# ---------------------------------------------------------------------- the document

@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        if rows:
            self.blocks.append(("table", header, rows))

    def image(self, name: str, data: bytes | None, caption: str) -> bool:
        if data:
            self.blocks.append(("img", name, data, caption))
        return bool(data)

    def code(self, title: str, text: str) -> None:
        self.blocks.append(("code", title, text))

    def sample(self, title: str, fields: list[tuple[str, str]]) -> None:
        self.blocks.append(("sample", title, fields))


@dataclass
class StageData:
    stage: Stage
    records: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalResult | None = None
    external: EvalResult | None = None      # external.json: held-out tasks nanoseek did not write
    tools: EvalResult | None = None         # tools.json: the tool tasks evaluated with tools
    phrasing: EvalResult | None = None      # phrasing.json: held-out problems in other wordings
    rollouts: list[dict[str, Any]] = field(default_factory=list)


def _load_stage(stage: Stage, notes: list[str]) -> StageData:
    data = StageData(stage)
    if not stage.dir.is_dir():
        notes.append(f"{stage.name}: not started yet")
        return data
    if stage.metrics_path.is_file():
        data.records, problems = stage.read_metrics()
        data.steps = step_records(data.records)
        notes.extend(problems)
    else:
        notes.append(f"{stage.name}: no {stage.metrics_path.name} (training curves skipped)")
    if stage.eval_path.is_file():
        try:
            data.eval = EvalResult.load(stage.eval_path)
        except ValueError as e:
            notes.append(f"{stage.name}: eval skipped: {e}")
    else:
        notes.append(f"{stage.name}: no eval.json (run `nanoseek eval --model {stage.dir}`)")
    if stage.external_path.is_file():
        try:
            data.external = EvalResult.load(stage.external_path)
        except ValueError as e:
            notes.append(f"{stage.name}: external evaluation skipped: {e}")
    if stage.tools_path.is_file():
        try:
            data.tools = EvalResult.load(stage.tools_path)
        except ValueError as e:
            notes.append(f"{stage.name}: tool evaluation skipped: {e}")
    if stage.phrasing_path.is_file():
        try:
            data.phrasing = EvalResult.load(stage.phrasing_path)
        except ValueError as e:
            notes.append(f"{stage.name}: phrasing evaluation skipped: {e}")
    if stage.samples_path.is_file():
        recs, _, problems = read_jsonl(stage.samples_path)
        data.rollouts = recs
        notes.extend(problems)
    return data


def _plot(notes: list[str], what: str, fn, *args) -> bytes | None:
    """A figure, or None with a note when drawing it fails (a report must not die on one plot)."""
    try:
        return fn(*args)
    except Exception as e:  # matplotlib errors are many and varied; the rest of the report still matters
        notes.append(f"{what}: plot skipped ({type(e).__name__}: {e})")
        return None


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(records):
        v = numeric(r.get(key))
        if v is not None:
            return v
    return None


def train_loss_key(steps: list[dict[str, Any]]) -> str:
    """``ce`` (the next-token loss alone, comparable with ``val_loss``) when logged, else ``loss``
    (the whole objective: + MTP and balance terms in pre-training, the policy loss in GRPO)."""
    return "ce" if any(numeric(r.get("ce")) is not None for r in steps) else "loss"


def stage_summary(d: StageData) -> dict[str, Any]:
    """The numbers of the summary table for one stage (None where unknown)."""
    recs, steps = d.records, d.steps
    info = {**d.stage.stage_json(), **d.stage.info}            # run.json's entry wins over stage.json
    done = events(recs, "done")
    status = info.get("status") or ("done" if done else "running" if steps else "pending")
    wall = numeric(info.get("wall_s"))
    if wall is None:
        wall = _last(done, "elapsed") if done else _last(steps, "elapsed")
    tokens = numeric(info.get("tokens"))
    if tokens is None:
        tokens = _last(done, "tokens") if done else _last(steps, "tokens_seen")
    n_steps = numeric(info.get("steps"))
    if n_steps is None and steps:
        n_steps = float(steps[-1]["step"])
    tps = [v for v in series(steps, "tokens_per_s")[1] if math.isfinite(v)]
    losses = [v for v in series(steps, train_loss_key(steps))[1] if math.isfinite(v)]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"status": status, "steps": n_steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "loss": sum(tail) / len(tail) if tail else None,
            "val_loss": (validation_series(recs, "val_loss")[1] or [None])[-1],
            "val_bpb": (validation_series(recs, "val_bpb")[1] or [None])[-1],
            "spikes": len(events(recs, "spike_skipped")), "rollbacks": len(events(recs, "rollback"))}


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if x is None or not math.isfinite(x) else fmt.format(x)


# ---------------------------------------------------------------------- sections

def _summary_section(run: Path, meta: dict[str, Any], stages: list[StageData]) -> Section:
    sec = Section("Summary")
    header = ["stage", "status", "steps", "tokens", "wall time", "tokens/s", "train loss", "val loss", "val bpb",
              "spikes skipped", "rollbacks"]
    rows, tot_wall, tot_tok = [], 0.0, 0.0
    for d in stages:
        s = stage_summary(d)
        tot_wall += s["wall_s"] or 0.0
        tot_tok += s["tokens"] or 0.0
        rows.append([d.stage.name, str(s["status"]), _num(s["steps"], "{:.0f}"), fmt_count(s["tokens"]),
                     fmt_duration(s["wall_s"]), _num(s["tokens_per_s"], "{:,.0f}"), _num(s["loss"]),
                     _num(s["val_loss"]), _num(s["val_bpb"]), str(s["spikes"]), str(s["rollbacks"])])
    if len(rows) > 1:
        total_wall = numeric(meta.get("wall_s"))
        rows.append(["total", str(meta.get("status", "")), "-", fmt_count(tot_tok),
                     fmt_duration(total_wall if total_wall is not None else tot_wall), "-", "-", "-", "-",
                     str(sum(int(r[9]) for r in rows)), str(sum(int(r[10]) for r in rows))])
    sec.table(header, rows)
    facts = [f"run folder `{run}`"]
    for key in ("device", "started", "finished"):
        if meta.get(key):
            facts.append(f"{key}: {meta[key]}")
    sec.p("; ".join(facts))
    return sec


def _model_section(stages: list[StageData], notes: list[str]) -> Section | None:
    ckpt = None
    for d in reversed(stages):
        ckpt = d.stage.checkpoint()
        if ckpt is not None:
            break
    if ckpt is None:
        notes.append("model: no checkpoint with a config.json found (parameter counts skipped)")
        return None
    from nanoseek.errors import ConfigError
    from nanoseek.model.registry import count_params, load_config

    try:
        c = load_config(ckpt)
        pc = count_params(c)
    except (ConfigError, ValueError, OSError) as e:
        notes.append(f"model: {ckpt}: {e}")
        return None
    sec = Section("Model")
    moe = f"{c.n_routed_experts} routed + {c.n_shared_experts or 0} shared, top-{c.num_experts_per_tok}" \
        if c.n_routed_experts else "dense"
    rows = [["checkpoint", str(ckpt)],
            ["layers / hidden / heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads}"],
            ["attention", _attention_summary(c)],
            ["experts", moe], ["vocabulary", f"{c.vocab_size:,}"], ["MTP depth", str(c.num_nextn_predict_layers)],
            ["parameters (total)", f"{pc.total:,} ({fmt_count(pc.total)})"],
            ["parameters (activated per token)", f"{pc.active:,} ({fmt_count(pc.active)})"],
            ["MTP parameters", f"{pc.mtp:,}"]]
    sec.table(["", ""], rows)
    return sec


def _attention_summary(c) -> str:
    from nanoseek.model.registry import V3, family_of

    if family_of(c) is V3:
        return f"{c.attention_type}, kv_lora_rank {c.kv_lora_rank}, q_lora_rank {c.q_lora_rank}"
    kinds = ", ".join(f"{c.layer_types.count(k)} {k}" for k in dict.fromkeys(c.layer_types))
    return f"{kinds}; sliding_window {c.sliding_window}, q_lora_rank {c.q_lora_rank}, hc_mult {c.hc_mult}"


def _config_section(meta: dict[str, Any], stages: list[StageData]) -> Section | None:
    sec = Section("Configuration")
    if isinstance(meta.get("resolved"), dict) and meta["resolved"]:
        sec.code("run.json resolved (every setting, defaults filled in)",
                 json.dumps(meta["resolved"], indent=2, ensure_ascii=False))
        if meta.get("config"):
            sec.code("run.json config (as written)", json.dumps(meta["config"], indent=2, ensure_ascii=False))
    elif meta.get("config"):
        sec.code("run.json config", json.dumps(meta["config"], indent=2, ensure_ascii=False))
    for d in stages:
        p = d.stage.dir / "config.toml"
        if p.is_file():
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            text = "\n".join(lines[:MAX_CONFIG_LINES])
            if len(lines) > MAX_CONFIG_LINES:
                text += f"\n# ... {len(lines) - MAX_CONFIG_LINES} more lines in {p}"
            sec.code(f"{d.stage.name}/config.toml", text)
    return sec if sec.blocks else None


def _training_section(stages: list[StageData], notes: list[str]) -> Section | None:
    sec = Section("Training")
    for d in stages:
        if not d.records:
            continue
        name, steps = d.stage.name, d.steps
        got = sec.image(f"{name}_loss", _plot(
            notes, f"{name} loss", plots.training_plot, name, series(steps, train_loss_key(steps)),
            validation_series(d.records, "val_loss"), series(steps, "mtp_loss"),
            [e["step"] for e in events(d.records, "spike_skipped") if isinstance(e.get("step"), int)],
            series(steps, "tokens_per_s"), series(steps, "mfu")), f"{name}: loss, tokens/s and MFU")
        if not got:
            notes.append(f"{name}: no loss values in metrics.jsonl yet (loss plot skipped)")
        load_steps, loads = [], []
        for r in steps:                         # optional [layers][experts] token counts
            v = r.get("expert_load")
            if isinstance(v, list) and v and all(isinstance(row, list) for row in v):
                load_steps.append(r["step"])
                loads.append(v)
        load = (load_steps, loads) if loads else None
        if not sec.image(f"{name}_experts", _plot(notes, f"{name} experts", plots.expert_plot, name,
                                                   vector_series(steps, "maxvio"), vector_series(steps, "bias_range"),
                                                   load),
                         f"{name}: expert load balance (MaxVio = max load / mean load - 1 per MoE layer) "
                         "and the aux-loss-free bias"):
            if name in ("pretrain", "midtrain"):
                notes.append(f"{name}: no maxvio / bias_range in metrics.jsonl (expert plots skipped)")
        grpo = {k: series(steps, k) for k, _ in plots.GRPO_PANELS}
        sec.image(f"{name}_grpo", _plot(notes, f"{name} GRPO", plots.grpo_plot, name, grpo),
                  f"{name}: GRPO reward, accuracy, format and length")
    return sec if sec.blocks else None


def _eval_sections(stages: list[StageData], notes: list[str]) -> list[Section]:
    evaluated = [(d.stage.name, d.eval) for d in stages if d.eval is not None]
    if not evaluated:
        notes.append("held-out evaluation: no stage has an eval.json")
        return []
    sec = Section("Held-out evaluation")
    _stage_tables(sec, evaluated)
    sec.image("accuracy", _plot(notes, "accuracy", plots.accuracy_plot, evaluated),
              "held-out pass@1 per stage with 95% intervals")
    bpb_rows = [[n, _num(r.bpb.get("bpb")), _num(r.bpb.get("loss")), str(r.bpb.get("tokens", "-")),
                 str(r.bpb.get("source", ""))] for n, r in evaluated if r.bpb]
    if bpb_rows:
        sec.p("Bits per byte on held-out text:")
        sec.table(["stage", "bits/byte", "nats/token", "tokens", "text"], bpb_rows)
    for n, r in evaluated:
        for note in r.notes:
            notes.append(f"{n} eval: {note}")
    out = [sec]
    ttc = Section("Test-time compute")
    if ttc.image("ttc", _plot(notes, "test-time compute", plots.ttc_plot, evaluated),
                 "pass@k (solid) and maj@k (dashed) against samples per problem"):
        rows = []
        for n, r in evaluated:
            rows += [[n] + row for row in curve_rows(r)[1]]
        ttc.table(["stage", "task", "k", "pass@k", "maj@k"], rows)
        out.append(ttc)
    else:
        notes.append("test-time compute: every evaluation drew one sample per problem (use --k 4 or more)")
    return out


def _stage_tables(sec: Section, evaluated: list[tuple[str, EvalResult]]) -> None:
    """pass@1 per stage and task with intervals, then the paired differences of consecutive stages."""
    rows = []
    for name, r in evaluated:
        tasks = r.task_names + (["overall"] if len(r.task_names) > 1 else [])
        for t in tasks:
            rows.append([name, str(r.config.get("mode", "?"))]
                        + summary_row(t, r.summary(None if t == "overall" else t)))
    sec.p("pass@1 is averaged over k samples per problem; the interval is the 95% interval of the mean over "
          "problems. strict@1 also requires the R1 format; format is the well-formed share of samples "
          "(in fewshot mode: an `Answer:` line).")
    sec.table(["stage", "mode"] + RESULT_HEADER, rows)
    for (na, a), (nb, b) in zip(evaluated, evaluated[1:]):
        header, crow = comparison_rows(paired_comparison(a, b))
        sec.p(f"Paired difference, A = {na}, B = {nb} (per-problem pass@1 on the same problem ids):")
        sec.table(header, crow)


def _external_section(stages: list[StageData], notes: list[str]) -> Section | None:
    """The held-out evaluation on tasks nanoseek did not write (``external.json`` per stage)."""
    evaluated = [(d.stage.name, d.external) for d in stages if d.external is not None]
    if not evaluated:
        return None
    sec = Section("Held-out evaluation on external tasks")
    sec.p("Problems written and graded by reasoning-gym (its generators, its wording, its `score_answer`), "
          "chosen to match the curriculum's operations and sizes: the headline result measured on problems "
          "this project did not generate. A problem is solved when reasoning-gym grades the extracted answer 1.0; "
          "its questions are split from any training use by a hash of their text (nanoseek.tasks.rg).")
    _stage_tables(sec, evaluated)
    for n, r in evaluated:
        for note in r.notes:
            notes.append(f"{n} external eval: {note}")
    return sec


def _phrasing_section(stages: list[StageData], notes: list[str]) -> Section | None:
    """Phrasing robustness per stage (``phrasing.json``): the same held-out problems in their original
    wording, in wordings seen in training and in wordings held out of training."""
    evaluated = [d for d in stages if d.phrasing is not None]
    if not evaluated:
        return None
    sec = Section("Phrasing robustness")
    sec.p("A sample of the held-out problems asked three ways (nanoseek.tasks.phrasing): in the original wording "
          "(the held-out evaluation's scores on them), in a paraphrase of a kind used in training (other question frames, "
          "operators in words, lead-ins) and in a paraphrase of a kind never trained on (frames, lead-ins and "
          "endings held out of every training draw). Same numbers, same answers, same verifier; pass@1 with 95% "
          "intervals and the paired differences against the original wording. A model that learned the skill "
          "rather than the template loses little in either column.")
    rows = []
    for d in evaluated:
        header, prow = phrasing_rows(d.phrasing, d.eval)
        rows += [[d.stage.name, str(d.phrasing.config.get("mode", "?"))] + r for r in prow]
        for note in d.phrasing.notes:
            notes.append(f"{d.stage.name} phrasing eval: {note}")
    sec.table(["stage", "mode"] + PHRASING_HEADER, rows)
    return sec


def _tools_section(stages: list[StageData], notes: list[str]) -> Section | None:
    """Tool use per stage (``tools.json``): accuracy on the tool tasks with and without tools (paired,
    against the stage's ``eval.json`` on the same problems) and the calls made."""
    evaluated = [d for d in stages if d.tools is not None]
    if not evaluated:
        return None
    sec = Section("Tool use")
    sec.p("The tool tasks evaluated with tools (the engine runs each call and the model reads its output) "
          "against the same problems without tools (the stage's held-out evaluation): pass@1, their paired "
          "difference, tool calls per sample, the share of samples that called a tool and the share of calls "
          "that failed (bad JSON, unknown tool, a tool error).")
    rows = []
    for d in evaluated:
        header, trows = tool_rows(d.tools, d.eval)
        rows += [[d.stage.name] + r for r in trows]
        for note in d.tools.notes:
            notes.append(f"{d.stage.name} tool eval: {note}")
    sec.table(["stage"] + TOOL_HEADER, rows)
    pairs = [(d.stage.name, d.tools) for d in evaluated]
    for (na, a), (nb, b) in zip(pairs, pairs[1:]):
        header, crow = comparison_rows(paired_comparison(a, b))
        sec.p(f"With tools, paired difference, A = {na}, B = {nb}:")
        sec.table(header, crow)
    used = [(d.stage.name, with_tools(d.eval, d.tools)) for d in evaluated if d.eval is not None]
    for (na, a), (nb, b) in zip(used, used[1:]):
        header, crow = comparison_rows(paired_comparison(a, b))
        sec.p(f"The whole held-out evaluation as the model is used (the tool tasks with their tools, the "
              f"other tasks as above), paired difference, A = {na}, B = {nb}:")
        sec.table(header, crow[-1:])
    return sec


def _samples_section(stages: list[StageData]) -> Section | None:
    sec = Section("Samples")
    for d in stages:
        if d.eval is not None:
            for s in d.eval.samples[:SAMPLES_PER_STAGE]:
                mark = "correct" if s.get("correct") else "wrong"
                fields = [("question", str(s.get("prompt", "")))]
                if s.get("reasoning"):
                    fields.append(("reasoning", str(s["reasoning"])))
                fields += [("response", str(s.get("response", ""))),
                           ("answer", f"{s.get('answer')!s} (gold {s.get('gold')}, {mark}, "
                                      f"format {'ok' if s.get('format_ok') else 'bad'}, {s.get('tokens')} tokens)")]
                sec.sample(f"{d.stage.name} eval, {s.get('task')} {s.get('id')}", fields)
        if d.external is not None:
            for s in d.external.samples[:1]:
                sec.sample(f"{d.stage.name} external eval, {s.get('task')} {s.get('id')}",
                           [("question", str(s.get("prompt", ""))), ("response", str(s.get("response", ""))),
                            ("answer", f"{s.get('answer')!s} (gold {s.get('gold')}, "
                                       f"{'correct' if s.get('correct') else 'wrong'})")])
        for s in d.rollouts[-SAMPLES_PER_STAGE:]:
            sec.sample(f"{d.stage.name} rollout {s.get('rollout', '?')}",
                       [("question", str(s.get("prompt", ""))), ("completion", str(s.get("completion", ""))),
                        ("reward", f"{s.get('reward')} (gold {s.get('answer')}, "
                                   f"{'correct' if s.get('correct') else 'wrong'})")])
    return sec if sec.blocks else None


def build_sections(run_dir: str | Path) -> tuple[str, dict[str, Any], list[Section], list[str]]:
    """(title, run.json, sections, notes) of a run folder."""
    run = Path(run_dir)
    notes: list[str] = []
    try:
        meta = read_run_json(run) or {}
    except ValueError as e:
        notes.append(f"run.json skipped: {e}")
        meta = {}
    if not meta:
        notes.append("no run.json (stage wall times come from the metrics)")
    try:
        found = find_stages(run, include_pending=True)
    except ValueError as e:                  # a broken run.json: find the stage folders without it
        notes.append(f"stage list from run.json skipped: {e}")
        found = find_stages(run, use_run_json=False)
    stages = [_load_stage(s, notes) for s in found]
    if not stages:
        notes.append(f"{run}: no stage folders, metrics.jsonl or eval.json found")
    sections = [_summary_section(run, meta, stages)]
    for make in (_model_section, _training_section):
        s = make(stages, notes)
        if s:
            sections.append(s)
    c = _config_section(meta, stages)
    evals = _eval_sections(stages, notes)
    external = _external_section(stages, notes)
    phrasing = _phrasing_section(stages, notes)
    tools = _tools_section(stages, notes)
    sections.extend(evals[:1] + [s for s in (external, phrasing, tools) if s] + evals[1:])
    s = _samples_section(stages)
    if s:
        sections.append(s)
    if c:
        sections.append(c)
    title = f"nanoseek run report: {meta.get('name') or run.resolve().name}"
    return title, meta, sections, notes


# ---------------------------------------------------------------------- rendering

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], notes: list[str], generated: str, live: bool) -> str:
    out = [f"# {title}", "", f"Generated {generated}" + (" (live run: regenerated as it goes)" if live else ""), ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
                out.append("|" + "|".join(" --- " for _ in b[1]) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
                out.append("")
            elif b[0] == "img":
                out += [f"![{b[3]}]({FILES_DIR}/{b[1]}.png)", ""]
            elif b[0] == "code":
                fence = "````" if "```" in b[2] else "```"
                out += [f"**{b[1]}**", "", fence, b[2], fence, ""]
            elif b[0] == "sample":
                out += [f"**{b[1]}**", ""]
                for label, text in b[2]:
                    out += [f"*{label}:*", "", *["    " + line for line in text.splitlines() or [""]], ""]
    out += ["## Notes", ""]
    out += [f"- {n}" for n in notes] or ["- nothing was skipped"]
    return "\n".join(out) + "\n"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}th,td{border:1px solid #ddd;
padding:.25em .6em;text-align:right}th{background:#f4f4f6}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}figure{margin:0 0 1.2em}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f9;padding:.7em;overflow-x:auto;font-size:.82em;white-space:pre-wrap}details{margin:.4em 0}
summary{cursor:pointer;font-weight:600}.live{color:#b35900}.notes li{color:#555;font-size:.9em}
.sample{border-left:3px solid #9ab;padding-left:.8em;margin:1em 0}.label{font-size:.8em;color:#666;
text-transform:uppercase}"""


def _inline_code(escaped: str) -> str:
    """Markdown's `code` spans as <code> in already-escaped text."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(title: str, sections: list[Section], notes: list[str], generated: str,
                refresh_s: int | None) -> str:
    e = html.escape
    head = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">']
    if refresh_s:
        head.append(f'<meta http-equiv="refresh" content="{int(refresh_s)}">')
    head += [f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head><body>", f"<h1>{e(title)}</h1>"]
    live = f' <span class="live">live run, this page reloads every {int(refresh_s)} s</span>' if refresh_s else ""
    body = [f"<p>Generated {e(generated)}.{live}</p>"]
    for sec in sections:
        body.append(f"<h2>{e(sec.title)}</h2>")
        for b in sec.blocks:
            if b[0] == "p":
                body.append(f"<p>{_inline_code(e(b[1]))}</p>")
            elif b[0] == "table":
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
                head_row = "" if not any(b[1]) else \
                    "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr></thead>"
                body.append(f"<table>{head_row}<tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[2]).decode("ascii")
                body.append(f'<figure><img alt="{e(b[3])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(b[3])}</figcaption></figure>")
            elif b[0] == "code":
                body.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
            elif b[0] == "sample":
                parts = "".join(f'<div class="label">{e(label)}</div><pre>{e(text)}</pre>' for label, text in b[2])
                body.append(f'<div class="sample"><strong>{e(b[1])}</strong>{parts}</div>')
    items = "".join(f"<li>{e(n)}</li>" for n in notes) or "<li>nothing was skipped</li>"
    body.append(f'<h2>Notes</h2><ul class="notes">{items}</ul>')
    return "\n".join(head + body) + "\n</body></html>\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, refresh_s: int | None = None,
                 live: bool | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_files/*.png``) and ``report.html`` for a run folder.

    ``out_dir`` defaults to the run folder. ``live`` (default: run.json status is "running")
    adds a self-refresh every ``refresh_s`` seconds (default 30) to the HTML; ``refresh_s``
    given alone means live. Returns (markdown path, html path).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    out = Path(out_dir) if out_dir else run
    title, meta, sections, notes = build_sections(run)
    if live is None:
        live = refresh_s is not None or meta.get("status") == "running"
    refresh = (refresh_s or DEFAULT_REFRESH_S) if live else None
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    files = out / FILES_DIR
    images = [b for sec in sections for b in sec.blocks if b[0] == "img"]
    out.mkdir(parents=True, exist_ok=True)
    if images:
        files.mkdir(exist_ok=True)
        for b in images:
            write_atomic(files / f"{b[1]}.png", b[2])
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    write_atomic(md_path, render_markdown(title, sections, notes, generated, live))
    write_atomic(html_path, render_html(title, sections, notes, generated, refresh))
    return md_path, html_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoseek.eval.report",
                                description="Write report.md and a self-contained report.html for a run folder.")
    p.add_argument("run", help="run folder (speedrun with stages, or one training run)")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--refresh", type=limits.positive_int,
                   help="make the HTML reload itself every N seconds (a live run)")
    args = p.parse_args(argv)
    try:
        md, page = write_report(args.run, args.out, args.refresh)
    except (FileNotFoundError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
