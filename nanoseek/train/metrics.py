"""What a run reports: ``metrics.jsonl``, optional TensorBoard / W&B, MFU, and the progress bar.

``RUN/metrics.jsonl`` gets one JSON object per line, flushed at once so ``nanoseek watch`` and a
crash both see every line. Two kinds of line:

* a *step* record, ``{"step": 12, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ...,
  "mfu": ..., "maxvio": [per MoE layer], "bias_range": [per MoE layer], "expert_load": [per MoE
  layer: tokens per routed expert in the step], "mtp_loss": ...,
  "indexer_loss": ... (DeepSeek-V3.2: the indexers' KL, nanoseek/train/dsa.py)}``;
* an *event*, ``{"event": "spike_skipped" | "rollback" | "eval" | "checkpoint" | "resume" |
  "interrupted" | "done" | "start" | "dsa_stage", "step": ..., ...}`` (``dsa_stage``: a V3.2
  run's indexer stage from that step on, ``"stage": "dense" | "sparse"``).

The file is append-only: after a resume or a rollback the re-done steps are written again, so
:func:`step_records` keeps the last record of each step (the one on the surviving timeline).

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token come from
:func:`nanoseek.estimate.flops.flops_per_token` (6 x activated non-embedding parameters +
causal attention + the MTP module(s)); the peak is *measured* with square matmuls in the training dtype on the training device
(:func:`measure_matmul_peak`), so MFU on a laptop CPU is as meaningful as on a GPU. One short
measurement on a shared machine can land in a busy moment and come out far too low (MFU above
100 %), so the trainer keeps the best figure of a measurement at start-up and one after every
evaluation (``peak_flops`` in the eval events).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import open_append
from ..errors import ConfigError

METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------- peak and FLOPs
def measure_matmul_peak(device: str = "cpu", dtype: str = "float32", n: int | None = None,
                        seconds: float = 0.25) -> float:
    """Best FLOP/s of repeated n x n matmuls (n = 1024 on CPU, 8192 on GPU) in ``dtype`` over
    ``seconds`` of wall time (not cached: callers re-measure and keep the maximum)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    dt = getattr(torch, dtype)
    g = torch.Generator(device=dev).manual_seed(0)    # never touch the global RNG (exact resume)
    a = torch.randn(n, n, generator=g, device=dev).to(dt)
    b = torch.randn(n, n, generator=g, device=dev).to(dt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    (a @ b)
    sync()                                                   # warm-up (kernel selection, page faults)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(4 if dev.type == "cuda" else 1):
            (a @ b)
        sync()
        dt_s = time.perf_counter() - t0
        best = max(best, (4 if dev.type == "cuda" else 1) * 2 * n ** 3 / dt_s)
        if time.perf_counter() > t_end:
            return best


def model_flops_per_token(model_config, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward), from ``nanoseek.estimate`` (V3 / V3.2); for
    other families (DeepSeek-V4) 6 x activated parameters (+ MTP), without the attention term."""
    from ..model.registry import V3, count_params, family_of
    if family_of(model_config) is V3:
        from ..estimate.flops import flops_per_token
        return flops_per_token(model_config, seq_len, include_mtp=include_mtp)
    n = count_params(model_config)
    return 6.0 * (n.active + (n.mtp if include_mtp else 0))


# ---------------------------------------------------------------------------- metrics.jsonl
def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)                      # "nan" / "inf": strict JSON readers cannot take NaN
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class MetricsLogger:
    """Appends records to ``RUN/metrics.jsonl``; mirrors numbers to TensorBoard / W&B if asked
    (W&B's files in RUN/wandb; a W&B that cannot start is one ConfigError line)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, wandb_project: str = "",
                 config: dict | None = None, run_name: str | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open_append(self.path)     # a link, FIFO or device there: one line naming it
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("[train] tensorboard = true needs the tensorboard package "
                                   "(pip install tensorboard), or set it to false") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"[train] wandb_project = {wandb_project!r} needs the wandb package "
                                   "(pip install wandb), or set it to \"\"") from None
            try:  # W&B's files go in the run folder (RUN/wandb), never the working directory
                self._wandb = wandb.init(project=wandb_project, name=run_name or Path(run_dir).name,
                                         config=config or {}, resume="allow", dir=str(Path(run_dir)))
            except Exception as e:  # no API key, no network: one line, not wandb's traceback
                self.close()
                why = " ".join(str(e).split()) or type(e).__name__
                raise ConfigError(f"[train] wandb_project = {wandb_project!r}: W&B could not start ({why}); "
                                  "run `wandb login`, or set WANDB_MODE=offline to log into RUN/wandb "
                                  "and `wandb sync` it later") from None

    def log(self, record: dict[str, Any]) -> None:
        rec = _jsonable(record)
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        step = rec.get("step")
        if step is None:
            return
        prefix = f"{rec['event']}/" if "event" in rec else "train/"
        scalars = {}
        for k, v in rec.items():
            if isinstance(v, bool) or k in ("step", "event"):
                continue
            if isinstance(v, (int, float)):
                scalars[prefix + k] = v
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and len(v) <= 64:
                for i, x in enumerate(v):
                    scalars[f"{prefix}{k}/layer{i}"] = x
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": name, **fields}
        self.log(rec)
        return rec

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl (a run dir or the file), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i}: not a metrics record (invalid JSON: {e}); nanoseek appends "
                                      "only JSON lines there: remove the line or choose another run folder") from None
    return out


def step_records(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Step -> the last step record written for it (the surviving timeline after resume/rollback)."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if "event" not in r and "step" in r:
            out[r["step"]] = r
    return dict(sorted(out.items()))


def events(records: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if "event" in r and (name is None or r["event"] == name)]


# ---------------------------------------------------------------------------- terminal
def progress_enabled() -> bool:
    """A live bar only on a terminal, and not with NANOSEEK_NO_PROGRESS=1."""
    return sys.stderr.isatty() and os.environ.get("NANOSEEK_NO_PROGRESS", "") not in ("1", "true", "yes")


class ProgressDisplay:
    """A rich progress bar (step, loss, tokens/s, ETA) on a TTY; plain lines every ``log_every`` otherwise.

    ``progress`` is the run's fraction done in [0, 1] (steps, tokens or minutes), so the ETA
    works for every stopping rule.
    """

    RESOLUTION = 10_000

    def __init__(self, total_desc: str, log_every: int = 1, enabled: bool | None = None, quiet: bool = False):
        self.log_every, self.quiet = log_every, quiet
        self.enabled = progress_enabled() if enabled is None else enabled
        self._bar = self._task = None
        self._desc = total_desc
        self._t0 = time.perf_counter()

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled and not self.quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self._desc, total=self.RESOLUTION, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, progress: float, loss: float, tokens_per_s: float | None, extra: str = "") -> None:
        tps = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
        info = f"step {step}  loss {loss:.4f}  {tps}{('  ' + extra) if extra else ''}"
        if self._bar is not None:
            self._bar.update(self._task, completed=int(min(progress, 1.0) * self.RESOLUTION), info=info)
        elif not self.quiet and step % self.log_every == 0:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed * (1 - progress) / progress if progress > 0 else float("nan")
            print(f"{info}  {100 * progress:5.1f}%  eta {_fmt_s(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


__all__ = ["MetricsLogger", "read_metrics", "step_records", "events", "measure_matmul_peak",
           "model_flops_per_token", "ProgressDisplay", "progress_enabled", "METRICS_FILE"]
