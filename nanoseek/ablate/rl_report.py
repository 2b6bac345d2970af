"""The ``rl`` suite's report: ``results.json``, ``report.md`` and the reward-curve plot.

:mod:`.rl` trains, evaluates and judges; this module writes what it found, in the layout of the
pre-training suites' reports (:mod:`.report`, whose table and plot helpers it reuses): the claim of
each algorithm, the verdict, a table with each arm's held-out pass@1 (mean over seeds), its paired
difference to GRPO with the 95% interval and its verdict, the per-seed numbers, the setup, and a
plot of the rollout reward and response length against the optimizer step (mean over seeds).
``docs/ablations.md`` takes the section from :func:`rl_markdown` (:func:`.report.write_combined_markdown`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from .report import REPORT_FILE, RESULTS_FILE, _clean, _md_table, _plt
from .results import ArmResult
from .rl import ARMS, BASELINE, RLPlan, arm, collect, judge, load_start, versus_start

TITLE = "GRPO vs DAPO vs Dr. GRPO vs GSPO vs CISPO from one SFT checkpoint"
CLAIM = ("Each of four successors of GRPO claims to train a better reasoning policy than GRPO from the same "
         "start: " + "; ".join(f"**{a.label}**: {a.claim}" for a in ARMS if a.name != BASELINE)
         + ". Judged here as held-out pass@1 at the same optimizer steps and rollouts per step.")


def results_dict(plan: RLPlan, results: dict[str, ArmResult], start: dict[str, float] | None = None) -> dict[str, Any]:
    """The suite's results; ``start``: the SFT checkpoint's per-problem pass@1 (:func:`.rl.load_start`),
    against which each arm's gain from RL is reported too."""
    per_arm, status, summary = judge(results)
    arms = {}
    for name, r in results.items():
        a = arm(name)
        arms[name] = {"name": name, "label": a.label, "note": a.note, "claim": a.claim,
                      "overrides": a.settings(_max_new_tokens(plan)),
                      "stats": {"pass1": {"mean": r.mean("pass1"), "std": r.std("pass1")}},
                      "vs_baseline": per_arm.get(name), "vs_start": versus_start(r, start) if start else None,
                      "runs": [asdict(x) for x in r.runs]}
    if start:
        summary += (" Against the start (no RL): " + "; ".join(
            f"{arms[n]['label']} {_interval(arms[n]['vs_start'])}" for n in arms) + " points.")
    return {"kind": "rl", "suite": plan.suite, "title": TITLE, "claim": CLAIM, "baseline": BASELINE,
            "start": {"pass1": statistics.fmean(start.values()), "n": len(start)} if start else None,
            "baseline_label": results[BASELINE].label, "verdict": {"status": status, "summary": summary},
            "plan": plan.to_dict(), "train_minutes": sum(x.wall_s for r in results.values() for x in r.runs) / 60,
            "arms": arms, "plots": []}


def _max_new_tokens(plan: RLPlan) -> int:
    from .rl import stage_config
    return stage_config(arm(BASELINE), plan, plan.seeds[0], "unused").algo.max_new_tokens


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for p in r["curve"]:
            if p.get(key) is not None:
                by_step.setdefault(p["step"], []).append(p[key])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def smooth(ys: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (shorter at the ends): a rollout of 8 x 8 samples
    is too noisy a measure per step to compare arms by eye."""
    half = window // 2
    return [statistics.fmean(ys[max(0, i - half): i + half + 1]) for i in range(len(ys))]


def plot_rl(data: dict[str, Any], path: str | Path) -> Path:
    """Rollout reward and response length against the optimizer step, each smoothed over a twentieth
    of the run: thin lines per seed, bold the mean over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    window = max(1, data["plan"]["steps"] // 20)
    for i, a in enumerate(data["arms"].values()):
        for ax, key in zip(axes, ("reward_mean", "response_len_mean")):
            for r in a["runs"]:
                pts = [p for p in r["curve"] if p.get(key) is not None]
                ax.plot([p["step"] for p in pts], smooth([p[key] for p in pts], window), color=f"C{i}", alpha=0.25,
                        lw=0.8)
            xs, ys = _mean_curve(a["runs"], key)
            ax.plot(xs, smooth(ys, window), color=f"C{i}", lw=2, label=f"{a['label']} ({len(a['runs'])} seed(s))")
    for ax, ylabel in zip(axes, (f"rollout reward (moving mean over {window} steps)",
                                 f"response length, tokens (moving mean over {window} steps)")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"rl: {TITLE}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interval(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _last_reward(a: dict[str, Any]) -> float:
    """Mean rollout reward over the last quarter of the steps, averaged over seeds."""
    vals = []
    for r in a["runs"]:
        pts = [p["reward_mean"] for p in r["curve"] if p.get("reward_mean") is not None]
        if pts:
            vals.append(statistics.fmean(pts[-max(1, len(pts) // 4):]))
    return statistics.fmean(vals) if vals else float("nan")


def rl_markdown(data: dict[str, Any], image_dir: str = ".", heading: str = "#") -> str:
    """The markdown section of the rl suite's results dict (images linked under ``image_dir``)."""
    p = data["plan"]
    seeds = p["seeds"]
    multi = len(seeds) > 1
    start = data.get("start")
    rows = [["arm", "held-out pass@1 (mean" + (" ± sd over seeds)" if multi else ", 1 seed)"),
             f"vs {data['baseline_label']}: paired diff, points [95%]", "verdict", "reward, last quarter of steps"]
            + (["vs the start (no RL): paired diff, points [95%]"] if start else [])]
    if start:
        rows.append(["the start (the SFT checkpoint, no RL)", f"{100 * start['pass1']:.1f}%", "-", "-", "-", "-"])
    for name, a in data["arms"].items():
        st = a["stats"]["pass1"]
        vs = a.get("vs_baseline")
        rows.append([a["label"], f"{100 * st['mean']:.1f}%" + (f" ± {100 * st['std']:.1f}" if multi else ""),
                     "baseline" if name == data["baseline"] else _interval(vs and vs["diff"]),
                     "-" if name == data["baseline"] else vs["status"], f"{_last_reward(a):.3f}"]
                    + ([_interval(a.get("vs_start"))] if start else []))
    ev = p["eval"]
    lines = [f'{heading} <a id="{data["suite"]}"></a>`{data["suite"]}`: {data["title"]}', "",
             f"**Claim.** {data['claim']}", "",
             f"**Result: {data['verdict']['status']}.** {data['verdict']['summary']}", "",
             _md_table(rows), "",
             f"Held-out pass@1: `nanoseek eval` on the same {ev['n_problems']} test-split problems per task of "
             f"{', '.join(ev['tasks'])}" + (f" (level {', '.join(map(str, ev['levels']))})" if ev.get("levels") else "")
             + f" for every run ({ev['k']} samples per problem at temperature {ev['temperature']:g}, "
             f"{ev['max_new_tokens']} new tokens, the stage's own prompt mode). The difference to GRPO is the paired "
             "95% interval of the per-problem differences, each problem's pass@1 averaged over the seeds first; an "
             "arm's claim counts as held (or not) when that interval excludes zero and so does the 95% interval of "
             "the per-seed differences over the seeds (Student's t)." + (" With one seed there is no spread: the verdict "
                                                               "carries '(one seed)'." if not multi else ""),
             "", "The start row is the SFT checkpoint every arm trains from, evaluated alike; each arm's difference to "
             "it pairs the same problems (the arm's pass@1 averaged over its seeds): what RL gained at all. "
             "The reward columns and curves are the rollouts' own (format + accuracy; DAPO's includes its "
             "overlong penalty, so its reward is not on the same scale); the verdict reads held-out pass@1 only.",
             "", "Arms (`--set` on top of the common settings):", ""]
    for a in data["arms"].values():
        sets = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in a["overrides"].items()) or "none"
        lines.append(f"- **{a['label']}** (`{a['name']}`: {sets}): {a['note']}")
    per = [["arm"] + [f"seed {s}" for s in seeds]]
    for name, a in data["arms"].items():
        by = {r["seed"]: r for r in a["runs"]}
        vs = (a.get("vs_baseline") or {}).get("per_seed", {})
        per.append([a["label"]] + [
            (f"{100 * by[s]['pass1']:.1f}%" + (f" ({_interval(vs.get(s) or vs.get(str(s)))})"
                                               if name != data["baseline"] else "")) if s in by else "-"
            for s in seeds])
    lines += ["", "Per-seed held-out pass@1 (paired difference to GRPO, points [95%]):", "", _md_table(per), "",
              f"Setup: every arm starts from `{p['model']}` and trains {p['steps']} optimizer steps (the same "
              f"rollouts per step) with `nanoseek grpo --config {p['config']}` and `--set "
              + " --set ".join(p["overrides"]) + f"`, seeds {seeds} (grpo.seed and train.seed); the runs took "
              f"{data['train_minutes']:.1f} min of training in all.", ""]
    for img in data.get("plots", []):
        lines.append(f"![{data['suite']}: {img}]({image_dir.rstrip('/')}/{img})")
    lines += ["", f"Regenerate: `{p['command']}`", ""]
    return "\n".join(lines)


def any_suite_markdown(data: dict[str, Any], image_dir: str = ".", heading: str = "#") -> str:
    """A suite's section for ``docs/ablations.md``: :func:`rl_markdown` for the rl suite, else the
    pre-training suites' :func:`~nanoseek.ablate.report.suite_markdown`."""
    from .report import suite_markdown
    return (rl_markdown if data.get("kind") == "rl" else suite_markdown)(data, image_dir, heading)


def write_rl_report(plan: RLPlan, suite_dir: str | Path) -> dict[str, Any]:
    """Collect the evaluated runs of ``suite_dir``; write results.json, report.md and the plot there."""
    suite_dir = Path(suite_dir)
    data = results_dict(plan, collect(plan, suite_dir), load_start(suite_dir))
    data["plots"] = [plot_rl(data, suite_dir / f"{plan.suite}.png").name]
    data = _clean(data)
    write_atomic(suite_dir / RESULTS_FILE, json.dumps(data, indent=1) + "\n")
    write_atomic(suite_dir / REPORT_FILE, rl_markdown(data))
    return data


__all__ = ["results_dict", "plot_rl", "smooth", "rl_markdown", "write_rl_report", "any_suite_markdown", "TITLE", "CLAIM"]
