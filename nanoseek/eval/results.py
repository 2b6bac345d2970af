"""What an evaluation produces: per-problem records, the metrics built from them, ``eval.json``.

An evaluation draws ``k`` samples for each of ``N`` held-out problems of each task. The unit of
everything downstream is the *problem*: :class:`ProblemResult` keeps, per sample, whether the
answer was right (``correct``, whatever the format), whether the response was well formed
(``format_ok``), the extracted answer, the response length in tokens and whether it hit the
length limit. From those:

* **pass@1** = mean over problems of the per-problem fraction correct (pass@1 averaged over the
  k samples, R1's headline metric), with the 95% interval of :func:`stats.mean_interval` (Wilson
  when every score is 0/1, e.g. k = 1);
* **pass@k** (unbiased, Chen et al. 2021) and **maj@k** (self-consistency) for k = 1, 2, 4, ...
  up to the samples drawn (and the number drawn itself), from :mod:`nanoseek.eval.sampling_metrics`;
* **strict@1**: the fraction of samples both correct and well formed (what GRPO's reward pays);
* **format rate**, mean response tokens and the truncated fraction;
* a per-level breakdown of pass@1;
* with tools (``nanoseek eval --tools``): per sample the tool calls made and the calls that failed
  (``tool_calls``, ``tool_failed``), summed up as ``tools`` (calls per sample, the share of samples
  that called a tool, the share of calls that failed; :func:`tool_summary`).

"Overall" pools the problems of all tasks (each problem counts once). Two evaluations of the
same problems (same task, seed and level choice give the same problem ids) are compared with
:func:`paired_comparison`: the paired 95% interval of the per-problem pass@1 differences
(:func:`stats.paired_difference`), far tighter than two independent intervals.

``eval.json`` (:meth:`EvalResult.save`) holds ``format``/``version``, the evaluation ``config``,
the ``model`` it ran on, ``metrics`` (``overall`` and per ``tasks``), every problem's record,
a few ``samples`` (full responses with their reasoning), ``bpb`` when bits per byte were
measured, ``notes`` (anything the evaluation changed or skipped), the wall time and a timestamp.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nanoseek.atomic import write_atomic

from .stats import Interval, mean_interval, paired_difference

FORMAT = "nanoseek-eval"
VERSION = 1


class EvalFileError(ValueError):
    """An ``eval.json`` that cannot be read (the message names the file and the field)."""


def k_values(k: int) -> list[int]:
    """The sample counts pass@k / maj@k are reported at: 1, 2, 4, ... <= k, and k itself."""
    ks = [2 ** i for i in range(k.bit_length()) if 2 ** i <= k]
    return ks if ks[-1] == k else ks + [k]


@dataclass
class ProblemResult:
    """One problem and its k samples (lists are per sample, in sample order)."""

    task: str
    id: str
    level: int
    gold: str
    correct: list[bool]
    format_ok: list[bool]
    answers: list[str | None]
    tokens: list[int]
    truncated: list[bool]
    pass_at: dict[int, float] = field(default_factory=dict)   # k -> unbiased pass@k
    maj_at: dict[int, float] = field(default_factory=dict)    # k -> expected maj@k
    tool_calls: list[int] = field(default_factory=list)       # per sample: tool calls made (empty: no tools)
    tool_failed: list[int] = field(default_factory=list)      # per sample: calls that failed (ToolResult.ok False)

    @property
    def k(self) -> int:
        return len(self.correct)

    @property
    def score(self) -> float:
        """pass@1 averaged over the samples: the fraction of samples that are right."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    def compute_curves(self, seed: int = 0, trials: int = 200) -> "ProblemResult":
        """Fill ``pass_at`` and ``maj_at`` for every k of :func:`k_values` (:mod:`.sampling_metrics`)."""
        from .sampling_metrics import SampleRecord, maj_at_k, pass_at_k

        n, c = self.k, sum(self.correct)
        records = [SampleRecord(a, bool(ok)) for a, ok in zip(self.answers, self.correct)]
        self.pass_at = {kk: pass_at_k(n, c, kk) for kk in k_values(n)}
        self.maj_at = {kk: maj_at_k(records, kk, trials, seed) for kk in k_values(n)}
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["correct"] = [int(x) for x in self.correct]
        d["format_ok"] = [int(x) for x in self.format_ok]
        d["truncated"] = [int(x) for x in self.truncated]
        d["pass_at"] = {str(k): v for k, v in self.pass_at.items()}
        d["maj_at"] = {str(k): v for k, v in self.maj_at.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "problem") -> "ProblemResult":
        need = ("task", "id", "level", "gold", "correct", "format_ok", "answers", "tokens", "truncated")
        missing = [k for k in need if k not in d]
        if missing:
            raise EvalFileError(f"{where}: missing field(s) {missing}")
        n = len(d["correct"])
        for k in ("format_ok", "answers", "tokens", "truncated"):
            if len(d[k]) != n:
                raise EvalFileError(f"{where}: {k!r} has {len(d[k])} entries but 'correct' has {n}")
        for k in ("tool_calls", "tool_failed"):
            if d.get(k) and len(d[k]) != n:
                raise EvalFileError(f"{where}: {k!r} has {len(d[k])} entries but 'correct' has {n}")
        return cls(task=str(d["task"]), id=str(d["id"]), level=int(d["level"]), gold=str(d["gold"]),
                   correct=[bool(x) for x in d["correct"]], format_ok=[bool(x) for x in d["format_ok"]],
                   answers=list(d["answers"]), tokens=[int(x) for x in d["tokens"]],
                   truncated=[bool(x) for x in d["truncated"]],
                   pass_at={int(k): float(v) for k, v in d.get("pass_at", {}).items()},
                   maj_at={int(k): float(v) for k, v in d.get("maj_at", {}).items()},
                   tool_calls=[int(x) for x in d.get("tool_calls") or []],
                   tool_failed=[int(x) for x in d.get("tool_failed") or []])


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(problems: Sequence[ProblemResult]) -> dict[str, Any]:
    """The metrics of a group of problems (one task, or all); see the module docstring.

    The problems must all have the same number of samples (one evaluation draws k for each).
    """
    if not problems:
        return {"n": 0}
    ks = {p.k for p in problems}
    if len(ks) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ks)}; summarize one evaluation at a time")
    k = ks.pop()
    samples = [(c, f) for p in problems for c, f in zip(p.correct, p.format_ok)]
    levels: dict[int, list[ProblemResult]] = {}
    for p in problems:
        levels.setdefault(p.level, []).append(p)
    return {**tool_summary(problems),
        "n": len(problems),
        "samples": k,
        "pass@1": mean_interval([p.score for p in problems], samples=k).to_dict(),
        "strict@1": mean_interval([sum(c and f for c, f in zip(p.correct, p.format_ok)) / k
                                   for p in problems], samples=k).to_dict(),
        "format_rate": mean_interval([sum(p.format_ok) / k for p in problems], samples=k).to_dict(),
        "pass@k": {str(kk): _mean([p.pass_at[kk] for p in problems]) for kk in k_values(k)},
        "maj@k": {str(kk): _mean([p.maj_at[kk] for p in problems]) for kk in k_values(k)},
        "mean_response_tokens": _mean([t for p in problems for t in p.tokens]),
        "truncated_rate": _mean([float(t) for p in problems for t in p.truncated]),
        "answered_rate": _mean([float(a is not None) for p in problems for a in p.answers]),
        "correct_samples": sum(c for c, _ in samples),
        "levels": {str(lv): {"n": len(ps), "pass@1": mean_interval([p.score for p in ps], samples=k).to_dict()}
                   for lv, ps in sorted(levels.items())},
    }


def tool_summary(problems: Sequence[ProblemResult]) -> dict[str, Any]:
    """Tool use of the problems that were evaluated with tools (none: {}): their count, tool calls
    per sample, the share of samples that called a tool, the share of calls that failed."""
    with_tools = [p for p in problems if p.tool_calls]
    if not with_tools:
        return {}
    calls = [c for p in with_tools for c in p.tool_calls]
    failed = sum(f for p in with_tools for f in p.tool_failed)
    return {"tools": {"n": len(with_tools), "calls_per_sample": _mean(calls),
                      "use_rate": _mean([float(c > 0) for c in calls]), "calls": sum(calls), "failed": failed,
                      "failed_rate": failed / sum(calls) if sum(calls) else 0.0}}


def interval(d: dict[str, Any] | None) -> Interval | None:
    """An :class:`Interval` back from its dict form (None stays None)."""
    if not d:
        return None
    return Interval(float(d["mean"]), float(d["low"]), float(d["high"]), int(d["n"]))


@dataclass
class EvalResult:
    config: dict[str, Any]
    metrics: dict[str, Any]                 # {"overall": summary, "tasks": {name: summary}}
    problems: list[ProblemResult]
    samples: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    bpb: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)   # generated tokens, tokens/s, engine context
    created: str = ""
    source: str = ""                        # the file it was loaded from (not saved)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: dict[str, Any], problems: list[ProblemResult], **kw: Any) -> "EvalResult":
        """Metrics from the problem records (each must already have its curves computed)."""
        tasks: dict[str, list[ProblemResult]] = {}
        for p in problems:
            tasks.setdefault(p.task, []).append(p)
        metrics = {"overall": summarize(problems), "tasks": {t: summarize(ps) for t, ps in tasks.items()}}
        return cls(config=config, metrics=metrics, problems=problems, **kw)

    # ------------------------------------------------------------------ queries
    @property
    def task_names(self) -> list[str]:
        return list(self.metrics.get("tasks", {}))

    def summary(self, task: str | None = None) -> dict[str, Any]:
        """The metrics of one task, or ``overall`` for None."""
        if task is None:
            return self.metrics.get("overall", {})
        try:
            return self.metrics["tasks"][task]
        except KeyError:
            raise KeyError(f"{self.source or 'eval result'}: no task {task!r} (have {self.task_names})") from None

    def scores(self, task: str | None = None) -> dict[str, float]:
        """Problem id -> pass@1 score, for one task or all (the input of paired comparisons)."""
        return {f"{p.task}/{p.id}": p.score for p in self.problems if task is None or p.task == task}

    def pass1(self, task: str | None = None) -> Interval | None:
        return interval(self.summary(task).get("pass@1"))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "wall_s": self.wall_s,
                "stats": self.stats, "config": self.config, "model": self.model, "metrics": self.metrics,
                "bpb": self.bpb, "notes": self.notes, "samples": self.samples,
                "problems": [p.to_dict() for p in self.problems]}

    def save(self, path: str | Path) -> Path:
        """Write ``eval.json`` atomically (a temporary file, then one rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(_finite(self.to_dict()), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "eval result") -> "EvalResult":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EvalFileError(f"{source}: not a nanoseek eval result (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise EvalFileError(f"{source}: eval format version {d.get('version')!r}, this nanoseek reads {VERSION}")
        for key in ("config", "metrics", "problems"):
            if key not in d:
                raise EvalFileError(f"{source}: missing top-level field {key!r}")
        problems = [ProblemResult.from_dict(p, f"{source}: problems[{i}]") for i, p in enumerate(d["problems"])]
        return cls(config=d["config"], metrics=_unfinite(d["metrics"]), problems=problems,
                   samples=d.get("samples", []), model=d.get("model", {}), bpb=_unfinite(d.get("bpb")),
                   notes=d.get("notes", []), wall_s=float(d.get("wall_s", 0.0)),
                   stats=_unfinite(d.get("stats", {})), created=d.get("created", ""),
                   source=source)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvalFileError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(d, str(path))


def _finite(x: Any) -> Any:
    """NaN / inf as strings: strict JSON readers refuse the bare tokens."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _unfinite(x: Any) -> Any:
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unfinite(v) for v in x]
    return x


# ---------------------------------------------------------------------- comparisons

@dataclass
class Comparison:
    """One task (or ``overall``) of evaluation A against evaluation B."""

    task: str
    a: Interval | None                      # A's pass@1 over all its problems of the task
    b: Interval | None
    diff: Interval | None                   # paired mean(b - a) over the shared problems; None if none shared
    n_shared: int
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.diff is None:
            return "not paired"
        if self.diff.low > 0:
            return "B better"
        if self.diff.high < 0:
            return "A better"
        return "not significant"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "a": self.a and self.a.to_dict(), "b": self.b and self.b.to_dict(),
                "diff": self.diff and self.diff.to_dict(), "n_shared": self.n_shared, "note": self.note,
                "verdict": self.verdict}


def paired_comparison(a: EvalResult, b: EvalResult) -> list[Comparison]:
    """Per task of either result, then ``overall``: both pass@1 intervals and the paired difference
    on the problems both evaluated (matched by task and problem id)."""
    out = []
    tasks = list(dict.fromkeys(a.task_names + b.task_names))
    for task in tasks + [None]:
        sa, sb = a.scores(task), b.scores(task)
        shared = [pid for pid in sa if pid in sb]
        name = task or "overall"
        ia = a.pass1(task) if task is None or task in a.task_names else None
        ib = b.pass1(task) if task is None or task in b.task_names else None
        if not shared:
            why = "only in B" if ia is None else "only in A" if ib is None else "no shared problem ids"
            out.append(Comparison(name, ia, ib, None, 0, why))
            continue
        diff = paired_difference([sa[p] for p in shared], [sb[p] for p in shared])
        note = ""
        if len(shared) < max(len(sa), len(sb)):
            note = f"paired on {len(shared)} shared problems (A has {len(sa)}, B {len(sb)})"
        out.append(Comparison(name, ia, ib, diff, len(shared), note))
    return out


def with_tools(plain: EvalResult, tooled: EvalResult) -> EvalResult:
    """``plain`` (an evaluation without tools) with every problem that ``tooled`` also evaluated (same
    task and id: the tool tasks, evaluated with their tools) replaced by ``tooled``'s result: the
    held-out evaluation of a tool-using model as it is used, the tool on the tasks that have it."""
    done = {(p.task, p.id): p for p in tooled.problems}
    problems = [done.get((p.task, p.id), p) for p in plain.problems]
    config = {**plain.config, **{k: tooled.config[k] for k in ("tools", "tool_tasks", "describe_tools") if k in tooled.config}}
    return EvalResult.build(config, problems, source=f"{plain.source} + {tooled.source}")


def config_differences(a: EvalResult, b: EvalResult,
                       keys: Sequence[str] = ("mode", "k", "temperature", "top_p", "max_new_tokens", "seed",
                                              "levels", "few_shot")) -> list[str]:
    """Settings that differ between two evaluations (a fair comparison keeps them equal)."""
    return [f"{k}: {a.config.get(k)!r} vs {b.config.get(k)!r}" for k in keys if a.config.get(k) != b.config.get(k)]


__all__ = ["EvalResult", "ProblemResult", "Comparison", "EvalFileError", "summarize", "tool_summary", "paired_comparison", "with_tools",
           "config_differences", "k_values", "interval", "FORMAT", "VERSION"]
