"""Redundant-expert placement (DeepSeek's EPLB) for a run's measured expert loads: per-GPU imbalance.

  nanoseek eplb runs/mine                                   # measured loads, 8 / 64 / 256 GPUs
  nanoseek eplb runs/mine --synthetic lognormal             # + DeepSeek-V3-sized loads of the same spread
  nanoseek eplb --synthetic zipf --zipf-exponent 0.5        # synthetic only, no run needed
  nanoseek eplb loads.json --gpus 16 32 --redundant-per-gpu 2 --policy global

SOURCE is a run folder (its metrics.jsonl: every logged step carries ``expert_load``), a
metrics.jsonl, or a loads JSON file (``--save-loads`` writes one). For each GPU count the table
gives the per-GPU load imbalance, max / mean GPU load of an MoE layer (1.00 = perfect), averaged
over the MoE layers (the worst layer in parentheses): *before* = the experts placed in order,
ceil(E / GPUs) per GPU, no replicas; *hierarchical* and *global* = EPLB's placements with
``--redundant-per-gpu`` extra slots on every GPU (:mod:`nanoseek.train.eplb`). Nodes are
GPUs / ``--gpus-per-node``; the hierarchical policy needs the nodes to divide the expert groups
(else "n/a"). Measured and synthetic loads are separate tables, each titled with its source.
``--held-out`` places the experts from the first half of the run's logged steps (all of them, or
those from ``--from-step`` on) and measures each later step's load on its own: what a placement
computed from past traffic does on new batches.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass
class Layout:
    gpus: int
    nodes: int
    slots_per_gpu: int
    redundant: int                              # slots - experts
    before: tuple[float, float]                 # (mean over layers, worst layer) of max / mean
    after: dict[str, tuple[float, float] | str]  # policy -> figures, or why it does not apply


def _summary(per_layer) -> tuple[float, float]:
    """(mean over layers, worst layer); a [steps, layers] input is first averaged over the steps."""
    per_layer = per_layer.mean(0) if per_layer.dim() == 2 else per_layer
    return float(per_layer.mean()), float(per_layer.max())


def compare(loads, gpus: list[int], gpus_per_node: int = 8, redundant_per_gpu: int = 1,
            groups: int | None = None, policies: tuple[str, ...] = ("hierarchical", "global"),
            evaluate=None) -> list[Layout]:
    """Before/after imbalance of ``loads`` (:class:`~nanoseek.train.eplb_loads.Loads`) for each GPU
    count: the placement comes from ``loads``; the imbalance is measured on ``loads`` too, or, given
    ``evaluate`` [steps, layers, experts], on each of those steps' loads (then averaged over them)."""
    import torch

    from nanoseek.errors import ConfigError

    from .eplb import check, contiguous_loads, gpu_loads, imbalance, rebalance
    w = loads.weight
    on = w if evaluate is None else evaluate                  # [layers, E] or [steps, layers, E]
    E = w.shape[1]
    groups = groups or loads.groups or 1
    if E % groups:
        raise ConfigError(f"--groups {groups}: {E} experts do not split into {groups} equal groups")
    out = []
    for G in gpus:
        if G < 1:
            raise ConfigError(f"--gpus: {G} is not a positive number of GPUs")
        if G > gpus_per_node and G % gpus_per_node:
            raise ConfigError(f"--gpus {G}: not a whole number of nodes of {gpus_per_node} GPUs (--gpus-per-node)")
        nodes = max(1, G // gpus_per_node)
        per = math.ceil(E / G) + redundant_per_gpu
        before = torch.stack([imbalance(contiguous_loads(x, G)) for x in on.view(-1, *w.shape)])
        row = Layout(G, nodes, per, per * G - E, _summary(before.squeeze(0)), {})
        for policy in policies:
            try:
                check(tuple(w.shape), per * G, groups, nodes, G, policy)
            except ConfigError as e:
                row.after[policy] = str(e).removeprefix("EPLB: ")
                continue
            placement = rebalance(w, per * G, groups, nodes, G, policy)
            after = torch.stack([imbalance(gpu_loads(x, placement, G)) for x in on.view(-1, *w.shape)])
            row.after[policy] = _summary(after.squeeze(0))
        out.append(row)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek import limits
    p.add_argument("source", nargs="?", metavar="RUN_OR_LOADS_FILE",
                   help="a run folder, its metrics.jsonl, or a loads .json (optional with --synthetic zipf)")
    p.add_argument("--gpus", type=limits.int_range(1, 16384), nargs="+", default=[8, 64, 256], metavar="N",
                   help="GPU counts to place the experts on (default: 8 64 256)")
    p.add_argument("--gpus-per-node", type=limits.int_range(1, 1024), default=8, metavar="N",
                   help="GPUs per node: nodes = GPUs / N (default 8, DeepSeek's H800 nodes)")
    p.add_argument("--redundant-per-gpu", type=limits.int_range(0, 64), default=1, metavar="N",
                   help="extra expert slots on every GPU for replicas (default 1, as DeepSeek-V3's prefilling)")
    p.add_argument("--groups", type=limits.positive_int, metavar="N",
                   help="expert groups (default: the run's n_group; 8, DeepSeek-V3's, for synthetic loads)")
    p.add_argument("--policy", choices=("both", "hierarchical", "global"), default="both",
                   help="which EPLB policies to show (default both)")
    p.add_argument("--from-step", type=limits.nonneg_int, metavar="STEP",
                   help="sum the run's expert loads from this step on (default: the second half of the logged "
                        "steps; with --held-out: all of them); a run folder or metrics.jsonl only")
    p.add_argument("--held-out", action="store_true",
                   help="place the experts from the first half of the run's logged steps (from --from-step on, "
                        "if given) and measure the imbalance of each later step on its own (how a placement "
                        "fares on unseen batches)")
    p.add_argument("--synthetic", choices=("lognormal", "zipf"),
                   help="also place DeepSeek-V3-sized synthetic loads: lognormal (the measured per-layer spread) "
                        "or zipf (--zipf-exponent)")
    p.add_argument("--zipf-exponent", type=limits.float_range(0.0, 100.0), default=1.0, metavar="S",
                   help="Zipf loads: the r-th most popular expert gets 1 / r^S (default 1.0)")
    p.add_argument("--experts", type=limits.int_range(1, 65536), default=256, metavar="N", help="synthetic loads: routed experts (default 256)")
    p.add_argument("--layers", type=limits.int_range(1, 1024), default=58, metavar="N", help="synthetic loads: MoE layers (default 58)")
    p.add_argument("--seed", type=limits.seed, default=0, help="synthetic loads: the seed (default 0)")
    p.add_argument("--save-loads", metavar="FILE", help="write the measured loads as a loads .json")
    p.add_argument("--json", metavar="FILE", help="also write the tables as JSON")


def _check_args(args: argparse.Namespace) -> None:
    """What argparse's per-flag ranges cannot say: flags that need a run."""
    from nanoseek.errors import UserError
    if args.source is None and args.synthetic != "zipf":
        raise UserError("give a run folder or loads file (RUN_OR_LOADS_FILE), or --synthetic zipf")
    for flag, given in (("--save-loads", args.save_loads), ("--from-step", args.from_step is not None),
                        ("--held-out", args.held_out)):
        if given and args.source is None:
            raise UserError(f"{flag} needs a run folder or loads file")


def _fmt(x) -> str:
    return f"{x[0]:.3f} ({x[1]:.3f})"


def _print_table(title: str, rows: list[Layout], policies: tuple[str, ...], console) -> None:
    from rich.markup import escape
    from rich.table import Table
    t = Table(title=escape(title), title_justify="left")   # a label's [..] is text, not rich markup
    for col in ("GPUs", "nodes", "slots/GPU", "redundant", "before (no replicas)", *policies):
        t.add_column(col, justify="right", no_wrap=True)
    notes = []
    for r in rows:
        cells = []
        for p in policies:
            if isinstance(r.after[p], str):
                notes.append(f"{p} at {r.gpus} GPUs: {r.after[p]}")
            cells.append(_fmt(r.after[p]) if isinstance(r.after[p], tuple) else "n/a")
        t.add_row(str(r.gpus), str(r.nodes), str(r.slots_per_gpu), str(r.redundant), _fmt(r.before), *cells)
    console.print(t)
    for n in notes:
        console.print(f"  {escape(n)}", soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from dataclasses import asdict

    from rich.console import Console

    from nanoseek.errors import ConfigError, UserError

    from .eplb_loads import V3_GROUPS, lognormal_loads, read_loads, save_loads, zipf_loads
    _check_args(args)
    policies = ("hierarchical", "global") if args.policy == "both" else (args.policy,)
    try:
        sources = []
        # --held-out splits the whole run (or the steps from --from-step on); the plain table sums
        # the second half by default (the router has settled by then)
        measured = read_loads(args.source, args.from_step, whole_run=args.held_out) if args.source else None
        if measured is not None:
            if args.save_loads:
                print(f"loads written to {save_loads(measured, args.save_loads)}")
            sources.append((*measured.split(), args.groups) if args.held_out else (measured, None, args.groups))
        size = dict(experts=args.experts, layers=args.layers, groups=args.groups or V3_GROUPS, seed=args.seed)
        if args.synthetic == "lognormal":
            sources.append((lognormal_loads(measured, **size), None, size["groups"]))
        elif args.synthetic == "zipf":
            sources.append((zipf_loads(args.zipf_exponent, **size), None, size["groups"]))
        console = Console() if sys.stdout.isatty() else Console(width=200)   # a pipe: no wrapping
        out = []
        for loads, evaluate, groups in sources:
            rows = compare(loads, args.gpus, args.gpus_per_node, args.redundant_per_gpu, groups, policies, evaluate)
            E, L = loads.weight.shape[1], loads.weight.shape[0]
            g = groups or loads.groups or 1
            title = (f"{'SYNTHETIC' if loads.synthetic else 'MEASURED'} - {loads.label}\n"
                     f"{L} MoE layers x {E} experts in {g} groups; per-GPU load max/mean, mean over layers (worst layer)")
            _print_table(title, rows, policies, console)
            out.append({"label": loads.label, "synthetic": loads.synthetic, "layers": L, "experts": E,
                        "groups": g, "rows": [asdict(r) for r in rows]})
    except ConfigError as e:
        raise UserError(str(e)) from None
    if args.json:
        from nanoseek.atomic import write_atomic
        write_atomic(args.json, json.dumps(out, indent=1) + "\n")
        print(f"tables written to {args.json}")
    return 0


__all__ = ["Layout", "compare", "add_arguments", "run"]
