"""Typed training configs: TOML files -> dataclasses, with ``--set section.key=value`` overrides.

A training recipe is one TOML file with up to six tables::

    [model]   preset = "tiny"          # a preset name, a config.json or a checkpoint dir
              hidden_size = 128        # ...plus any HF DeepSeek-V3 config field, overriding the preset
    [data]    source = "packed", dir = "data/tiny"      (or source = "synthetic")
    [optim]   lr, min_lr, betas, weight_decay, warmup_steps, schedule, decay_fraction, grad_clip,
              optimizer ("adamw" | "muon", and the muon_* keys), micro_batch_size, grad_accum, seq_len
    [train]   max_steps | max_tokens | max_minutes, seed, dtype, eval_every, save_every, ...
              (V3.2: dsa_warmup_steps, dsa_warmup_freeze, indexer_loss_weight: the indexer's stages, ``dsa.py``)
    [spike]   the loss-spike guard's thresholds (see ``spike.py``)
    [parallel] pp, schedule, ep, fsdp, backend: how a torchrun launch splits the work (``distributed.py``)

Every key is checked: an unknown table or key is an error naming it, its table and the valid
keys; a value of the wrong type is an error naming the key, the expected and the given type.
A key that is written but would have no effect (:func:`no_effect_keys`) is an error naming it
and what to set instead, never silently ignored: ``[data] dir``, ``train_split`` and
``val_split`` with ``source = "synthetic"`` (set ``data.source = "packed"`` to read a prepared
directory), ``val_split`` with ``val_batches = 0``, and the decay keys of a schedule that does not
decay that way (``decay_fraction``/``decay_steps``/``decay_shape``/``min_lr`` under ``constant``,
the first three under ``cosine``, ``decay_fraction`` next to ``decay_steps`` under ``wsd``), and
the ``muon_*`` keys with ``optimizer = "adamw"``, and ``[parallel] schedule`` with ``pp = 1`` (no
pipeline to schedule).
The resolved config a run records leaves those keys out, so it reads back as it was.
``[model] init_from`` may name a run folder: it resolves (``nanoseek.infer.loading``) to the
run's ``final/``, else its ``latest`` checkpoint, and the config records that directory.
Integers are accepted where a float is expected, nothing else is coerced. Every number has a
checked range: floats must be finite (no ``nan``/``inf``), every ``seed`` is in 0..2**64-1 (what
torch accepts), and the per-key ranges are in :func:`check_train_config`, which also checks that
the model's weights and optimizer state, and one micro-batch's logits, fit in the memory free
on the training device before anything is allocated. ``--set`` values are
read as TOML literals (``1e-3``, ``true``, ``[0.9, 0.95]``, ``"x"``) and fall back to a bare
string (``--set data.dir=/tmp/d``); ``null``/``none`` sets an optional key to None and unsets any
other key (its default applies): the way to drop a key the recipe file writes, e.g. ``--set
optim.decay_fraction=null --set optim.schedule=cosine``. Overrides go through the same validation
as the file.

The generic part (:func:`parse_sections`, :func:`apply_overrides`, :func:`merge_tables`,
:func:`dumps_toml`) takes any mapping of table name -> dataclass, so post-training stages reuse it
with their own sections.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..limits import SEED_MAX, LimitError, check_fits
from ..errors import ConfigError
from ..estimate.pipeline import DEFAULT_SCHEDULE
from ..model.config import ModelConfig
from ..model.registry import all_field_names as all_model_fields


# ---------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """``[model]``: a preset (or config.json / checkpoint dir) plus inline HF field overrides."""
    preset: str = "tiny"              # nanoseek/configs/models/NAME.json, a config.json or a checkpoint dir
    init_from: str | None = None      # HF-format checkpoint dir whose weights start the run (else random init)
    fields: dict = field(default_factory=dict)   # any ModelConfig field, written as a key of [model]

    def build_config(self) -> ModelConfig:
        """The resolved model config (preset + inline fields) of the preset's family (its
        ``model_type``, :mod:`nanoseek.model.registry`), validated."""
        from ..model.registry import load_config, with_fields

        src = self.init_from or self.preset
        try:
            return with_fields(load_config(src), self.fields, source=f"[model] ({src})")
        except ConfigError as e:
            raise ConfigError(str(e)) from None


@dataclass
class DataSection:
    """``[data]``: where the token stream comes from."""
    source: str = "packed"            # "packed": shards from `nanoseek data prepare`; "synthetic": generated
    dir: str = "data"                 # the prepared data directory (packed)
    train_split: str = "train"
    val_split: str = "val"
    val_batches: int = 8              # micro-batches per validation (0: no validation)


# The optimizers ``[optim] optimizer`` names; ``nanoseek.train.optim.OPTIMIZERS`` builds each.
OPTIMIZERS = ("adamw", "muon")
# How Muon scales its orthogonalised update of an A x B matrix (torch.optim.Muon's ``adjust_lr_fn``).
MUON_ADJUST_LR = ("match_rms_adamw", "original")


@dataclass
class OptimSection:
    """``[optim]``: the optimizer (AdamW, or Muon for the hidden matrices), the learning-rate schedule
    and the batch shape."""
    lr: float = 3e-4                  # peak learning rate (DeepSeek-V3: 2.2e-4)
    min_lr: float = 3e-5              # end of the decay (DeepSeek-V3: 2.2e-5, a tenth of the peak)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1         # on matrices only; norms and biases are not decayed
    warmup_steps: int = 100           # linear warm-up from 0
    schedule: str = "wsd"             # "wsd" (warmup, constant, decay), "cosine" or "constant"
    decay_shape: str = "cosine"       # shape of the WSD decay: "cosine" or "linear"
    decay_fraction: float = 0.2       # WSD: the last fraction of the run decays to min_lr
    decay_steps: int | None = None    # WSD: decay over this many final steps instead (needs max_steps)
    grad_clip: float = 1.0            # global gradient-norm clip (0: none)
    optimizer: str = "adamw"          # "adamw": AdamW for every parameter; "muon": Muon for the hidden matrices,
                                      #   AdamW for the embedding, output head, router, norms and biases (optim.py)
    muon_lr: float | None = None      # Muon's peak lr (None: lr); the schedule moves it in proportion to lr
    muon_momentum: float = 0.95       # Muon's momentum
    muon_nesterov: bool = True        # Nesterov momentum
    muon_weight_decay: float | None = None   # Muon's decoupled weight decay (None: weight_decay)
    muon_ns_steps: int = 5            # Newton-Schulz iterations that orthogonalise the update
    muon_adjust_lr: str = "match_rms_adamw"  # update scale of an A x B matrix: "match_rms_adamw" 0.2*sqrt(max(A,B))
                                      #   (Moonshot, Kimi K2: AdamW's lr and weight decay carry over) or
                                      #   "original" sqrt(max(1, A/B)) (Keller Jordan's, for a lr near 0.02)
    micro_batch_size: int = 8         # sequences per forward/backward
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 256                # tokens per sequence


@dataclass
class TrainSection:
    """``[train]``: how long, how precise, how often to evaluate/save/log, and DeepSeek's knobs."""
    out_dir: str = ""                 # the run folder ("": runs/<config file name>)
    max_steps: int | None = None      # stop after this many optimizer steps...
    max_tokens: int | None = None     # ...or this many training tokens...
    max_minutes: float | None = None  # ...or this much wall-clock time (the speedrun's budget)
    seed: int = 1337
    device: str = "auto"              # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"            # "float32", or "bfloat16" autocast around the forward/backward
    eval_every: int = 100             # steps between validations (0: only at the end)
    save_every: int = 500             # steps between checkpoints (0: only at the end / on interrupt)
    keep_last: int = 3                # checkpoints kept in RUN/checkpoints
    log_every: int = 1                # steps between metrics.jsonl lines (and terminal lines without a bar)
    mtp_lambda: float = 0.3           # weight of the MTP loss (V3: 0.3 for the first 10T tokens, then 0.1)
    bias_update_gamma: float = 0.001  # aux-loss-free bias update speed (V3: 0.001)
    expert_load_every: int = 0        # log expert_load summed over this many steps (0: automatic, by model size)
    seq_aux_alpha: float = 0.0001     # complementary sequence-wise balance loss weight (V3: 0.0001)
    dsa_warmup_steps: int = 0         # V3.2: first steps train only the indexers against dense attention (train/dsa.py)
    dsa_warmup_freeze: bool = True    # V3.2: the warm-up trains only the indexers (false: everything, dense; from scratch)
    indexer_loss_weight: float = 1.0  # V3.2: weight of the indexers' KL loss (0: indexers frozen)
    recompute: str = "none"           # activation recomputation: "none", "selective" (V3's: RMSNorm + MLA up-proj), "full"
    compile: bool = False             # run each micro-batch's forward + backward through torch.compile (one process;
                                      #   compiled on the first step, eager with a warning if compiling fails: loop.py);
                                      #   in GRPO also the rollout engine's decode step (Engine(compile=True))
    max_nodes_per_token: int = 0      # node-limited routing (V3 2.1.2): each token's experts on at most M nodes (0: off)
    expert_nodes: int = 0             # ...the nodes the routed experts span (0: from the layout, ep / ranks per node)
    tensorboard: bool = False         # also log to RUN/tensorboard (needs the tensorboard package)
    wandb_project: str = ""           # also log to this W&B project (needs the wandb package)


@dataclass
class SpikeSection:
    """``[spike]``: the loss-spike guard (see ``nanoseek/train/spike.py``)."""
    enabled: bool = True
    window: int = 100                 # running window of accepted step losses
    min_history: int = 20             # accepted steps before the statistical tests start
    sigma: float = 6.0                # skip only if loss > median + sigma * robust std (MAD) of the window (0: off)
    tail: float = 1.5                 # ...and loss - median > tail * the largest ordinary excess seen (0: off)
    ratio: float = 2.0                # ...and loss > ratio * median of the window (0: off)
    max_skips: int = 3                # this many skipped steps...
    skip_window: int = 50             # ...within this many steps: re-measure the reference (0: never)
    trend_window: int = 20            # slow blow-up: lower quartile of the last trend_window losses...
    trend_factor: float = 1.5         # ...above trend_factor x its lowest so far: re-measure the reference (0: off)
    reference_batches: int = 4        # the reference: the first micro-batch of the first N accepted steps
    damage_factor: float = 1.5        # roll back only if the reference loss > damage_factor x its best
    max_rollbacks: int = 3            # more rollbacks in a row than this stop the run (one-line error)


@dataclass
class ParallelSection:
    """``[parallel]``: scale-out under torchrun (see ``nanoseek/train/distributed.py``).

    A single process ignores it (pp and ep must then be 1). Under torchrun every rank is a
    data-parallel replica reading its own slice of each global batch (``micro_batch_size`` is per
    rank); with ``pp > 1`` the world is pp pipeline ranks x world/pp replicas, and a pipeline's
    ranks read the same rows. The pipeline's micro-batches are ``[optim] grad_accum``'s.
    """
    pp: int = 1                       # pipeline stages' ranks (outer mesh dim): the model cut by layers
    schedule: str = DEFAULT_SCHEDULE  # pipeline schedule (pipeline.SCHEDULES); micro-batches = [optim] grad_accum
    ep: int = 1                       # expert-parallel size: routed experts split over this many ranks
    fsdp: bool = False                # FSDP2 fully_shard: shard weights, gradients, optimizer state
    backend: str = "auto"             # "auto" (nccl on CUDA, else gloo), "nccl" or "gloo"
    timeout_minutes: float = 10.0     # a collective waiting longer than this fails the run


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "optim": OptimSection, "train": TrainSection,
    "spike": SpikeSection, "parallel": ParallelSection,
}


@dataclass
class TrainConfig:
    """A whole pre-training recipe."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    spike: SpikeSection = field(default_factory=SpikeSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    source: str = "<defaults>"        # the file it came from (not written back)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            if name == "model":
                d.update(d.pop("fields"))
            out[name] = d
        return out

    def tokens_per_step(self) -> int:
        o = self.optim
        return o.micro_batch_size * o.grad_accum * o.seq_len


# ---------------------------------------------------------------------------- generic parsing
def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a dataclass field's type annotation; int -> float allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ConfigError(f"{where} must not be null")
        for option in inner[:-1]:               # `int | dict`: the first type the value is
            try:
                return check_value(value, option, where)
            except ConfigError:
                pass
        try:
            return check_value(value, inner[-1], where)
        except ConfigError:
            if len(inner) == 1:
                raise
        names = " or ".join(_type_name(typing.get_origin(a) or a) for a in inner)
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if where.rsplit(" ", 1)[-1].split("[")[0].endswith("seed") and not 0 <= value <= SEED_MAX:
                raise ConfigError(f"{where} must be in [0, {SEED_MAX}] (the seeds torch accepts), got {value}")
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    else:  # pragma: no cover - a field type this parser does not know
        raise ConfigError(f"{where}: unsupported field type {annotation!r}")
    expected = _type_name(origin or annotation)
    if origin is list and args:
        expected = f"a list of {_type_name(args[0])}"
    if value is None:
        raise ConfigError(f"{where} must not be null (expected {expected})")
    raise ConfigError(f"{where} must be {expected}, got {type(value).__name__} {value!r}")


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _written(given: Any) -> set[str]:
    """The keys of a user's table that set something (``null`` unsets)."""
    return {k for k, v in given.items() if v is not None} if isinstance(given, dict) else set()


def _required(cls: type) -> list[str]:
    """The fields of ``cls`` without a default: keys a table must write."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def parse_section(cls: type, raw: Any, section: str, source: str, extra_keys: set[str] | None = None,
                  default: Any = None) -> Any:
    """One TOML table -> dataclass ``cls``. ``extra_keys`` (e.g. HF model fields) go to ``fields``.

    ``default``: an instance of ``cls`` whose values stand for the keys the table does not write
    (a post-training kind's defaults, ``StageKind.defaults`` in :mod:`nanoseek.post.registry`); without it the
    class's own defaults do, and a field without one is a key the table must write."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{section}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "fields" or extra_keys is None]
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in raw.items():
        if key in names and value is None and not _optional(hints[key]):
            continue                      # `--set table.key=null`: unset, the default applies
        if key in names:
            kwargs[key] = check_value(value, hints[key], f"{source}: [{section}] {key}")
        elif extra_keys is not None and key in extra_keys:
            extras[key] = value
        else:
            valid = ", ".join(names)
            if extra_keys is not None:
                valid += ", or any model config field: " + ", ".join(sorted(extra_keys))
            raise ConfigError(f"{source}: unknown key '{key}' in [{section}]. Valid keys: {valid}")
    if extra_keys is not None:
        kwargs["fields"] = extras
    if default is not None:
        out = copy.deepcopy(default)
        for key, value in kwargs.items():
            setattr(out, key, value)
        return out
    missing = [k for k in _required(cls) if k not in kwargs]
    if missing:
        raise ConfigError(f"{source}: [{section}] needs key '{missing[0]}' (required: {', '.join(_required(cls))})")
    return cls(**kwargs)


def parse_sections(raw: dict[str, Any], schema: dict[str, type], source: str,
                   extra_keys: dict[str, set[str]] | None = None,
                   defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every table of a TOML document -> its dataclass; unknown tables are errors. ``defaults``:
    {table: instance} whose values stand for unwritten keys (see :func:`parse_section`)."""
    unknown = [k for k in raw if k not in schema]
    if unknown:
        raise ConfigError(f"{source}: unknown table [{unknown[0]}]. Valid tables: "
                          f"{', '.join('[' + s + ']' for s in schema)}")
    extra_keys, defaults = extra_keys or {}, defaults or {}
    return {name: parse_section(cls, raw.get(name, {}), name, source, extra_keys.get(name), defaults.get(name))
            for name, cls in schema.items()}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string that :func:`parse_literal` reads back exactly (a flag's path
    given as a ``--set`` override: quotes, backslashes and control characters escaped)."""
    out = ['"']
    for ch in str(text):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def parse_literal(text: str) -> Any:
    """A ``--set`` value: a TOML literal if it parses as one, else the bare string."""
    if text.strip().lower() in ("null", "none"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the TOML dict ``base`` with ``over`` merged in: tables merge key by key,
    any other value of ``over`` replaces ``base``'s (a recipe's ``[defaults.*]`` under a stage's tables)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_tables(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    schema: dict[str, Any]) -> dict[str, Any]:
    """Apply ``section.key=value`` (``section.key.sub=value`` for a table value) to a raw TOML dict.

    ``schema`` maps each table to what its keys are: a dataclass (its fields; a field whose type is
    a dataclass is a sub-table, ``[model]`` also takes every model config field), a dict {key: the
    same for a sub-table, or None for a value}, or anything else (``dict``, ``object``) for a table
    whose keys are checked later. A key that is not one of them is an error naming the ``--set``
    item (not the file it would have gone into) and the valid keys."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected section.key=value, e.g. optim.lr=1e-3")
        path, _, text = item.partition("=")
        parts = [p.strip() for p in path.strip().split(".")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set '{item}': expected section.key=value, e.g. optim.lr=1e-3")
        if parts[0] not in schema:
            raise ConfigError(f"--set '{item}': unknown table '{parts[0]}'. Valid tables: {', '.join(schema)}")
        _check_override_key(item, parts, schema[parts[0]])
        node = raw.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{p}' is not a table")
        node[parts[-1]] = parse_literal(text.strip())
    return raw


def _table_keys(spec: Any) -> dict[str, Any] | None:
    """{key: the sub-table's spec or None} of a table as ``apply_overrides``' schema describes it;
    None where its keys are not known here."""
    if isinstance(spec, dict):
        return spec
    if not (isinstance(spec, type) and dataclasses.is_dataclass(spec)):
        return None
    hints = typing.get_type_hints(spec)
    keys = {f.name: hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(spec) if not (spec is ModelSection and f.name == "fields")}
    if spec is ModelSection:
        keys.update(dict.fromkeys(sorted(all_model_fields())))
    return keys


def _check_override_key(item: str, parts: list[str], spec: Any) -> None:
    for depth, key in enumerate(parts[1:], start=1):
        keys = _table_keys(spec)
        if keys is None:
            return
        if key not in keys:
            table = ".".join(parts[:depth])
            plain = [k for k, v in keys.items() if v is None]
            if spec is ModelSection:
                plain = [f.name for f in dataclasses.fields(ModelSection) if f.name != "fields"]
                plain[-1] += ", or any model config field: " + ", ".join(sorted(all_model_fields()))
            subs = [f"[{table}.{k}]" for k, v in keys.items() if v is not None]
            valid = (", ".join(plain) + (", or " if plain and subs else "") + ("the tables " if subs else "")
                     + ", ".join(subs))
            raise ConfigError(f"--set '{item}': unknown key '{key}' in [{table}]. Valid keys: {valid}")
        spec = keys[key]
        if spec is None:
            return


# ---------------------------------------------------------------------------- the pre-training config
INT64_MAX = 2**63 - 1      # the most any count of steps, tokens or batches may be (torch's int64)


def check_train_config(cfg: TrainConfig, source: str) -> TrainConfig:
    """Cross-field checks of the [data] [optim] [train] [spike] values (and the model config); returns cfg."""
    def bad(section: str, key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: [{section}] {key} = {getattr(getattr(cfg, section), key)!r}: {why}")

    d, o, t, s = cfg.data, cfg.optim, cfg.train, cfg.spike
    for section in ("data", "optim", "train", "spike"):    # a count past int64 is a loop that never ends
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            top = SEED_MAX if "seed" in f.name else INT64_MAX
            if isinstance(v, int) and not isinstance(v, bool) and v > top:
                raise bad(section, f.name, f"must be <= {top:,}")
    if d.source not in ("packed", "synthetic"):
        raise bad("data", "source", "must be 'packed' or 'synthetic'")
    if d.val_batches < 0:
        raise bad("data", "val_batches", "must be >= 0")
    if o.optimizer not in OPTIMIZERS:
        raise bad("optim", "optimizer", "must be " + " or ".join(repr(k) for k in OPTIMIZERS))
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise bad("optim", "lr", "must be a positive number")
    if o.muon_lr is not None and not o.muon_lr > 0:
        raise bad("optim", "muon_lr", "must be a positive number (or null: lr)")
    if not 0 <= o.muon_momentum < 1:
        raise bad("optim", "muon_momentum", "must be in [0, 1)")
    if o.muon_weight_decay is not None and o.muon_weight_decay < 0:
        raise bad("optim", "muon_weight_decay", "must be >= 0 (or null: weight_decay)")
    if not 1 <= o.muon_ns_steps < 100:
        raise bad("optim", "muon_ns_steps", "must be in [1, 99]")
    if o.muon_adjust_lr not in MUON_ADJUST_LR:
        raise bad("optim", "muon_adjust_lr", "must be " + " or ".join(repr(k) for k in MUON_ADJUST_LR))
    if o.schedule != "constant" and not 0 <= o.min_lr <= o.lr:   # (constant: unused, and never written)
        raise bad("optim", "min_lr", f"must be in [0, lr={o.lr}]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise bad("optim", "betas", "must be two numbers in [0, 1)")
    if o.eps <= 0:
        raise bad("optim", "eps", "must be positive")
    if o.weight_decay < 0:
        raise bad("optim", "weight_decay", "must be >= 0")
    if o.warmup_steps < 0:
        raise bad("optim", "warmup_steps", "must be >= 0")
    if o.schedule not in ("wsd", "cosine", "constant"):
        raise bad("optim", "schedule", "must be 'wsd', 'cosine' or 'constant'")
    if o.decay_shape not in ("cosine", "linear"):
        raise bad("optim", "decay_shape", "must be 'cosine' or 'linear'")
    if not 0 <= o.decay_fraction <= 1:
        raise bad("optim", "decay_fraction", "must be in [0, 1]")
    if o.decay_steps is not None and (o.decay_steps < 0 or t.max_steps is None):
        raise bad("optim", "decay_steps", "must be >= 0 and needs [train] max_steps")
    if o.grad_clip < 0:
        raise bad("optim", "grad_clip", "must be >= 0 (0: no clipping)")
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(o, key) < 1:
            raise bad("optim", key, "must be >= 1")
    if o.seq_len < 2:
        raise bad("optim", "seq_len", "must be >= 2")
    if t.max_steps is None and t.max_tokens is None and t.max_minutes is None:
        raise ConfigError(f"{source}: [train] needs max_steps, max_tokens or max_minutes (how long to train)")
    for key in ("max_steps", "max_tokens", "max_minutes"):
        v = getattr(t, key)
        if v is not None and v <= 0:
            raise bad("train", key, "must be positive")
    if t.dtype not in ("float32", "bfloat16"):
        raise bad("train", "dtype", "must be 'float32' or 'bfloat16'")
    if not (t.device in ("auto", "cpu", "mps") or t.device.startswith("cuda")):
        raise bad("train", "device", "must be 'auto', 'cpu', 'mps' or 'cuda[:N]'")
    for key in ("eval_every", "save_every"):
        if getattr(t, key) < 0:
            raise bad("train", key, "must be >= 0 (0: only at the end)")
    for key in ("keep_last", "log_every"):
        if getattr(t, key) < 1:
            raise bad("train", key, "must be >= 1")
    for key in ("mtp_lambda", "bias_update_gamma", "seq_aux_alpha", "dsa_warmup_steps", "indexer_loss_weight",
                "max_nodes_per_token", "expert_nodes"):
        if getattr(t, key) < 0:
            raise bad("train", key, "must be >= 0")
    from ..estimate.activations import MODES as RECOMPUTE_MODES
    if t.recompute not in RECOMPUTE_MODES:
        raise bad("train", "recompute", "must be " + ", ".join(repr(m) for m in RECOMPUTE_MODES))
    for key in ("window", "min_history", "trend_window", "reference_batches"):
        if getattr(s, key) < 1:
            raise bad("spike", key, "must be >= 1")
    for key in ("sigma", "tail", "ratio", "trend_factor", "max_skips", "skip_window", "max_rollbacks"):
        if getattr(s, key) < 0:
            raise bad("spike", key, "must be >= 0")
    if 0 < s.tail < 1:
        raise bad("spike", "tail", "must be >= 1 (or 0 to disable): below 1 it skips batches as hard as ordinary ones")
    if s.trend_window > s.window:
        raise bad("spike", "trend_window", f"must be <= window={s.window}")
    if 0 < s.ratio <= 1:
        raise bad("spike", "ratio", "must be > 1 (or 0 to disable)")
    if 0 < s.trend_factor <= 1:
        raise bad("spike", "trend_factor", "must be > 1 (or 0 to disable)")
    if s.damage_factor <= 1:
        raise bad("spike", "damage_factor", "must be > 1: at or below 1 ordinary noise on the reference rolls back")
    par = cfg.parallel
    if par.ep < 1:
        raise bad("parallel", "ep", "must be >= 1")
    if par.pp < 1:
        raise bad("parallel", "pp", "must be >= 1")
    from .pipeline import SCHEDULES, check_microbatches, num_stages
    if par.schedule not in SCHEDULES:
        raise bad("parallel", "schedule", "must be " + ", ".join(repr(k) for k in SCHEDULES))
    if par.backend not in ("auto", "nccl", "gloo"):
        raise bad("parallel", "backend", "must be 'auto', 'nccl' or 'gloo'")
    if par.timeout_minutes <= 0:
        raise bad("parallel", "timeout_minutes", "must be positive")
    if o.optimizer == "muon" and par.fsdp:
        raise bad("optim", "optimizer", "cannot run with [parallel] fsdp = true (Newton-Schulz orthogonalises "
                  "whole matrices, FSDP shards them); use data or expert parallelism (fsdp = false) "
                  "or optimizer = 'adamw'")
    model_cfg = cfg.model.build_config()
    from ..model.registry import require
    if par.ep > 1:
        require(model_cfg, "expert_parallel", f"{source}: [parallel] ep = {par.ep}")
    if par.fsdp:
        require(model_cfg, "fsdp", f"{source}: [parallel] fsdp = true")
    if t.recompute != "none":
        require(model_cfg, "recompute", f"{source}: [train] recompute = {t.recompute!r}")
    if t.expert_load_every < 0:
        raise bad("train", "expert_load_every", "must be >= 0 (0: automatic)")
    if t.expert_nodes and not t.max_nodes_per_token:
        raise bad("train", "expert_nodes", "would have no effect with max_nodes_per_token = 0 (node-limited routing "
                  "off); set max_nodes_per_token > 0, or drop the key (--set train.expert_nodes=null)")
    if t.max_nodes_per_token:
        require(model_cfg, "node_limited_routing", f"{source}: [train] max_nodes_per_token = {t.max_nodes_per_token}")
    if t.max_nodes_per_token and t.expert_nodes:    # (expert_nodes = 0: resolved and checked at run time)
        from ..model.routing import node_limit_problem
        why = node_limit_problem(model_cfg, t.expert_nodes, t.max_nodes_per_token, par.ep)
        if why:
            raise bad("train", "max_nodes_per_token", why)
    if par.ep > 1 and (not model_cfg.n_routed_experts or model_cfg.n_routed_experts % par.ep):
        raise bad("parallel", "ep", f"must divide the model's n_routed_experts = {model_cfg.n_routed_experts}")
    if par.pp > 1:
        spec = SCHEDULES[par.schedule]
        stages = num_stages(par.pp, spec)
        if par.fsdp:
            raise bad("parallel", "pp", "cannot run with fsdp = true (pipeline stages are data and expert "
                      "parallel); set fsdp = false")
        from ..model.config import ModelConfig
        if not isinstance(model_cfg, ModelConfig) or model_cfg.index_n_heads:
            raise bad("parallel", "pp", "splits DeepSeek-V3 models (not V3.2's indexers or V4) into stages; use pp = 1")
        if model_cfg.num_hidden_layers < stages:
            raise bad("parallel", "pp", f"with schedule {par.schedule!r} makes {stages} stages, more than the model's "
                      f"num_hidden_layers = {model_cfg.num_hidden_layers}")
        why = check_microbatches(spec, par.pp, o.grad_accum, "grad_accum")
        if why:
            raise bad("optim", "grad_accum", f"is the number of pipeline micro-batches; schedule {par.schedule!r} {why}")
        why = check_microbatches(spec, par.pp, s.reference_batches, "reference_batches")
        if s.enabled and why:
            raise bad("spike", "reference_batches", f"run through the pipeline as one step; schedule "
                      f"{par.schedule!r} {why}")
    if o.seq_len > model_cfg.max_position_embeddings:
        raise bad("optim", "seq_len", f"exceeds the model's max_position_embeddings={model_cfg.max_position_embeddings}")
    check_training_memory(cfg, model_cfg, source)
    return cfg


def check_training_memory(cfg: TrainConfig, model_cfg: ModelConfig, source: str) -> None:
    """Refuse a run that cannot fit in the memory free now on its device, before allocating: fp32
    weights + gradients + AdamW moments (16 bytes per parameter), then one micro-batch's saved
    activations (``nanoseek.estimate.activations``' count of nanoseek's own modules under
    ``[train] recompute``, plus the one layer a recomputing backward rebuilds at a time; MLA's is
    measured, MHA's the fused count; it assumes fused attention and so undercounts the math path;
    plus the explicit [heads x seq_len] attention of a V3.2 model whose indexers train) and its
    fp32 logits with their gradient."""
    from ..estimate.activations import activation_bytes_per_token
    from ..model.registry import V3, count_params, family_of

    device = cfg.train.device
    if device in ("auto", "mps"):
        import sys
        torch = sys.modules.get("torch")
        device = "cuda" if device == "auto" and torch is not None and torch.cuda.is_available() else "cpu"
    o = cfg.optim
    n_params = count_params(model_cfg).total
    act_bytes = 4 if cfg.train.dtype == "float32" else 2
    layers = model_cfg.num_hidden_layers + model_cfg.num_nextn_predict_layers
    if family_of(model_cfg) is V3:
        kernels = "eager" if model_cfg.attention_type == "mla" else "fused"
        none, kept = ([activation_bytes_per_token(model_cfg, i, act_bytes, mode, kernels=kernels)
                       for i in range(layers)] for mode in ("none", cfg.train.recompute))
        per_token = sum(kept) + max(n - k for n, k in zip(none, kept))
        if model_cfg.index_n_heads and cfg.train.indexer_loss_weight > 0:
            # V3.2 while its indexers train (nanoseek/train/dsa.py): each indexed layer computes the
            # attention explicitly for the KL: fp32 logits and probabilities [H, T] per query, the
            # indexer's fp32 scores and log-probabilities [T] and the boolean masks [T]
            per_token += model_cfg.num_hidden_layers * o.seq_len * (2 * 4 * model_cfg.num_attention_heads + 2 * 4 + 2)
    else:   # DeepSeek-V4: hc_mult residual streams; a coarse bound of 32 saved vectors per stream and layer
        per_token = layers * 32 * model_cfg.hc_mult * model_cfg.hidden_size * act_bytes
    per_token += 2 * 4 * model_cfg.vocab_size
    tokens = o.micro_batch_size * o.seq_len
    try:
        check_fits(16 * n_params, f"the model ({n_params:,} parameters: weights, gradients, AdamW moments)",
                   f"{source}: [model]", device)
        check_fits(16 * n_params + int(tokens * per_token),
                   f"the model plus one micro-batch of {o.micro_batch_size} x {o.seq_len} tokens (activations, logits)",
                   f"{source}: [optim] micro_batch_size x seq_len", device)
    except LimitError as e:
        raise ConfigError(str(e)) from None


def no_effect_keys(cfg: TrainConfig) -> dict[str, list[str]]:
    """{table: keys} that would have no effect with this config's ``[data] source`` / ``val_batches``
    and ``[optim] schedule`` (see the module docstring). Written keys among them are errors
    (:func:`check_data_keys`, :func:`check_schedule_keys`, :func:`check_parallel_keys`);
    :func:`config_to_toml` leaves them out."""
    d, o = cfg.data, cfg.optim
    out: dict[str, list[str]] = {"data": [], "optim": []}
    if d.source == "synthetic":
        out["data"] += ["dir", "train_split", "val_split"]
    elif d.val_batches == 0:
        out["data"].append("val_split")
    out["optim"] = _optimizer_no_effect(o) + _schedule_no_effect(o)
    out["parallel"] = ["schedule"] if cfg.parallel.pp == 1 else []
    return out


def _optimizer_no_effect(o: OptimSection) -> list[str]:
    """The ``muon_*`` keys, unless the optimizer is Muon."""
    return [] if o.optimizer == "muon" else [f.name for f in dataclasses.fields(o) if f.name.startswith("muon_")]


def _schedule_no_effect(o: OptimSection) -> list[str]:
    if o.schedule == "constant":
        return ["min_lr"] * (o.min_lr != o.lr) + ["decay_fraction", "decay_steps", "decay_shape"]
    if o.schedule == "cosine":
        return ["decay_fraction", "decay_steps", "decay_shape"]
    return ["decay_fraction"] if o.decay_steps is not None else []


def check_data_keys(data: DataSection, given: dict[str, Any], source: str) -> None:
    """``[data]`` keys the user wrote (``given``, before defaults) that the chosen source would ignore: an error."""
    unused = [k for k in no_effect_keys(TrainConfig(data=data))["data"] if k in _written(given)]
    if not unused:
        return
    if data.source == "synthetic":
        what = f" to train on {data.dir!r}" if "dir" in unused else ""
        raise ConfigError(f"{source}: [data] {', '.join(unused)} would have no effect with source = 'synthetic' "
                          f"(generated token ids, no files are read); set data.source = \"packed\" "
                          f"(--set data.source=packed){what}, or drop the key (--set data.{unused[0]}=null)")
    raise ConfigError(f"{source}: [data] {', '.join(unused)} would have no effect with val_batches = 0 (no "
                      "validation); set val_batches > 0, or drop the key (--set data.val_split=null)")


def check_parallel_keys(parallel: ParallelSection, given: dict[str, Any], source: str) -> None:
    """``[parallel] schedule`` written with ``pp = 1``: an error (one process per replica holds the
    whole model, there is no pipeline to schedule). ``given`` is the table as the user wrote it."""
    unused = [k for k in no_effect_keys(TrainConfig(parallel=parallel))["parallel"] if k in _written(given)]
    if unused:
        raise ConfigError(f"{source}: [parallel] schedule = {parallel.schedule!r} would have no effect with pp = 1 "
                          f"(no pipeline: the schedule orders pipeline stages); set pp > 1 (--set parallel.pp=2) "
                          f"to pipeline the model, or drop the key (--set parallel.schedule=null)")


def check_optim_keys(optim: OptimSection, given: dict[str, Any], source: str) -> None:
    """``[optim]`` keys the user wrote (``given``, before defaults) that would have no effect: the
    ``muon_*`` keys under another optimizer, and decay keys the schedule ignores
    (:func:`check_schedule_keys`). Either is an error."""
    unused = [k for k in _optimizer_no_effect(optim) if k in _written(given)]
    if unused:
        raise ConfigError(f"{source}: [optim] {', '.join(unused)} would have no effect with optimizer = "
                          f"{optim.optimizer!r}; set optimizer = \"muon\" (--set optim.optimizer=muon) to train the "
                          f"hidden matrices with Muon, or drop the key (--set optim.{unused[0]}=null)")
    check_schedule_keys(optim, given, source)


def check_schedule_keys(optim: OptimSection, given: dict[str, Any], source: str) -> None:
    """Decay settings the chosen ``schedule`` would silently ignore: an error. ``given`` is the
    ``[optim]`` table as the user wrote it (before any defaults were merged)."""
    unused = [k for k in _schedule_no_effect(optim) if k in _written(given)]
    if not unused:
        return
    if optim.schedule == "constant":
        raise ConfigError(f"{source}: [optim] {', '.join(unused)} would have no effect "
                          f"with schedule = 'constant' (the lr stays at {optim.lr}); set schedule = 'wsd' or "
                          f"'cosine' to decay, or drop the key (--set optim.{unused[0]}=null)"
                          + ("" if unused != ["min_lr"] else " (or min_lr = lr)"))
    if optim.schedule == "cosine":
        raise ConfigError(f"{source}: [optim] {', '.join(unused)} would have no effect with schedule = 'cosine' "
                          "(it decays over the whole run); set schedule = 'wsd' to place the decay, or drop the key "
                          f"(--set optim.{unused[0]}=null)")
    raise ConfigError(f"{source}: [optim] decay_fraction would have no effect next to decay_steps = "
                      f"{optim.decay_steps} (the decay covers the last decay_steps steps); drop one of them "
                          "(--set optim.decay_fraction=null)")


def _resolve_init_from(cfg: TrainConfig, source: str) -> None:
    """A run folder in ``[model] init_from`` -> the checkpoint directory it means (final/, latest)."""
    if not cfg.model.init_from:
        return
    from nanoseek.train.checkpoint import LoadError, resolve_checkpoint

    try:
        cfg.model.init_from = str(resolve_checkpoint(cfg.model.init_from))
    except LoadError as e:
        raise ConfigError(f"{source}: [model] init_from: {e}") from None


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    """A raw dict (as read from TOML) -> validated :class:`TrainConfig`."""
    parts = parse_sections(raw, SECTIONS, source, extra_keys={"model": set(all_model_fields())})
    check_optim_keys(parts["optim"], raw.get("optim") or {}, source)
    check_data_keys(parts["data"], raw.get("data") or {}, source)
    check_parallel_keys(parts["parallel"], raw.get("parallel") or {}, source)
    cfg = TrainConfig(**parts, source=source)
    _resolve_init_from(cfg, source)
    if isinstance(raw.get("model"), dict) and "preset" in raw["model"]:
        check_init_from_family(cfg.model, source)
    return check_train_config(cfg, source)


def check_init_from_family(model: ModelSection, source: str) -> None:
    """A written ``[model] preset`` and an ``init_from`` checkpoint of another model family
    (nanoseek.model.registry: DeepSeek-V3/V3.2 vs V4) is one ConfigError line: the weights of one
    cannot start the other (V3 -> V3.2, DeepSeek's own recipe, is one family)."""
    if not model.init_from:
        return
    from ..model.registry import family_of, load_config

    want, have = family_of(load_config(model.preset)), family_of(load_config(model.init_from))
    if want is not have:
        raise ConfigError(f"{source}: [model] preset = {model.preset!r} is a {want.name} model (model_type "
                          f"{want.model_types[0]}) but init_from = {model.init_from!r} is a {have.name} checkpoint "
                          f"({have.model_types[0]}): one family's weights cannot start the other; drop one of the two")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at byte offset {e.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


TRAIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


def list_train_configs() -> list[str]:
    return sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A TOML path, or the name of a recipe shipped in ``nanoseek/configs/train/``."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = TRAIN_CONFIG_DIR / f"{p.stem}.toml"
    if len(p.parts) == 1 and p.suffix in ("", ".toml") and shipped.exists():
        return shipped
    raise ConfigError(f"config '{name_or_path}' not found: not a file, and not a shipped recipe "
                      f"(shipped: {', '.join(list_train_configs())})")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML recipe (a path or a shipped name like ``tiny``), apply ``--set`` overrides, validate."""
    path = resolve_config_path(path)
    raw = apply_overrides(read_toml(path), list(overrides), SECTIONS)
    cfg = config_from_dict(raw, source=str(path))
    if not cfg.train.out_dir:
        cfg.train.out_dir = str(Path("runs") / path.stem)
    return cfg


# ---------------------------------------------------------------------------- TOML writing
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dumps_toml(doc: dict[str, dict[str, Any]], header: str = "") -> str:
    """Tables of scalars, lists and inline tables -> TOML text; None values are commented out."""
    lines = [f"# {line}" for line in header.splitlines()]
    for table, values in doc.items():
        lines.append(f"\n[{table}]")
        for k, v in values.items():
            if v is None:
                lines.append(f"# {k} = (unset)")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def config_to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML; reading it back gives the same :class:`TrainConfig`. Keys that
    have no effect (:func:`no_effect_keys`, all at their defaults) are left out, or reading it back
    would refuse them."""
    doc = cfg.to_dict()
    for table, keys in no_effect_keys(cfg).items():
        for k in keys:
            doc[table].pop(k, None)
    return dumps_toml(doc, header=f"Resolved nanoseek training config (from {cfg.source})")


__all__ = ["ConfigError", "ModelSection", "DataSection", "OptimSection", "TrainSection", "SpikeSection", "ParallelSection",
           "TrainConfig", "SECTIONS", "check_value", "parse_section", "parse_sections", "parse_literal",
           "merge_tables", "apply_overrides", "check_train_config", "check_data_keys", "check_optim_keys",
           "check_schedule_keys", "check_parallel_keys", "OPTIMIZERS", "MUON_ADJUST_LR",
           "no_effect_keys",
           "config_from_dict", "read_toml", "load_config", "resolve_config_path",
           "list_train_configs", "dumps_toml", "config_to_toml", "TRAIN_CONFIG_DIR"]
