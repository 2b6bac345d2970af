"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes.

Every function takes plain series (``(steps, values)`` pairs, as ``runs.series`` returns them)
or eval results, draws one figure and returns its PNG, or None when there is nothing to draw,
so ``report.py`` can skip a figure with a note instead of failing. No display is needed and
nothing is written to disk here.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

Series = tuple[Sequence[float], Sequence[float]]

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png(fig, wspace: float = 0.35, right_in: float = 0.25) -> bytes:
    """The figure as PNG bytes (the figure is closed). Margins are fixed in inches (0.8 in on the
    left for tick and axis labels, ``right_in`` on the right: more for a twin axis) rather than
    found by tight_layout, which renders every text twice and doubled the report's time."""
    plt = _plt()
    buf = io.BytesIO()
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / w, right=1 - right_in / w, bottom=0.5 / h, top=1 - 0.4 / h, wspace=wspace)
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (non-finite values are carried over, not averaged in)."""
    out, m = [], None
    for v in values:
        if math.isfinite(v):
            m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m if m is not None else float("nan"))
    return out


def _mfu_per_token_s(tps: Series, mfu: Series) -> float | None:
    """MFU / (tokens/s) when it is one constant (same FLOPs per token and peak throughout), else None."""
    by_step = dict(zip(tps[0], tps[1]))
    ratios = [m / by_step[s] for s, m in zip(*mfu) if by_step.get(s) and math.isfinite(m) and math.isfinite(by_step[s])]
    if not ratios:
        return None
    lo, hi = min(ratios), max(ratios)
    return (lo + hi) / 2 if hi - lo <= 1e-6 * max(abs(hi), 1e-30) else None


def _has(s: Series | None) -> bool:
    return bool(s and len(s[0]))


def training_plot(title: str, loss: Series, val_loss: Series | None = None, mtp_loss: Series | None = None,
                  spikes: Sequence[int] = (), tokens_per_s: Series | None = None,
                  mfu: Series | None = None) -> bytes | None:
    """Loss curves (train raw + smoothed, validation, MTP, skipped spikes) and throughput / MFU."""
    if not (_has(loss) or _has(val_loss)):
        return None
    plt = _plt()
    throughput = _has(tokens_per_s) or _has(mfu)
    fig, axes = plt.subplots(1, 2 if throughput else 1, figsize=(10 if throughput else 6, 3.4), squeeze=False)
    ax = axes[0][0]
    alpha = max(0.05, min(0.5, 10 / max(1, len(loss[0]) if _has(loss) else 1)))   # ~10-point smoothing window
    if _has(loss):
        ax.plot(loss[0], loss[1], color="tab:blue", alpha=0.3, lw=0.8)
        ax.plot(loss[0], ema(loss[1], alpha), color="tab:blue", label="train (EMA)")
    if _has(mtp_loss):
        ax.plot(mtp_loss[0], ema(mtp_loss[1], alpha), color="tab:purple", lw=1, label="MTP loss (EMA)")
    if _has(val_loss):
        ax.plot(val_loss[0], val_loss[1], "o-", color="tab:orange", ms=3, label="validation loss")
    for i, s in enumerate(spikes):
        ax.axvline(s, color="tab:red", alpha=0.4, lw=0.8, label="spike skipped" if i == 0 else None)
    finite = [v for v in list(loss[1] if _has(loss) else []) + list(val_loss[1] if _has(val_loss) else [])
              if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{title}: loss")
    ax.legend(fontsize=8)
    if throughput:
        ax = axes[0][1]
        if _has(tokens_per_s):
            ax.plot(tokens_per_s[0], tokens_per_s[1], color="tab:green", lw=1)
            ax.set_ylabel("tokens/s")
            ratio = _mfu_per_token_s(tokens_per_s, mfu) if _has(mfu) else None
            if ratio:                       # MFU = tokens/s x FLOPs/token / peak: the same curve, rescaled
                sec = ax.secondary_yaxis("right", functions=(lambda x: 100 * ratio * x, lambda y: y / (100 * ratio)))
                sec.set_ylabel("MFU (%)")
            elif _has(mfu):
                ax.twinx().plot(mfu[0], [100 * v for v in mfu[1]], color="tab:gray", lw=1)
        elif _has(mfu):
            ax.plot(mfu[0], [100 * v for v in mfu[1]], color="tab:gray", lw=1)
            ax.set_ylabel("MFU (%)")
        ax.set_xlabel("step")
        ax.set_title(f"{title}: throughput")
    return png(fig, wspace=0.3, right_in=0.8 if throughput else 0.25)


def expert_plot(title: str, maxvio: tuple[Sequence[int], Sequence[Sequence[float]]] | None,
                bias_range: tuple[Sequence[int], Sequence[Sequence[float]]] | None = None,
                expert_load: tuple[Sequence[int], Sequence[Sequence[Sequence[float]]]] | None = None) -> bytes | None:
    """Expert balance over training: MaxVio per MoE layer over steps (a heat map), the range of
    the aux-loss-free bias per layer, and (when logged) layers x experts load snapshots."""
    panels = [p for p in (maxvio, bias_range) if p and len(p[0])]
    snaps = []
    if expert_load and len(expert_load[0]):
        n = len(expert_load[0])
        snaps = sorted({0, n // 2, n - 1})
    if not panels and not snaps:
        return None
    plt = _plt()
    import numpy as np

    cols = len(panels) + len(snaps)
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.4), squeeze=False)
    i = 0
    if maxvio and len(maxvio[0]):
        ax = axes[0][i]
        steps, rows = maxvio
        data = np.asarray(rows, dtype=float).T                       # [layers, steps]
        lo, hi = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)  # one step
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma",
                       extent=(lo, hi, data.shape[0] - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="MaxVio")
        ax.set_yticks(range(data.shape[0]))
        ax.set_xlabel("step")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{title}: MaxVio per layer")
        i += 1
    if bias_range and len(bias_range[0]):
        ax = axes[0][i]
        steps, rows = bias_range
        data = np.asarray(rows, dtype=float)
        for layer in range(data.shape[1]):
            ax.plot(steps, data[:, layer], lw=1, label=f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("max - min expert bias")
        ax.set_title(f"{title}: bias trajectory")
        if data.shape[1] <= 8:
            ax.legend(fontsize=7)
        i += 1
    for j in snaps:
        ax = axes[0][i]
        load = np.asarray(expert_load[1][j], dtype=float)            # [layers, experts]
        share = load / np.clip(load.sum(-1, keepdims=True), 1e-9, None)
        im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label="token share")
        ax.set_yticks(range(share.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load, step {expert_load[0][j]}")
        i += 1
    return png(fig, wspace=0.5)


GRPO_PANELS = (("reward_mean", "reward (mean)"), ("accuracy", "accuracy"), ("format_rate", "format rate"),
               ("response_len_mean", "response length (tokens)"))


def grpo_plot(title: str, series: dict[str, Series]) -> bytes | None:
    """Reward, accuracy, format rate and response length over GRPO steps."""
    present = [(k, label) for k, label in GRPO_PANELS if _has(series.get(k))]
    if not present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(present), figsize=(3.4 * len(present), 3.0), squeeze=False)
    for ax, (k, label) in zip(axes[0], present):
        xs, ys = series[k]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=0.8)
        ax.plot(xs, ema(ys, 0.2), color="tab:blue")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        if k in ("accuracy", "format_rate"):
            ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"{title}: GRPO", fontsize=10)
    return png(fig)


def accuracy_plot(stages: Sequence[tuple[str, object]]) -> bytes | None:
    """Held-out pass@1 per task, one bar per stage, with the 95% interval as error bars."""
    from .results import interval

    tasks = list(dict.fromkeys(t for _, r in stages for t in r.task_names))
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) * max(1, len(stages)) / 2 + 2), 3.4))
    width = 0.8 / len(stages)
    for j, (name, r) in enumerate(stages):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            iv = interval(r.metrics["tasks"].get(t, {}).get("pass@1"))
            if iv is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(100 * iv.mean)
            lo.append(max(0.0, 100 * (iv.mean - iv.low)))      # Wilson bounds at 0% / 100% can
            hi.append(max(0.0, 100 * (iv.high - iv.mean)))     # overshoot the mean by a rounding error
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out accuracy per stage (95% intervals)")
    ax.legend(fontsize=8)
    return png(fig)


def ttc_plot(stages: Sequence[tuple[str, object]]) -> bytes | None:
    """pass@k (solid) and maj@k (dashed) against samples k, per task, one colour per stage."""
    tasks = list(dict.fromkeys(t for _, r in stages for t in r.task_names))
    usable = [(n, r) for n, r in stages if any(len(r.metrics["tasks"][t].get("pass@k", {})) > 1 for t in r.task_names)]
    if not tasks or not usable:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.0 * len(tasks), 3.3), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes[0], tasks):
        for j, (name, r) in enumerate(usable):
            s = r.metrics["tasks"].get(t)
            if not s or not s.get("pass@k"):
                continue
            ks = [int(k) for k in s["pass@k"]]
            c = colors[j % len(colors)]
            ax.plot(ks, [100 * v for v in s["pass@k"].values()], "o-", color=c, label=f"{name} pass@k")
            ax.plot(ks, [100 * s["maj@k"][str(k)] for k in ks], "s--", color=c, label=f"{name} maj@k")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("samples per problem k")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(t)
        ax.legend(fontsize=7)
    return png(fig)


__all__ = ["png", "ema", "training_plot", "expert_plot", "grpo_plot", "accuracy_plot", "ttc_plot"]
