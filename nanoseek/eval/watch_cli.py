"""``nanoseek watch RUN``: a live terminal dashboard of a running (or finished) run.

Tails the ``metrics.jsonl`` of every stage of the run folder (layout in
:mod:`nanoseek.eval.runs`; stages that appear while watching are picked up) and redraws once a
second (``--interval``) with rich's Live display:

* one row per stage: status, step, train loss with a sparkline of the recent steps, the last
  validation loss and bits per byte, tokens/s, MFU, the worst MoE layer's MaxVio, GRPO's
  reward / accuracy / format rate / response length, skipped spikes and rollbacks, and how long
  ago the stage last wrote;
* for the stage being trained: the learning rate and gradient norm, MaxVio and the
  aux-loss-free bias range per MoE layer as bars, and sparklines of the GRPO curves.

Only the new bytes of each file are read at every refresh (a half-written last line waits for
the next one). Ctrl-C exits. ``--once`` prints a single frame and exits (scripts, tests).
"""

from __future__ import annotations

import argparse

from nanoseek import limits
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 400           # values kept per curve
ACTIVE_S = 120          # a stage that wrote within this many seconds is "running"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (a speedrun with stages, or one training run)")
    p.add_argument("--interval", type=limits.seconds, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--width", type=limits.int_range(20),
                   help="frame width in characters (default: the terminal's; 160 when "
                        "printing --once to a file or pipe)")


def sparkline(values, width: int = 24) -> str:
    """The last ``width`` finite values as block characters, scaled between their min and max."""
    vals = [v for v in list(values)[-width:] if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK[3] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))] for v in vals)


def bar(value: float, scale: float, width: int = 20) -> str:
    if not math.isfinite(value) or scale <= 0:
        return ""
    n = max(0, min(width, round(value / scale * width)))
    return "█" * n + "·" * (width - n)


class StageTail:
    """Incremental reader of one stage's metrics.jsonl, keeping what the dashboard shows."""

    def __init__(self, stage):
        self.stage = stage
        self.offset = 0
        self.last: dict[str, Any] = {}           # the latest step record
        self.curves: dict[str, deque] = {}
        self.val: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.done = False
        self.mtime: float | None = None
        self.problems: list[str] = []

    def poll(self) -> None:
        from .runs import numeric, read_jsonl

        path = self.stage.metrics_path
        if not path.is_file():
            return
        size = path.stat().st_size
        if size < self.offset:                   # the file was replaced: read it again from the start
            self.__init__(self.stage)
        self.mtime = path.stat().st_mtime
        records, self.offset, problems = read_jsonl(path, self.offset)
        self.problems = (self.problems + problems)[-3:]
        for r in records:
            ev = r.get("event")
            if ev is not None:
                self.counts[ev] = self.counts.get(ev, 0) + 1
                if ev == "done":
                    self.done = True
                elif ev in ("start", "resume"):
                    self.done = False
            if ev in (None, "eval"):
                for k in ("val_loss", "val_bpb"):
                    v = numeric(r.get(k))
                    if v is not None:
                        self.val[k] = v
            if ev is None and isinstance(r.get("step"), int):
                self.last = r
                for k in ("loss", "ce", "tokens_per_s", "mfu", "reward_mean", "accuracy", "format_rate",
                          "response_len_mean", "grad_norm"):
                    v = numeric(r.get(k))
                    if v is not None:
                        self.curves.setdefault(k, deque(maxlen=HISTORY)).append(v)

    def value(self, key: str) -> float | None:
        from .runs import numeric

        return numeric(self.last.get(key))

    def status(self, now: float) -> str:
        if self.done:
            return "done"
        # run.json's (else stage.json's) word wins once a stage has ended
        listed = self.stage.info.get("status") or self.stage.stage_json().get("status")
        if listed in ("done", "failed", "skipped", "interrupted"):
            return str(listed)
        if self.mtime is None:
            return str(listed or "pending")
        return "running" if now - self.mtime < ACTIVE_S else "idle"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None or not math.isfinite(v) else fmt.format(v)


def render(run: Path, tails: list[StageTail], meta: dict[str, Any], now: float | None = None):
    """One frame of the dashboard (a rich renderable)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from .runs import fmt_count, fmt_duration

    now = time.time() if now is None else now
    head = f"[bold]{meta.get('name') or run.resolve().name}[/]  {run}"
    if meta.get("status"):
        head += f"   status: {meta['status']}"
    head += f"   {time.strftime('%H:%M:%S', time.localtime(now))}"
    if not tails:
        return Panel(Text.from_markup(head + "\n\nwaiting for stages: no metrics.jsonl in this folder yet"),
                     title="nanoseek watch")
    t = Table(expand=False, show_lines=False)
    for col in ("stage", "status", "step", "loss", "trend", "val loss", "val bpb", "tok/s", "MFU", "MaxVio",
                "reward", "acc", "format", "len", "spikes", "updated"):
        t.add_column(col, justify="left" if col in ("stage", "status", "trend") else "right", no_wrap=True)
    for s in tails:
        status = s.status(now)
        style = {"running": "bold green", "done": "cyan", "idle": "yellow", "failed": "bold red"}.get(status)
        mv = s.last.get("maxvio")
        mv_max = max((x for x in mv if isinstance(x, (int, float))), default=None) if isinstance(mv, list) else None
        spikes = s.counts.get("spike_skipped", 0) + s.counts.get("rollback", 0)
        t.add_row(s.stage.name, Text(status, style=style), _f(s.value("step"), "{:.0f}"), _f(s.value("loss"), "{:.4f}"),
                  sparkline(s.curves.get("loss", ())), _f(s.val.get("val_loss"), "{:.4f}"),
                  _f(s.val.get("val_bpb"), "{:.4f}"), fmt_count(s.value("tokens_per_s")) if s.value("tokens_per_s")
                  is not None else "-", _f(None if s.value("mfu") is None else 100 * s.value("mfu"), "{:.1f}%"),
                  _f(mv_max, "{:.3f}"), _f(s.value("reward_mean"), "{:.3f}"), _f(s.value("accuracy"), "{:.0%}"),
                  _f(s.value("format_rate"), "{:.0%}"), _f(s.value("response_len_mean"), "{:.0f}"),
                  str(spikes) if spikes else "-",
                  fmt_duration(now - s.mtime) + " ago" if s.mtime is not None else "-")
    parts = [Text.from_markup(head), t]
    active = next((s for s in reversed(tails) if s.status(now) == "running"), None) or \
        next((s for s in reversed(tails) if s.last), None)
    if active is not None and active.last:
        parts.append(_detail(active))
    for s in tails:
        for p in s.problems:
            parts.append(Text(f"note: {p}", style="yellow"))
    return Panel(Group(*parts), title="nanoseek watch")


def _detail(s: StageTail):
    from rich.panel import Panel
    from rich.table import Table

    r = s.last
    lines = Table.grid(padding=(0, 2))
    lines.add_column(justify="right", style="bold")
    lines.add_column()
    lines.add_row("loss", f"{_f(s.value('loss'), '{:.4f}')}  {sparkline(s.curves.get('loss', ()), 60)}")
    if s.value("ce") is not None:
        lines.add_row("next-token CE", f"{_f(s.value('ce'), '{:.4f}')}  {sparkline(s.curves.get('ce', ()), 60)}")
    lines.add_row("lr / grad norm", f"{_f(s.value('lr'), '{:.3g}')} / {_f(s.value('grad_norm'), '{:.3f}')}  "
                                    f"{sparkline(s.curves.get('grad_norm', ()), 40)}")
    if s.value("tokens_seen") is not None:
        from .runs import fmt_count, fmt_duration

        lines.add_row("tokens / elapsed", f"{fmt_count(s.value('tokens_seen'))} / {fmt_duration(s.value('elapsed'))}")
    mv, br = r.get("maxvio"), r.get("bias_range")
    if isinstance(mv, list) and mv:
        scale = max([x for x in mv if isinstance(x, (int, float))] + [1e-9])
        for i, x in enumerate(mv):
            b = br[i] if isinstance(br, list) and i < len(br) and isinstance(br[i], (int, float)) else None
            lines.add_row(f"MoE layer {i}", f"MaxVio {bar(float(x), scale)} {_f(float(x), '{:.3f}')}"
                                            + (f"   bias range {_f(float(b), '{:.4f}')}" if b is not None else ""))
    for key, label in (("reward_mean", "reward"), ("accuracy", "accuracy"), ("format_rate", "format"),
                       ("response_len_mean", "length")):
        if key in s.curves:
            lines.add_row(label, f"{_f(s.curves[key][-1], '{:.3f}')}  {sparkline(s.curves[key], 60)}")
    return Panel(lines, title=f"{s.stage.name}: step {r.get('step')}", title_align="left")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from nanoseek.errors import UserError

    from .runs import RunError, find_stages, read_run_json

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if args.interval <= 0:
        raise UserError(f"--interval must be > 0, got {args.interval}")
    tails: dict[Path, StageTail] = {}

    def frame():
        try:
            meta = read_run_json(run_dir) or {}
        except RunError:
            meta = {}                            # being rewritten by the speedrun: next frame
        try:
            stages = find_stages(run_dir, include_pending=True)
        except RunError:
            if not run_dir.is_dir():
                raise UserError(f"{run_dir}: the run folder disappeared") from None
            stages = find_stages(run_dir, use_run_json=False)     # run.json half-written: next frame
        current = []
        for st in stages:
            key = st.dir.resolve()
            if key not in tails:
                tails[key] = StageTail(st)
            tails[key].stage = st
            tails[key].poll()
            current.append(tails[key])
        return render(run_dir, current, meta)

    console = Console(width=args.width or (None if Console().is_terminal else 160))
    if args.once:
        console.print(frame())
        return 0
    try:
        with Live(frame(), console=console, refresh_per_second=max(1.0, 1.0 / args.interval), screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame())
    except KeyboardInterrupt:
        return 0
