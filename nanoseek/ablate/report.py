"""Ablation reports: collect a suite's runs, write tables, plots and markdown.

Reading one run folder back and comparing two arms is :mod:`.results` (one floor down, so the
suites can compare arms without importing the report). This module:

* :func:`collect`: every arm's runs of a suite, read with :mod:`.results`;
* :func:`write_suite_report`: ``results.json`` (every number), ``report.md`` (claim, verdict,
  table, per-seed losses, setup, plots) and the PNG plots;
* :func:`write_combined_markdown`: ``docs/ablations.md`` from several suites' ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_atomic
from .results import METRICS, ArmResult, ReportError, load_seed_run

if TYPE_CHECKING:
    from .suites import Suite

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


# ---------------------------------------------------------------------------- one suite
def collect(suite: "Suite", suite_dir: str | Path, seeds: list[int], seq_len: int) -> dict[str, ArmResult]:
    """Every arm's runs under ``suite_dir/runs``; a missing or unfinished run is an error."""
    suite_dir = Path(suite_dir)
    out = {}
    for arm in suite.arms:
        info = arm.info(seq_len)
        res = ArmResult(arm.name, arm.label, info, arm.note)
        for seed in seeds:
            res.runs.append(load_seed_run(suite_dir / "runs" / arm.name / f"seed{seed}", info["flops_per_token"]))
        out[arm.name] = res
    return out


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mean_curve(arm: ArmResult, key: str) -> tuple[list[float], list[float]]:
    """x = mean over seeds of ``key`` at each evaluated step, y = mean validation loss."""
    by_step: dict[int, list[dict]] = {}
    for r in arm.runs:
        for p in r.curve:
            by_step.setdefault(p["step"], []).append(p)
    steps = sorted(s for s, ps in by_step.items() if len(ps) == len(arm.runs))
    xs = [statistics.fmean(p[key] for p in by_step[s]) for s in steps]
    ys = [statistics.fmean(p["val_loss"] for p in by_step[s]) for s in steps]
    return xs, ys


def plot_curves(title: str, results: dict[str, ArmResult], path: str | Path) -> Path:
    """Validation loss against tokens, training FLOPs and wall-clock: thin lines per seed, bold mean."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("tokens", "training tokens"), ("flops", "training FLOPs (model, fwd+bwd)"), ("wall_s", "wall-clock (s)"))
    late = []
    for i, arm in enumerate(results.values()):
        color = f"C{i}"
        for ax, (key, _) in zip(axes, panels):
            for r in arm.runs:
                ax.plot([p[key] for p in r.curve], [p["val_loss"] for p in r.curve], color=color, alpha=0.3, lw=0.8)
            xs, ys = _mean_curve(arm, key)
            ax.plot(xs, ys, color=color, lw=2, marker="o", ms=3,
                    label=f"{arm.label} ({len(arm.runs)} seed{'s' if len(arm.runs) > 1 else ''})")
        for r in arm.runs:
            late += [p["val_loss"] for p in r.curve[len(r.curve) // 3:]]
    for ax, (_, xlabel) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if late:
            lo, hi = min(late), max(late)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_maxvio(title: str, results: dict[str, ArmResult], path: str | Path) -> Path:
    """MaxVio of each training batch (mean over MoE layers and seeds) against the step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, arm in enumerate(results.values()):
        series = [dict(r.maxvio) for r in arm.runs if r.maxvio]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        ys = [statistics.fmean(s[k] for s in series) for k in steps]
        w = max(1, len(ys) // 25)                                        # light smoothing for readability
        sm = [statistics.fmean(ys[max(0, j - w + 1): j + 1]) for j in range(len(ys))]
        ax.plot(steps, sm, color=f"C{i}", lw=1.5, label=arm.label)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio (max load / mean load - 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- markdown
def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def table_rows(data: dict[str, Any]) -> list[list[str]]:
    """The result table of a suite's results dict: header row, then one row per arm."""
    show_kv = data["suite"] == "attention"
    show_vio = data.get("show_maxvio", False)
    head = ["arm", "params total / activated (non-emb.)", "train FLOPs/token"]
    if show_kv:
        head.append("KV cache bytes/token")
    multi = any(len(a["runs"]) > 1 for a in data["arms"].values())
    head += ["final val loss (mean ± sd)" if multi else "final val loss (1 seed)", f"vs {data['baseline_label']}",
             "tokens/s"]
    if show_vio:
        head += ["MaxVio mean / final"]
    rows = [head]
    base = data["arms"][data["baseline"]]["stats"]["final_val_loss"]["mean"]
    for name, a in data["arms"].items():
        st = a["stats"]
        loss = st["final_val_loss"]
        row = [a["label"], f"{_fmt_int(a['info']['params_total'])} / {_fmt_int(a['info']['params_active'])}",
               _fmt_si(a["info"]["flops_per_token"])]
        if show_kv:
            row.append(_fmt_int(a["info"]["kv_bytes_per_token"]))
        row.append(f"{loss['mean']:.4f} ± {loss['std']:.4f}" if len(a["runs"]) > 1 else f"{loss['mean']:.4f}")
        row.append("baseline" if name == data["baseline"] else
                   f"{loss['mean'] - base:+.4f} ({100 * (loss['mean'] - base) / base:+.2f}%)")
        row.append(f"{st['tokens_per_s']['mean']:,.0f}")
        if show_vio:
            mv, mf = st["maxvio_mean"]["mean"], st["maxvio_final"]["mean"]
            row.append("n/a" if math.isnan(mv) else f"{mv:.3f} / {mf:.3f}")
        rows.append(row)
    return rows


def _md_table(rows: list[list[str]]) -> str:
    """A markdown table; a ``|`` inside a cell (a verdict's "|effect| < X") is escaped."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    out = [line(rows[0]), "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def suite_markdown(data: dict[str, Any], image_dir: str = ".", heading: str = "#") -> str:
    """The markdown section of one suite's results dict (images linked under ``image_dir``)."""
    p = data["plan"]
    seeds = p["seeds"]
    lines = [f'{heading} <a id="{data["suite"]}"></a>`{data["suite"]}`: {data["title"]}', "",
             f"**Claim.** {data['claim']}", "",
             f"**Result: {data['verdict']['status']}.** {data['verdict']['summary']}", "",
             _md_table(table_rows(data)), "",
             f"Final validation loss = mean cross-entropy (nats/token) of the main next-token head on the same "
             f"{p['val_batches']} held-out batches for every arm; ± is the sample standard deviation over the "
             f"{len(seeds)} seed(s). A difference counts (held / did not hold) when its 95% interval over the "
             "seeds (Student's t on the per-seed paired differences) excludes zero; otherwise it is unresolved, and "
             "the interval's farther end is the largest effect the seeds cannot rule out."
             + (" With one seed there is no interval: every difference here is one run against another, and the "
                "verdict carries '(one seed)'." if len(seeds) == 1 else ""), "", "Arms:", ""]
    for a in data["arms"].values():
        lines.append(f"- **{a['label']}** (`{a['name']}`): {a['note']}")
    lines += ["", "Per-seed final validation loss:", ""]
    rows = [["arm"] + [f"seed {s}" for s in seeds]]
    for a in data["arms"].values():
        per = {r["seed"]: r["final_val_loss"] for r in a["runs"]}
        rows.append([a["label"]] + [f"{per[s]:.4f}" if s in per else "-" for s in seeds])
    lines += [_md_table(rows), ""]
    if data.get("downstream"):
        lines += downstream_markdown(data["downstream"])
    tuned = data.get("extra", {}).get("lr_scales")               # the optimizer suite: each arm scales the lr
    lr_text = (f"peak lr {p['lr']:g} x the arm's factor ({', '.join(f'x{k:g}' for k in tuned)})" if tuned
               else f"AdamW lr {p['lr']:g}")
    lines += [f"Setup: every arm trains {p['steps']} steps of {p['micro_batch_size']} x {p['seq_len']} tokens "
              f"({_fmt_int(p['steps'] * p['micro_batch_size'] * p['seq_len'])} tokens per run, the same for every arm) "
              f"on `{p['data_dir']}`, seeds {seeds} (seed s fixes the data order and the initialisation, the same "
              f"for every arm), {lr_text} (warm-up {p['warmup_steps']} steps, WSD decay over the last "
              f"20% to {p['min_lr']:g}{' x the same factor' if tuned else ''}), validation every {p['eval_every']} steps. "
              + (f"Budget {p['budget_minutes']:.1f} min" if p.get("budget_minutes") else "Steps given, no budget")
              + f"; the runs' training times add up to {data['train_minutes']:.1f} min (runs trained side by side "
              "with `--jobs` overlap)."
              + (f" The plan had {len(p['planned_seeds'])} seeds; the machine ran slower than its probe and the "
                 f"budget stopped the suite after {len(seeds)}." if len(p.get("planned_seeds") or seeds) > len(seeds)
                 else ""), ""]
    for img in data.get("plots", []):
        lines.append(f"![{data['suite']}: {img}]({image_dir.rstrip('/')}/{img})")
    lines += ["", f"Regenerate: `{p['command']}`", ""]
    return "\n".join(lines)


def downstream_markdown(summary: dict[str, Any]) -> list[str]:
    """A suite's downstream lines (:mod:`.downstream`): the settings, a per-seed table, the
    speculative-decoding figures."""
    from .downstream import _pts

    s = summary["settings"]
    seeds = sorted({int(k) for a in summary["arms"].values() for k in a["pass1"]})
    rows = [["arm"] + [f"seed {x}" for x in seeds] + ["mean"]]
    for name, a in summary["arms"].items():
        p = {int(k): v for k, v in a["pass1"].items()}
        rows.append([a["label"]] + [f"{100 * p[x]:.1f}%" if x in p else "-" for x in seeds] + [f"{100 * a['mean']:.1f}%"])
    for c in summary["comparisons"]:
        per = {int(k): v for k, v in c["per_seed"].items()}
        iv = c["interval"]
        rows.append([f"{summary['arms'][c['arm']]['label']} - {summary['arms'][c['baseline']]['label']}, points [95% "
                     "over problems]"]
                    + [f"{_pts(per[x]['mean'])} [{_pts(per[x]['low'])}, {_pts(per[x]['high'])}]" if x in per else "-"
                       for x in seeds]
                    + [f"{_pts(c['diff'])}" + (f" [{_pts(iv['low'])}, {_pts(iv['high'])}] over seeds" if iv else "")])
    lines = ["", f"**Downstream.** Held-out pass@1 of every run's final model: `nanoseek eval` in {s['mode']} mode on "
             f"the same {s['n_problems']} test-split problems of each of {', '.join(s['tasks'])} "
             f"({s['k']} sample(s) at temperature {s['temperature']:g}, {s['max_new_tokens']} new tokens), "
             "saved as each run's `downstream.json`. The verdict reads the 95% interval over seeds; the per-seed "
             "intervals pair the problems of one seed.", "", _md_table(rows), ""]
    spec = [(n, a) for n, a in summary["arms"].items() if a["acceptance"]]
    for name, a in spec:
        acc = {int(k): v for k, v in a["acceptance"].items()}
        tps = {int(k): v for k, v in a["tokens_per_step"].items()}
        lines += [f"Speculative decoding with the {a['label']} arm's own MTP module as the draft (greedy answers "
                  "identical to plain decoding): drafts accepted " + ", ".join(
                      f"{100 * acc[x]:.1f}% (seed {x})" for x in sorted(acc)) + "; tokens per forward step "
                  + ", ".join(f"{tps[x]:.2f}" for x in sorted(tps)) + ". DeepSeek-V3 reports 85-90% acceptance of "
                  "the second token.", ""]
    return lines


def results_dict(suite: "Suite", results: dict[str, ArmResult], plan: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, JSON-serialisable (``results.json``)."""
    verdict = suite.judge(results)
    arms = {}
    for name, a in results.items():
        stats = {m: {"mean": a.mean(m), "std": a.std(m)} for m in METRICS}
        arms[name] = {"name": name, "label": a.label, "note": a.note, "info": a.info, "stats": stats,
                      "runs": [asdict(r) for r in a.runs]}
    return {"suite": suite.name, "title": suite.title, "claim": suite.claim, "baseline": suite.baseline,
            "baseline_label": results[suite.baseline].label, "show_maxvio": suite.show_maxvio, "extra": suite.extra,
            "verdict": {"status": verdict.status, "summary": verdict.summary}, "plan": plan,
            "train_minutes": sum(r.wall_s for a in results.values() for r in a.runs) / 60, "arms": arms, "plots": []}


def _json_default(x: Any) -> Any:
    raise TypeError(f"cannot write {type(x).__name__} to results.json")


def _clean(x: Any) -> Any:
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _restore_nan(x: Any, key: str = "") -> Any:
    if x is None and key in ("mean", "std"):
        return float("nan")
    if isinstance(x, dict):
        return {k: _restore_nan(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore_nan(v) for v in x]
    return x


def add_downstream(data: dict[str, Any], suite: "Suite", suite_dir: Path) -> None:
    """The suite's downstream evaluations (:mod:`.downstream`) into ``data``, and their comparison into
    the verdict: a claim with two parts (validation loss and task accuracy) holds only where both do."""
    from . import downstream
    from .results import combine_statuses

    ds = downstream.for_plan(suite.downstream, data["plan"].get("downstream_problems"))
    if ds is None:
        return
    runs = [(a.name, seed, suite_dir / "runs" / a.name / f"seed{seed}") for seed in data["plan"]["seeds"]
            for a in suite.arms]
    summary = downstream.summarize(ds, {a.name: a.label for a in suite.arms}, runs)
    data["downstream"] = summary
    if summary is None:
        data["verdict"]["summary"] += " (The downstream evaluation has not been made for every run: run the suite again.)"
        return
    statuses = [c["status"] for c in summary["comparisons"]]
    if all(c["interval"] for c in summary["comparisons"]):      # seeds to judge by: the two parts combine
        data["verdict"]["status"] = combine_statuses([data["verdict"]["status"]] + statuses)
    data["verdict"]["summary"] += " " + downstream.describe(summary)


def write_suite_report(suite: "Suite", suite_dir: str | Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Collect the runs of ``suite_dir`` and write results.json, report.md and the plots there."""
    suite_dir = Path(suite_dir)
    results = collect(suite, suite_dir, plan["seeds"], plan["seq_len"])
    data = results_dict(suite, results, plan)
    if suite.downstream is not None:
        add_downstream(data, suite, suite_dir)
    plots = [plot_curves(f"{suite.name}: {suite.title}", results, suite_dir / f"{suite.name}.png").name]
    if suite.show_maxvio:
        plots.append(plot_maxvio(f"{suite.name}: MaxVio over training", results,
                                 suite_dir / f"{suite.name}-maxvio.png").name)
    data["plots"] = plots
    write_atomic(suite_dir / RESULTS_FILE, json.dumps(_clean(data), indent=1, default=_json_default) + "\n")
    write_atomic(suite_dir / REPORT_FILE, suite_markdown(data))
    return data


def read_results(suite_dir: str | Path) -> dict[str, Any]:
    path = Path(suite_dir) / RESULTS_FILE
    try:
        return _restore_nan(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ReportError(f"{path}: no results (run the suite first)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


INTRO = """# Ablations: DeepSeek's architectural claims at small scale

Each section below is a matched pre-training experiment run by `nanoseek ablate` on this repository's
built-in corpus (generated reasoning problems and shipped prose, `nanoseek data prepare --default-corpus`):
the arms differ only in what the claim is about, train on the same data in the same order from the same
seeds for the same number of tokens, and are compared on the validation loss of the main next-token head
(`mtp` also on held-out task accuracy; the `rl` suite compares RL algorithms from one SFT checkpoint on it).
The claims come from papers about models 100,000 times larger trained on 100,000,000 times more tokens;
a claim that does not hold here has not been refuted, and one that holds has not been confirmed at scale.
What these runs show is whether the mechanism already pays off, or already costs, at the budget each
section states (tokens per run, seeds), measured as it came out. A difference counts (the claim held, or
did not) when its 95% interval over the seeds excludes zero; otherwise it is unresolved, and the interval
bounds how large an effect the runs could have missed. Tokens/s and the wall-clock plots come from a
shared 2-core CPU on which other jobs ran at the same time: they are indicative only.

Base model (every suite derives its arms from it): {base}.
"""


def prepare_command(data_dir: str | Path) -> str:
    """The ``nanoseek data prepare`` line that made ``data_dir``: the default corpus with the generator
    settings its manifest records (``--task-docs`` and the others where they differ from the defaults)."""
    cmd = f"nanoseek data prepare --default-corpus --out {data_dir}"
    try:
        sources = json.loads((Path(data_dir) / "manifest.json").read_text()).get("sources") or []
    except (OSError, ValueError, AttributeError):
        return cmd
    src = next((x for x in sources if isinstance(x, dict) and x.get("kind") == "default-corpus"), None)
    if src is None:
        return cmd
    flags = [("--task-docs", src.get("task_docs"), 20_000), ("--seed", src.get("seed"), 0),
             ("--task-level", src.get("task_level"), None), ("--text-repeats", src.get("text_repeats"), 1)]
    return cmd + "".join(f" {flag} {v}" for flag, v, default in flags if v is not None and v != default)


def write_combined_markdown(suite_dirs: list[str | Path], out_md: str | Path, plots_dir: str | Path,
                            base_description: str, preamble: str = "", report_command: str = "",
                            section=None) -> Path:
    """``docs/ablations.md``: a summary table, the regenerating commands, every suite's section;
    plots copied into ``plots_dir``. ``section(data, image_dir, heading)`` writes one suite's section
    (default :func:`suite_markdown`; the CLI passes :func:`nanoseek.ablate.rl_report.any_suite_markdown`)."""
    section = section or suite_markdown
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(plots_dir.resolve(), out_md.parent.resolve())
    from .suites import REPORTED

    sections, summary = [], [["suite", "claim held here?", "tokens per run", "seeds", "training time (all runs)",
                              "reported at scale"]]
    commands, data_dirs = [], []
    for d in suite_dirs:
        data = read_results(d)
        for img in data.get("plots", []):
            write_atomic(plots_dir / img, (Path(d) / img).read_bytes())
        sections.append(section(data, image_dir=rel, heading="##"))
        p = data["plan"]
        size = (f"{p['steps']} RL steps" if data.get("kind") == "rl" else
                _fmt_int(p["steps"] * p["micro_batch_size"] * p["seq_len"]))
        summary.append([f"[`{data['suite']}`](#{data['suite']})", data["verdict"]["status"], size, str(len(p["seeds"])),
                        f"{data['train_minutes']:.1f} min", REPORTED.get(data["suite"], "")])
        commands.append(p["command"])
        if p.get("data_dir") and p["data_dir"] not in data_dirs:
            data_dirs.append(p["data_dir"])
    text = INTRO.format(base=base_description)
    if preamble:
        text += "\n" + preamble.strip() + "\n"
    out_dir = Path(suite_dirs[0]).parent if suite_dirs else Path("runs/ablate")
    regen = ([prepare_command(d) for d in data_dirs] + commands +
             [report_command or f"nanoseek ablate --report-only --out {out_dir} --markdown {out_md}"])
    sized = any(read_results(d)["plan"].get("budget_minutes") for d in suite_dirs)
    how = ("a suite given --budget-minutes sizes its runs from a throughput probe, so its steps and seeds depend on "
           "the machine" if sized else "steps and seeds are given, so the runs do not depend on the machine's speed; "
           "`--jobs N` trains N runs at once with the same results")
    text += ("\n" + _md_table(summary) + f"\n\nTo regenerate everything ({how}):\n\n```\n"
             + "\n".join(regen) + "\n```\n\n" + "\n".join(sections))
    write_atomic(out_md, text)
    return out_md


__all__ = ["collect", "plot_curves", "plot_maxvio", "table_rows", "suite_markdown", "results_dict", "write_suite_report", "read_results",
           "write_combined_markdown", "prepare_command", "add_downstream", "RESULTS_FILE", "REPORT_FILE"]
