"""Expert loads for EPLB (:mod:`nanoseek.train.eplb`): measured by a nanoseek run, or synthetic.

*Measured*: the step records of a run's ``metrics.jsonl`` carry ``expert_load`` (tokens per
routed expert, one list per MoE layer, summed over ranks, and on a large model summed over the
``expert_load_steps`` steps up to that record: ``[train] expert_load_every``; written by
:class:`~nanoseek.train.loop.ExpertBalanceHook`). :func:`read_loads` sums the records of a window
of steps (by default the second half of the logged steps: the router has settled by then) into
one [layers, experts] table (keeping each step's own table for a held-out evaluation,
:meth:`Loads.split`); the expert groups (``n_group``) come from the run's config.toml.
A loads file (``{"expert_load": [[...], ...], "n_group": G, "label": ...}``, what
:func:`save_loads` writes) is read the same way, so loads from elsewhere (a serving log) fit in.

*Synthetic* (always labelled so): a tiny run has 8-16 experts, too few for a 64- or 256-GPU
layout, so :func:`lognormal_loads` draws DeepSeek-V3-sized loads (256 experts x 58 MoE layers)
whose per-layer spread (coefficient of variation, std / mean) is the measured one: synthetic
layer i takes the CV of measured layer i mod L and draws log-normal loads with that CV
(sigma^2 = ln(1 + CV^2)), seeded. :func:`zipf_loads` is the textbook skew instead: the r-th
most popular expert gets a load proportional to 1 / r^s, experts shuffled per layer. Neither
keeps any correlation between experts of one group; the measured tables do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

LOADS_KEY = "expert_load"
V3_EXPERTS, V3_MOE_LAYERS, V3_GROUPS = 256, 58, 8       # DeepSeek-V3: 61 layers, the first 3 dense


@dataclass
class Loads:
    weight: torch.Tensor        # [layers, experts] float64, tokens per expert
    groups: int | None          # the model's expert groups (n_group), when known
    label: str                  # where the loads come from, said in the report
    synthetic: bool = False
    steps: list[int] | None = None          # measured from a run: the logged steps summed
    per_step: torch.Tensor | None = None    # and their own loads [steps, layers, experts]

    def split(self) -> tuple["Loads", torch.Tensor]:
        """Held-out evaluation of a run's loads: (the first half of the logged steps, summed, to
        place the experts from; the later steps' own loads [steps, layers, experts] to measure on)."""
        if self.per_step is None or len(self.steps) < 2:
            raise ConfigError(f"--held-out needs at least 2 logged steps of a run ({self.label})")
        h = len(self.steps) // 2
        fit = self.per_step[:h].sum(0)
        label = (f"{self.label}; placed from steps {self.steps[0]}-{self.steps[h - 1]}, imbalance of each "
                 f"later step {self.steps[h]}-{self.steps[-1]} on its own")
        return Loads(fit, self.groups, label, steps=self.steps[:h], per_step=self.per_step[:h]), self.per_step[h:]


def _table(rows, where: str) -> torch.Tensor:
    """A [layers, experts] table of non-negative finite numbers from JSON lists, or one line naming ``where``."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ConfigError(f"{where}: {LOADS_KEY} must be a non-empty list of per-layer lists of token counts")
    if len({len(r) for r in rows}) != 1:
        raise ConfigError(f"{where}: {LOADS_KEY} layers have different numbers of experts "
                          f"({sorted({len(r) for r in rows})})")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in rows for x in r):
        raise ConfigError(f"{where}: {LOADS_KEY} must hold numbers only")
    t = torch.tensor(rows, dtype=torch.float64)
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ConfigError(f"{where}: {LOADS_KEY} must be finite and non-negative")
    return t


def _fit_float64(per_step: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``per_step`` [steps, layers, experts] divided by 2^k (exact) when its sums could overflow
    float64 (huge but finite counts), with k (0: unscaled). Every figure EPLB reports is a ratio of
    loads, so a common scale changes none of them."""
    peak = float(per_step.max()) if per_step.numel() else 0.0
    if peak == 0.0 or peak * per_step.shape[0] * per_step.shape[-1] < 1e300:
        return per_step, 0
    k = math.frexp(peak)[1]                           # peak / 2^k in [0.5, 1)
    return torch.ldexp(per_step, torch.tensor(-k, dtype=torch.float64)), k


def _scaled(k: int) -> str:
    return f"; counts divided by 2^{k} to fit float64" if k else ""


def _tokens(weight: torch.Tensor, k: int) -> str:
    """Routed token-slots per layer for the label: exact for ordinary counts."""
    return f"{float(weight[0].sum()):.3g} x 2^{k}" if k else f"{int(weight[0].sum()):,}"


def _run_groups(run_dir: Path) -> int | None:
    """The run's ``n_group`` from its config.toml (None when the folder has none)."""
    cfg = run_dir / "config.toml"
    if not cfg.is_file():
        return None
    from .config import load_config
    return int(getattr(load_config(cfg).model.build_config(), "n_group", 1) or 1)


def read_loads(source: str | Path, from_step: int | None = None, whole_run: bool = False) -> Loads:
    """Loads from a run folder, its metrics.jsonl, or a loads JSON file (see the module docstring).
    ``from_step``: sum the step records from this step on (default: the second half of them, or
    all of them with ``whole_run``); a loads file has no steps, so ``from_step`` is refused there."""
    from .metrics import METRICS_FILE, read_metrics, step_records
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: no such run folder or loads file")
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a loads file (invalid JSON: {e})") from None
        if not isinstance(data, dict) or LOADS_KEY not in data:
            raise ConfigError(f"{path}: a loads file is a JSON object with an {LOADS_KEY!r} key "
                              "(a list of per-layer token counts)")
        groups = data.get("n_group")
        if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool) or groups < 1):
            raise ConfigError(f"{path}: n_group must be a positive integer, got {groups!r}")
        if from_step is not None:
            raise ConfigError(f"--from-step {from_step}: {path} is a loads file (one summed table, no steps); "
                              "--from-step picks steps of a run folder or its metrics.jsonl")
        table, k = _fit_float64(_table(data[LOADS_KEY], str(path)).unsqueeze(0))
        return Loads(table[0], groups, str(data.get("label") or f"measured: {path}") + _scaled(k))
    metrics = path / METRICS_FILE if path.is_dir() else path
    if not metrics.is_file():
        raise ConfigError(f"{path}: no {METRICS_FILE} here (give a run folder, its {METRICS_FILE}, or a loads .json)")
    steps = {s: r for s, r in step_records(read_metrics(metrics)).items() if LOADS_KEY in r and not r.get("skipped")}
    if not steps:
        raise ConfigError(f"{metrics}: no step record has {LOADS_KEY} (a run of a model without routed experts, "
                          "or one written before nanoseek logged expert loads)")
    logged = sorted(steps)
    start = (logged[0] if whole_run else logged[len(logged) // 2]) if from_step is None else from_step
    window = [s for s in logged if s >= start]
    if not window:
        raise ConfigError(f"--from-step {from_step}: the run's expert loads end at step {logged[-1]}")
    tables = [_table(steps[s][LOADS_KEY], f"{metrics} step {s}") for s in window]
    if len({t.shape for t in tables}) != 1:
        raise ConfigError(f"{metrics}: {LOADS_KEY} changes shape between steps {window[0]} and {window[-1]}")
    per_step, k = _fit_float64(torch.stack(tables))
    weight = per_step.sum(0)
    run_dir = metrics.parent
    label = (f"measured: {run_dir}, steps {window[0]}-{window[-1]} ({len(window)} logged steps, "
             f"{_tokens(weight, k)} routed token-slots per layer{_scaled(k)})")
    return Loads(weight, _run_groups(run_dir), label, steps=window, per_step=per_step)


def save_loads(loads: Loads, path: str | Path) -> Path:
    """Write ``loads`` as a loads file :func:`read_loads` reads back."""
    from ..atomic import write_atomic
    path = Path(path)
    rows = [[int(x) if float(x).is_integer() else float(x) for x in r] for r in loads.weight.tolist()]
    write_atomic(path, json.dumps({"label": loads.label, "n_group": loads.groups, LOADS_KEY: rows}) + "\n")
    return path


def coefficient_of_variation(weight: torch.Tensor) -> torch.Tensor:
    """std / mean of each layer's loads."""
    mean = weight.mean(-1)
    return weight.std(-1, unbiased=False) / mean.clamp_min(1e-300)


def lognormal_loads(shape_of: Loads, experts: int = V3_EXPERTS, layers: int = V3_MOE_LAYERS,
                    groups: int = V3_GROUPS, seed: int = 0) -> Loads:
    """Synthetic log-normal loads [layers, experts] with the measured per-layer CV (module docstring)."""
    cv = coefficient_of_variation(shape_of.weight)
    g = torch.Generator().manual_seed(seed)
    sigma = torch.sqrt(torch.log1p(cv ** 2))[torch.arange(layers) % cv.numel()]          # [layers]
    z = torch.randn(layers, experts, generator=g, dtype=torch.float64)
    w = torch.exp(sigma.unsqueeze(1) * z)
    w = w / w.mean(-1, keepdim=True) * 1e6 / experts * 8                                 # ~1M tokens x top-8
    cvs = ", ".join(f"{x:.3f}" for x in cv.tolist())
    return Loads(w, groups, f"synthetic: {experts} experts x {layers} layers, log-normal with the measured "
                             f"per-layer CV ({cvs}) of [{shape_of.label}], seed {seed}", synthetic=True)


def zipf_loads(exponent: float, experts: int = V3_EXPERTS, layers: int = V3_MOE_LAYERS,
               groups: int = V3_GROUPS, seed: int = 0) -> Loads:
    """Synthetic Zipf loads: the r-th most popular expert of a layer gets 1 / r^exponent (shuffled)."""
    if not (isinstance(exponent, (int, float)) and math.isfinite(exponent) and exponent >= 0):
        raise ConfigError(f"--zipf-exponent must be a finite number >= 0, got {exponent!r}")
    g = torch.Generator().manual_seed(seed)
    base = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    w = torch.stack([base[torch.randperm(experts, generator=g)] for _ in range(layers)])
    w = w / w.mean(-1, keepdim=True) * 1e6 / experts * 8
    return Loads(w, groups, f"synthetic: {experts} experts x {layers} layers, Zipf exponent {exponent:g}, "
                            f"seed {seed}", synthetic=True)


__all__ = ["Loads", "LOADS_KEY", "read_loads", "save_loads", "lognormal_loads", "zipf_loads",
           "coefficient_of_variation", "V3_EXPERTS", "V3_MOE_LAYERS", "V3_GROUPS"]
