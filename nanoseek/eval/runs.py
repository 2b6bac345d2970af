"""A run folder as the report, the dashboard and the eval commands read it.

Layout (every piece optional; readers skip what is missing)::

    RUN/
      run.json              the speedrun's summary (below); absent for a single training run
      pretrain/             one folder per stage, in recipe order
        metrics.jsonl       the trainer's log: step records and {"event": ...} lines
        samples.jsonl       GRPO sample completions (prompt, completion, reward, correct)
        eval.json           `nanoseek eval` of the stage's final checkpoint
        external.json       the speedrun's held-out evaluation on tasks nanoseek did not write (reasoning-gym)
        config.toml         the stage's training config
        final/              HF checkpoint (config.json, model.safetensors, tokenizer files)
      sft/ ...  grpo/ ...

A single training run (``nanoseek pretrain --out RUN``) has ``metrics.jsonl``, ``eval.json``
and ``final/`` directly in ``RUN``: it is read as one stage named after the folder.

``run.json`` (written by the speedrun, read tolerantly)::

    {"name": "speedrun", "status": "running" | "done" | "failed", "started": "2025-..Z",
     "finished": "...", "wall_s": 1234.5, "device": "cpu", "config": {... any ...},
     "stages": [{"name": "pretrain", "dir": "pretrain", "status": "done", "wall_s": 812.0,
                 "tokens": 5000000, "steps": 600, "eval_mode": "fewshot"}, ...]}

``stages`` may also be a mapping name -> entry; ``dir`` defaults to the name. Without
``run.json`` the stages are the sub-folders holding a ``metrics.jsonl``, an ``eval.json``, a
``stage.json`` or a checkpoint: in recipe order (:data:`STAGE_ORDER`) when every name is a known
stage name, else by start time (the oldest of ``config.toml`` / ``metrics.jsonl``), since a
post-training recipe names its stages freely (``cold_start``, ``final_rl``).

The prompt mode a stage's model is evaluated in (:func:`eval_mode_of`): run.json's
``eval_mode``; else the ``eval_mode`` its ``stage.json`` records (every post-training stage
writes the template its model answers in, from its section: ``nanoseek.post.stage``). Folders
written before stage.json recorded it fall back to fixed rules on what their files say
(:func:`_legacy_eval_mode`): ``stage.json`` ``kind`` or the tables of ``config.toml``: ``sft`` /
``dpo`` / ``distill`` -> ``chat``, ``grpo`` -> its ``[grpo] template`` (``r1-zero``, ``chat`` or
``chat-think``), a pre-training config (a ``[data]`` table, no stage kind) -> ``fewshot``; else
the folder name (``pretrain`` -> fewshot, ``sft``/``grpo``/... -> chat); else unknown.

``metrics.jsonl`` is read tolerantly (:func:`read_jsonl`): a live run may have a half-written
last line, which is left for the next read; other bad lines are counted and reported, never
fatal. Non-finite numbers written as the strings ``"nan"`` / ``"inf"`` become floats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Folder NAMES, not the registry's kinds: the order of a run's folders without run.json, and the
# last-resort mode of a folder whose files say nothing (mode_for_name).
STAGE_ORDER = ("pretrain", "midtrain", "sft", "dpo", "grpo", "distill")
BASE_STAGES = ("pretrain", "midtrain", "base")
CHAT_STAGES = ("sft", "dpo", "grpo", "distill", "rl", "chat")
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EVAL_JSON = "eval.json"
EXTERNAL_JSON = "external.json"
TOOLS_JSON = "tools.json"           # a stage's evaluation with tools (nanoseek eval --tools)
PHRASING_JSON = "phrasing.json"     # held-out problems in other wordings (the speedrun's [eval] phrasing_problems)
SAMPLES = "samples.jsonl"
STAGE_JSON = "stage.json"
CONFIG_TOML = "config.toml"
NOT_STAGES = {"checkpoints", "final", "tokenizer", "tensorboard", "report_files", "model", "hf", "wandb"}


class RunError(ValueError):
    """A run folder (or a file in it) that cannot be read; the message names the path."""


# ---------------------------------------------------------------------- files

def numeric(v: Any) -> float | None:
    """A number from a metrics value: int/float, or "nan"/"inf" strings; None otherwise."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v)
    return None


def read_jsonl(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int, list[str]]:
    """(records, offset after the last complete line, problems) of a JSONL file from ``offset``.

    An unterminated last line is not consumed (a writer may be in the middle of it); a line that
    is not a JSON object is skipped and named in ``problems`` with its line start offset.
    """
    path = Path(path)
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    records, problems = [], []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl].strip()
        if line:
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(rec)
            except ValueError as e:
                problems.append(f"{path} (byte {offset + pos}): skipped a bad line ({e})")
        pos = nl + 1
    return records, offset + pos, problems


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise RunError(f"{path}: expected a JSON object")
    return d


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records (no ``event``), the last one per step (a resumed run re-writes steps), by step."""
    last: dict[int, dict[str, Any]] = {}
    for r in records:
        if "event" not in r and isinstance(r.get("step"), int):
            last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def events(records: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if "event" in r and (name is None or r["event"] == name)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a scalar key over records that have it (non-numbers skipped)."""
    xs, ys = [], []
    for r in records:
        v = numeric(r.get(key))
        if v is not None and isinstance(r.get("step"), int):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def vector_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    """(steps, per-layer lists) of a list-valued key (``maxvio``, ``bias_range``); ragged rows dropped."""
    xs, rows = [], []
    width = None
    for r in records:
        v = r.get(key)
        if isinstance(v, list) and v and isinstance(r.get("step"), int):
            vals = [numeric(x) for x in v]
            if any(x is None for x in vals):
                continue
            width = width or len(vals)
            if len(vals) == width:
                xs.append(r["step"])
                rows.append([float(x) for x in vals])
    return xs, rows


def validation_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """A validation metric from ``eval`` events and from step records that carry it."""
    pts = {}
    for r in records:
        if (r.get("event") in (None, "eval")) and isinstance(r.get("step"), int):
            v = numeric(r.get(key))
            if v is not None:
                pts[r["step"]] = v
    return sorted(pts), [pts[s] for s in sorted(pts)]


# ---------------------------------------------------------------------- stages

@dataclass
class Stage:
    name: str
    dir: Path
    info: dict[str, Any] = field(default_factory=dict)   # the stage's run.json entry

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS

    @property
    def eval_path(self) -> Path:
        return self.dir / EVAL_JSON

    @property
    def external_path(self) -> Path:
        return self.dir / EXTERNAL_JSON

    @property
    def tools_path(self) -> Path:
        return self.dir / TOOLS_JSON

    @property
    def phrasing_path(self) -> Path:
        return self.dir / PHRASING_JSON

    @property
    def samples_path(self) -> Path:
        return self.dir / SAMPLES

    def checkpoint(self) -> Path | None:
        """The stage's HF checkpoint directory, as :func:`nanoseek.train.checkpoint.resolve_checkpoint`
        finds it (``final/`` when the stage finished, else ``latest``, ...), or None."""
        if not self.dir.is_dir():
            return None
        from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

        try:
            return resolve_checkpoint(self.dir)
        except LoadError:
            return None

    def read_metrics(self) -> tuple[list[dict[str, Any]], list[str]]:
        if not self.metrics_path.is_file():
            return [], []
        records, _, problems = read_jsonl(self.metrics_path)
        return records, problems

    @property
    def eval_mode(self) -> str | None:
        """The prompt mode the stage's model is evaluated in (see the module docstring)."""
        if self.info.get("eval_mode"):
            return str(self.info["eval_mode"])
        return eval_mode_of(self.dir) or mode_for_name(self.name)

    def stage_json(self) -> dict[str, Any]:
        """The post-training stage's ``stage.json`` (kind, status, steps), {} when absent or unreadable."""
        p = self.dir / STAGE_JSON
        try:
            return read_json(p) if p.is_file() else {}
        except RunError:
            return {}


def mode_for_name(name: str) -> str | None:
    """The prompt mode a stage folder's name implies (fallback for folders whose files say nothing)."""
    low = name.lower()
    if low in BASE_STAGES:
        return "fewshot"
    if low in CHAT_STAGES:
        return "chat"
    return None


def eval_mode_of(stage_dir: str | Path) -> str | None:
    """The prompt mode a stage folder's files give: the ``eval_mode`` its ``stage.json`` records,
    else (a folder written before stage.json recorded it) :func:`_legacy_eval_mode`; or None."""
    d = Path(stage_dir)
    record: dict[str, Any] = {}
    if (d / STAGE_JSON).is_file():
        try:
            record = read_json(d / STAGE_JSON)
        except RunError:
            record = {}
    from nanoseek.tasks.reply import EVAL_TEMPLATES

    mode = record.get("eval_mode") if isinstance(record, dict) else None
    if mode in EVAL_TEMPLATES:
        return mode
    return _legacy_eval_mode(d, record.get("kind") if isinstance(record, dict) else None)


def _legacy_eval_mode(d: Path, kind: Any) -> str | None:
    """FALLBACK for stage folders written before stage.json recorded ``eval_mode``: the mode implied
    by the stage kind (``kind``, from stage.json) or the tables of ``config.toml``. New folders
    never get here; keep these rules only so existing runs evaluate and report as they always did."""
    import tomllib

    cfg: dict[str, Any] = {}
    if (d / CONFIG_TOML).is_file():
        try:
            cfg = tomllib.loads((d / CONFIG_TOML).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            cfg = {}
    if kind == "grpo" or (kind is None and isinstance(cfg.get("grpo"), dict)):
        from nanoseek.tasks.reply import DEFAULT_TEMPLATE, TEMPLATES

        template = (cfg.get("grpo") or {}).get("template") or DEFAULT_TEMPLATE
        return template if template in TEMPLATES else "chat"
    if kind in ("sft", "dpo", "distill") or (kind is None and any(k in cfg for k in ("sft", "dpo", "distill"))):
        return "chat"
    if kind is None and isinstance(cfg.get("data"), dict):
        return "fewshot"
    return None


def read_run_json(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / RUN_JSON
    return read_json(p) if p.is_file() else None


def _is_stage_dir(d: Path) -> bool:
    return d.is_dir() and d.name not in NOT_STAGES and not d.name.startswith(".") and (
        (d / METRICS).is_file() or (d / EVAL_JSON).is_file() or (d / STAGE_JSON).is_file()
        or (d / "final" / "config.json").is_file() or (d / "checkpoints").is_dir())


def _started(d: Path) -> float:
    times = [p.stat().st_mtime for p in (d / CONFIG_TOML, d / METRICS) if p.is_file()]
    return min(times) if times else d.stat().st_mtime


def find_stages(run_dir: str | Path, include_pending: bool = False, use_run_json: bool = True) -> list[Stage]:
    """The stages of a run folder, in order (see the module docstring).

    ``include_pending``: also the stages run.json lists whose folder does not exist yet.
    ``use_run_json`` False ignores run.json (e.g. when it is unreadable) and discovers the folders.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    meta = (read_run_json(run) or {}) if use_run_json else {}
    listed = meta.get("stages")
    stages: list[Stage] = []
    if isinstance(listed, dict):
        listed = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in listed.items()]
    if isinstance(listed, list):
        for i, entry in enumerate(listed):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or not entry.get("name"):
                raise RunError(f"{run / RUN_JSON}: stages[{i}] needs a \"name\"")
            d = run / str(entry.get("dir", entry["name"]))
            if d.is_dir() or include_pending:
                stages.append(Stage(str(entry["name"]), d, entry))
        seen = {s.dir.resolve() for s in stages}
        extra = [d for d in sorted(run.iterdir()) if _is_stage_dir(d) and d.resolve() not in seen]
        stages += [Stage(d.name, d) for d in extra]
        return stages
    subs = [d for d in run.iterdir() if _is_stage_dir(d)]
    order = {n: i for i, n in enumerate(STAGE_ORDER)}
    if all(d.name in order for d in subs):
        subs.sort(key=lambda d: order[d.name])
    else:
        subs.sort(key=lambda d: (_started(d), order.get(d.name, len(order)), d.name))
    if subs:
        return [Stage(d.name, d) for d in subs]
    if (run / METRICS).is_file() or (run / EVAL_JSON).is_file() or (run / "final").is_dir() or \
            (run / "config.json").is_file() or (run / "checkpoints").is_dir():
        return [Stage(run.name, run)]
    return []


def stage_of_checkpoint(path: str | Path) -> tuple[str | None, str | None]:
    """(stage name, prompt mode) of a checkpoint, from the folders above it (``RUN/sft/final`` -> sft):
    the first one whose files or name tell the mode; (None, None) when none does."""
    p = Path(path).resolve()
    for d in [p, *list(p.parents)[:3]]:
        mode = eval_mode_of(d) or mode_for_name(d.name)
        if mode is not None:
            return d.name, mode
    return None, None


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s"


def fmt_count(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


__all__ = ["Stage", "RunError", "find_stages", "read_run_json", "read_jsonl", "read_json", "step_records", "events",
           "series", "vector_series", "validation_series", "numeric", "stage_of_checkpoint", "mode_for_name",
           "eval_mode_of", "fmt_duration", "fmt_count", "STAGE_ORDER", "RUN_JSON", "METRICS", "EVAL_JSON", "EXTERNAL_JSON", "TOOLS_JSON", "PHRASING_JSON",
           "SAMPLES"]
