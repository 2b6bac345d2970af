"""A picture of the pipeline schedules: DualPipeV beside 1F1B, measured on CPU processes.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_timeline.py                 # pp 2, 4 micro-batches
    python benchmarks/pipeline_timeline.py --pp 2 --microbatches 8 --steps 5 --png docs/pipeline-schedules.png
    python benchmarks/pipeline_timeline.py --schedules 1f1b,dualpipev,zbv --trace trace.json --json out.json

``pp`` gloo processes (``torch.multiprocessing``, joined like torchrun's) each build the same
DeepSeek-V3-shaped model (MLA, a dense first layer, DeepSeekMoE layers; no MTP by default so the
stages are alike, as the formulas assume), cut it with :class:`nanoseek.train.pipeline.PipelineParallel`
(the trainer's own pipeline: ``torch.distributed.pipelining`` stages and schedules) and run a few
forward-backward steps of every schedule after a warm-up step, the schedules taking turns step
by step (so changes in the machine's load fall on all of them alike). Every stage action is
timed by ``pipeline.instrument`` (``PipelineParallel.events``, gathered with ``gather_events``);
the schedules' blocking waits on sends and receives by a wrapper around torch's
``_wait_batch_p2p`` (*comm*: mostly a rank waiting for its peer; gloo's transfer itself is not
separated from the wait). Out come:

* a Chrome trace (``--trace``; chrome://tracing or ui.perfetto.dev): one process per (schedule,
  rank), one thread per stage with its forward / backward / input-backward / weight-backward,
  a *comm wait* thread and an *idle* thread (the gaps of the step with no compute);
* a PNG (``--png``): one row per rank, a box per action coloured by kind (F, B, I, W; the
  rank's second stage lighter) labelled with its micro-batch, grey bars where the rank waits on
  send/recv, the schedules one above the other on one time axis;
* the bubble table, per schedule and rank: the *measured* idle fraction of the step (no compute
  between the first and the last compute action on any rank: the window the formulas' bubble
  counts); the same for *torch's order* (``build_schedule_order``) replayed on an ideal machine
  (:func:`simulate`: no communication, each step's own measured action times), which separates
  the schedule's own bubble from communication and machine noise; the estimate's formula
  (``nanoseek.estimate.pipeline``, DualPipe's table) in its units (``B = 2F``, ``W = F``,
  ``F&B = F + B``) and with the measured median F, B, W plugged in; and whether every rank ran
  the actions in torch's planned order.

Torch runs DualPipeV's overlapped F&B pairs one after the other (no overlap callback on CPU), so
``F&B = F + B`` throughout. In the formulas' units torch's DualPipeV and ZBV orders idle
``(pp - 1) F`` per rank (``tests/test_pipeline_timeline.py``), which is zero-bubble 1P's
``(pp - 1)(F + B - 2W)``; the estimate's DualPipeV formula ``(pp - 1)(F&B + B - 3W)`` says twice
that at ``F&B = F + B``. 1F1B's order idles exactly ``(pp - 1)(F + B)``.

The step drawn and traced is the one with the median span; the table gives medians over the
steps and the spread (max - min) of the idle fractions, the machine's noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weights)"}
COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868"}


# ---------------------------------------------------------------------------- analysis (no processes)
def window(events_by_rank: dict[int, list[dict]]) -> tuple[float, float]:
    """(first compute start, last compute end) over all ranks: the step as the formula sees it."""
    evs = [e for evs in events_by_rank.values() for e in evs]
    if not evs:
        raise ValueError("no compute events")
    return min(e["start"] for e in evs), max(e["end"] for e in evs)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def measured_bubble(events_by_rank: dict[int, list[dict]]) -> dict[int, dict[str, float]]:
    """Per rank: busy (union of its compute), idle (the window minus busy) seconds and the idle
    fraction of the step window (:func:`window`)."""
    t0, t1 = window(events_by_rank)
    span = t1 - t0
    out = {}
    for rank, evs in sorted(events_by_rank.items()):
        busy = _union([(e["start"], e["end"]) for e in evs])
        out[rank] = {"span": span, "busy": busy, "idle": span - busy, "fraction": (span - busy) / span if span else 0.0}
    return out


def median_durations(events_by_rank: dict[int, list[dict]]) -> dict[str, float]:
    """Median seconds of one action per kind (F, B, I, W) over all ranks and stages."""
    by: dict[str, list[float]] = {}
    for evs in events_by_rank.values():
        for e in evs:
            by.setdefault(e["kind"], []).append(e["end"] - e["start"])
    return {k: statistics.median(v) for k, v in by.items()}


def formula(name: str, pp: int, microbatches: int, durations: dict[str, float] | None = None) -> dict[str, Any]:
    """The estimate's bubble for ``name``: in the formula's units (F = 1, B = 2, W = 1) and, given
    measured per-stage durations, in seconds. B is the full backward (or I + W where the schedule
    splits it), W the weight backward (I's complement when only B is measured: W = B - I); F&B =
    F + B (no overlap on CPU)."""
    from nanoseek.estimate.pipeline import get_schedule
    s = get_schedule(name)
    out = {"formula": s.bubble_formula, "units": s.bubble(pp), "fraction_units": s.bubble_fraction(pp, microbatches)}
    if durations:
        F = durations["F"]
        B = durations.get("B", durations.get("I", 0.0) + durations.get("W", 0.0))
        W = durations.get("W", 0.0)
        out.update(F=F, B=B, W=W, seconds=s.bubble(pp, F, B, W, F + B),
                   fraction_measured=s.bubble_fraction(pp, microbatches, F, B, W, F + B))
    return out


def planned_actions(order: dict[int, list[str]]) -> dict[int, list[tuple[int, str, int]]]:
    """``build_schedule_order``'s strings as ``(stage, kind, micro-batch)`` per rank, overlapped
    pairs (``"(0F3;3B1)OVERLAP_F_B"``) as their two actions in order, non-compute actions dropped.
    Forwards and backwards (B or I) of a stage are numbered by occurrence, as the runtime runs
    them (torch 2.13's descriptive order of 1F1B numbers the last rank's forwards from 1)."""
    out = {}
    for rank, acts in order.items():
        seen: dict[tuple[int, str], int] = {}
        seq = []
        for a in acts:
            for sub in (a[1:a.index(")")].split(";") if a.startswith("(") else [a]):
                m = re.fullmatch(r"(\d+)([FBIW])(\d+)", sub)
                if not m:
                    continue
                stage, kind, mb = int(m[1]), m[2], int(m[3])
                if kind != "W":
                    key = (stage, "F" if kind == "F" else "B")
                    mb = seen[key] = seen.get(key, -1) + 1
                seq.append((stage, kind, mb))
        out[rank] = seq
    return out


def simulate(order: dict[int, list[str]], stages: int, duration) -> dict[str, Any]:
    """Run a planned order (``build_schedule_order``) on an ideal machine: every rank executes its
    actions in order, one at a time (an overlapped F&B as F then B, as torch runs it on CPU),
    communication free; a forward waits for the previous stage's forward of its micro-batch, a
    backward (B or I) for its own forward and the next stage's backward, W for its I.
    ``duration(stage, kind, mb)`` gives seconds (or units). Returns the per-rank idle time, busy time,
    the span (first action at 0) and the timeline (``events``, as ``instrument`` records them)."""
    seqs = planned_actions(order)
    done: dict[tuple[int, str, int], float] = {}
    pos, free, busy = {r: 0 for r in seqs}, {r: 0.0 for r in seqs}, {r: 0.0 for r in seqs}
    events: dict[int, list[dict]] = {r: [] for r in seqs}
    moved = True
    while moved:
        moved = False
        for r, seq in seqs.items():
            while pos[r] < len(seq):
                stage, kind, mb = seq[pos[r]]
                if kind == "F":
                    deps = [(stage - 1, "F", mb)] if stage else []
                elif kind in "BI":
                    deps = [(stage, "F", mb)] + ([(stage + 1, "B", mb)] if stage < stages - 1 else [])
                else:
                    deps = [(stage, "B", mb)]
                if any(d not in done for d in deps):
                    break
                start, took = max([free[r]] + [done[d] for d in deps]), duration(stage, kind, mb)
                free[r] = done[(stage, "B" if kind in "BI" else kind, mb)] = start + took
                busy[r] += took
                events[r].append({"stage": stage, "kind": kind, "mb": mb, "start": start, "end": start + took})
                pos[r] += 1
                moved = True
    if any(pos[r] < len(seq) for r, seq in seqs.items()):
        raise ValueError(f"the order deadlocks: stuck at {[(r, seq[pos[r]]) for r, seq in seqs.items() if pos[r] < len(seq)]}")
    span = max(free.values())
    return {"span": span, "busy": busy, "idle": {r: span - busy[r] for r in seqs}, "events": events}


UNITS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}     # the formulas' units: B = 2F, W = F, so I = B - W = F


def chrome_trace_of(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One Chrome trace of several schedules' steps: ``runs[name] = {"compute": {rank: events},
    "comm": {rank: [(start, end)]}}``. Process ``100 i + rank`` is schedule i's rank; compute
    events come from :func:`nanoseek.train.pipeline.chrome_trace` (thread = stage), comm waits on
    thread 1000, the idle gaps of the window on thread 1001; times in µs from each schedule's
    first compute action."""
    from nanoseek.train.pipeline import chrome_trace
    events: list[dict] = []
    for i, (name, run) in enumerate(runs.items()):
        compute = run["compute"]
        t0, t1 = window(compute)
        for e in chrome_trace(compute)["traceEvents"]:
            events.append({**e, "pid": 100 * i + e["pid"]})
        for rank, evs in compute.items():
            pid = 100 * i + rank
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{name} rank {rank}"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
            for s in sorted({e["stage"] for e in evs}):
                events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": s, "args": {"name": f"stage {s}"}})
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 1000, "args": {"name": "comm wait"}})
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 1001, "args": {"name": "idle"}})
            for a, b in run.get("comm", {}).get(rank, []):
                a, b = max(a, t0), min(b, t1)
                if b > a:
                    events.append({"name": "comm wait", "cat": "comm", "ph": "X", "pid": pid, "tid": 1000,
                                   "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6})
            for a, b in gaps(evs, t0, t1):
                events.append({"name": "idle", "cat": "idle", "ph": "X", "pid": pid, "tid": 1001,
                               "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def gaps(evs: list[dict], t0: float, t1: float) -> list[tuple[float, float]]:
    """The intervals of [t0, t1] not covered by ``evs``."""
    out, at = [], t0
    for e in sorted(evs, key=lambda e: e["start"]):
        if e["start"] > at:
            out.append((at, e["start"]))
        at = max(at, e["end"])
    if t1 > at:
        out.append((at, t1))
    return out


def plot(runs: dict[str, dict[str, Any]], table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """The schedules one above the other, one row per rank, boxes per action (see the docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    names = list(runs)
    pp = max(len(r["compute"]) for r in runs.values())
    spans = {n: window(runs[n]["compute"]) for n in names}
    xmax = max(t1 - t0 for t0, t1 in spans.values()) * 1e3
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 1.0 + 0.55 * pp * len(names) + 0.4 * len(names)),
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        t0, _ = spans[name]
        compute = runs[name]["compute"]
        for rank, evs in compute.items():
            y = pp - 1 - rank
            first = min((e["stage"] for e in evs), default=0)
            for a, b in runs[name].get("comm", {}).get(rank, []):
                a, b = max(a, t0), min(b, spans[name][1])
                if b > a:
                    ax.broken_barh([((a - t0) * 1e3, (b - a) * 1e3)], (y - 0.12, 0.24), color="#bbbbbb", lw=0)
            for e in evs:
                x, w = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
                alpha = 1.0 if e["stage"] == first else 0.55
                ax.broken_barh([(x, w)], (y - 0.4, 0.8), facecolor=COLOURS[e["kind"]], alpha=alpha,
                               edgecolor="black", lw=0.4)
                if w > xmax / 90:
                    ax.text(x + w / 2, y, str(e["mb"]), ha="center", va="center", fontsize=7)
        t = table[name]
        idle = ", ".join(f"{r['fraction']:.0%}" for r in t["measured"].values())
        ideal = ", ".join(f"{r['fraction']:.0%}" for r in t["order_measured"].values())
        ax.set_title(f"{name}, idle per rank (median of {t.get('steps', 1)} steps): {idle} measured, {ideal} for torch's "
                     f"order on an ideal machine; "
                     f"formula {t['formula']['formula'].split(',')[0]}: {t['formula']['fraction_measured']:.0%} "
                     f"(measured F/B/W), {t['formula']['fraction_units']:.0%} (B = 2F, W = F)", fontsize=8, loc="left")
        ax.set_yticks(range(pp))
        ax.set_yticklabels([f"rank {pp - 1 - y}" for y in range(pp)], fontsize=8)
        ax.set_ylim(-0.6, pp - 0.4)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, xmax * 1.01)
    axes[-1, 0].set_xlabel("ms from the step's first compute action (boxes labelled with the micro-batch)")
    handles = [Patch(facecolor=c, edgecolor="black", label=KIND_NAMES[k]) for k, c in COLOURS.items()]
    handles += [Patch(facecolor="#bbbbbb", label="waiting on send/recv"),
                Patch(facecolor="white", edgecolor="black", alpha=0.55, label="lighter: the rank's 2nd stage")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- the run (pp processes)
def build_config(layers: int, hidden: int, mtp: bool):
    from nanoseek.model import ModelConfig
    heads = max(1, hidden // 64)
    moe, top_k, shared = hidden // 2, 4, 1
    return ModelConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=(top_k + shared) * moe, moe_intermediate_size=moe,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
        n_routed_experts=16, n_shared_experts=shared, num_experts_per_tok=top_k, n_group=1, topk_group=1,
        first_k_dense_replace=1, num_nextn_predict_layers=1 if mtp else 0, max_position_embeddings=4096,
        rope_scaling=None, initializer_range=0.02).validate()


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import schedules as torch_schedules

    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.pipeline import PipelineParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm: list[tuple[float, float]] = []
    wait = torch_schedules._wait_batch_p2p

    def timed_wait(work):                       # the schedules' blocking waits on send/recv
        t = time.perf_counter()
        try:
            return wait(work)
        finally:
            if work:
                comm.append((t, time.perf_counter()))
    torch_schedules._wait_batch_p2p = timed_wait
    cfg = build_config(args["layers"], args["hidden"], args["mtp"])
    torch.manual_seed(0)
    full = DeepseekV3ForCausalLM(cfg)
    n = args["microbatches"]
    ids = torch.randint(0, cfg.vocab_size, (n, args["batch"], args["seq"] + 1), generator=torch.Generator().manual_seed(1))
    batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in ids]
    task = SimpleNamespace(lm_batch=None, mtp_lambda=0.3 if args["mtp"] else 0.0)
    pipes = {}
    for name in args["schedules"]:
        model = copy.deepcopy(full)
        pipe = PipelineParallel(name, world, rank, dist.group.WORLD, list(range(world)), torch.device("cpu"))
        pipe.split(model, task)
        pipes[name] = (model.train(), pipe)
    result: dict[str, list] = {name: [] for name in pipes}
    for step in range(args["warmup"] + args["steps"]):     # the schedules take turns: noise falls on all alike
        for name, (model, pipe) in pipes.items():
            model.zero_grad(set_to_none=True)
            dist.barrier()
            pipe.events, comm[:] = [], []
            pipe.forward_backward(batches, 1.0 / n)
            evs, pipe.events = pipe.events, None
            got = pipe.gather_events({"compute": evs, "comm": list(comm)})
            if step >= args["warmup"]:
                result[name].append({"compute": {r: g["compute"] for r, g in got.items()},
                                     "comm": {r: g["comm"] for r, g in got.items()}})
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_keys(run: dict) -> dict:
    return {k: {int(r): v for r, v in run[k].items()} for k in ("compute", "comm")}


def stage_durations(events_by_rank: dict[int, list[dict]]) -> dict[tuple[int, str], float]:
    """Median seconds per (stage, kind)."""
    by: dict[tuple[int, str], list[float]] = {}
    for evs in events_by_rank.values():
        for e in evs:
            by.setdefault((e["stage"], e["kind"]), []).append(e["end"] - e["start"])
    return {k: statistics.median(v) for k, v in by.items()}


def analyse(steps: list[dict], name: str, pp: int, microbatches: int) -> tuple[dict, dict]:
    """(the median-span step, its table row) for one schedule's recorded steps. The row: measured
    idle per rank (median over steps, spread = max - min), the median action durations, torch's
    planned order on an ideal machine (:func:`simulate`) in the formula's units and with the
    step's own action times (the bubble the schedule itself makes with these stages; the rest of
    the measured idle is communication and overhead), and the formula (:func:`formula`)."""
    from nanoseek.train.pipeline import build_schedule_order, num_stages, schedule_spec
    steps = [_int_keys(s) for s in steps]
    spans = [window(s["compute"])[1] - window(s["compute"])[0] for s in steps]
    shown = steps[sorted(range(len(steps)), key=lambda i: spans[i])[len(steps) // 2]]
    per_step = [measured_bubble(s["compute"]) for s in steps]
    waits = [{r: _union([(max(a, w[0]), min(b, w[1])) for a, b in s["comm"].get(r, []) if min(b, w[1]) > max(a, w[0])])
              for r in s["compute"]} for s, w in ((s, window(s["compute"])) for s in steps)]
    measured = {r: {"fraction": statistics.median(b[r]["fraction"] for b in per_step),
                    "comm": statistics.median(x[r] for x in waits),
                    "spread": max(b[r]["fraction"] for b in per_step) - min(b[r]["fraction"] for b in per_step),
                    "idle": statistics.median(b[r]["idle"] for b in per_step)} for r in per_step[0]}
    every = {r: [e for s in steps for e in s["compute"][r]] for r in steps[0]["compute"]}
    durations, per_stage = median_durations(every), stage_durations(every)
    order, S = build_schedule_order(name, pp, microbatches), num_stages(pp, schedule_spec(name))
    units = simulate(order, S, lambda st, k, mb: UNITS[k])
    planned = planned_actions(order)
    same_order = all([(e["stage"], e["kind"], e["mb"]) for e in sorted(evs, key=lambda e: e["start"])] == planned[r]
                     for s in steps for r, evs in s["compute"].items())
    ideal = []                                   # each step's own action times on an ideal machine
    for s in steps:
        took = {(e["stage"], e["kind"], e["mb"]): e["end"] - e["start"] for evs in s["compute"].values() for e in evs}
        ideal.append(simulate(order, S, lambda st, k, mb, took=took: took.get((st, k, mb), per_stage.get((st, k), 0.0))))
    row = {"measured": measured, "durations": durations, "span": statistics.median(spans), "same_order": same_order, "steps": len(steps),
           "span_spread": (max(spans) - min(spans)) / statistics.median(spans),
           "order_units": {"idle": units["idle"][0], "fraction": units["idle"][0] / units["span"]},
           "order_measured": {r: {"idle": statistics.median(x["idle"][r] for x in ideal),
                                  "fraction": statistics.median(x["idle"][r] / x["span"] for x in ideal)}
                              for r in ideal[0]["idle"]},
           "formula": formula(name, pp, microbatches, durations)}
    return shown, row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=2, help="pipeline ranks (processes)")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedules", default="dualpipev,1f1b", help="comma-separated [parallel] schedule names")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--mtp", action="store_true", help="with one MTP module (on the last stage: uneven stages)")
    ap.add_argument("--steps", type=int, default=3, help="recorded steps per schedule (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--png", type=Path, default=Path("pipeline-schedules.png"))
    ap.add_argument("--trace", type=Path, default=Path("pipeline-schedules.trace.json"))
    ap.add_argument("--json", type=Path, default=None, help="also write the table (and every step's events) here")
    args = ap.parse_args(argv)
    from nanoseek.errors import ConfigError
    from nanoseek.train.pipeline import check_microbatches, num_stages, schedule_spec
    names = [x.strip() for x in args.schedules.split(",") if x.strip()]
    try:
        for name in names:
            spec = schedule_spec(name)
            why = check_microbatches(spec, args.pp, args.microbatches)
            if why:
                raise ConfigError(f"--schedules {name} {why} (--microbatches {args.microbatches})")
            if num_stages(args.pp, spec) > args.layers:
                raise ConfigError(f"--schedules {name} with --pp {args.pp} makes {num_stages(args.pp, spec)} stages, "
                                  f"more than --layers {args.layers}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pp < 2 or args.steps < 1:
        print("error: --pp must be at least 2 and --steps at least 1", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raw = args.json.with_suffix(".events.json") if args.json else Path(f"/tmp/pipeline_timeline_{os.getpid()}.json")
    conf = {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "batch": args.batch, "mtp": args.mtp,
            "microbatches": args.microbatches, "schedules": names, "steps": args.steps, "warmup": args.warmup}
    t = time.perf_counter()
    mp.start_processes(_worker, args=(args.pp, _free_port(), conf, str(raw)), nprocs=args.pp, join=True,
                       start_method="spawn")
    wall = time.perf_counter() - t
    recorded = json.loads(raw.read_text())
    if not args.json:
        raw.unlink()
    shown, table = {}, {}
    for name in names:
        shown[name], table[name] = analyse(recorded[name], name, args.pp, args.microbatches)
    about = (f"pp {args.pp}, {args.microbatches} micro-batches of {args.batch} x {args.seq} tokens; model {args.layers} "
             f"layers, hidden {args.hidden}{', MTP' if args.mtp else ''}; gloo CPU processes, 1 thread each")
    print(f"{about}; {args.steps} recorded steps per schedule ({wall:.0f} s)")
    w = max(11, *(len(n) for n in names))
    print("idle: fraction of the step with no compute on the rank (median over steps; spread: max - min);")
    print("torch order: build_schedule_order's actions on an ideal machine (no communication, F&B run as F then B),")
    print("  with each step's own measured action times (median over steps)")
    print("comm ms: of the idle time, the time spent blocked in the schedules' send/recv waits")
    print(f"{'schedule':<{w}} {'rank':>4} {'measured':>9} {'spread':>7} {'idle ms':>8} {'comm ms':>8} | "
          f"{'torch order, measured durations':>31}")
    for name, row in table.items():
        for r, m in row["measured"].items():
            o = row["order_measured"][r]
            print(f"{name:<{w}} {r:>4} {m['fraction']:>9.1%} {m['spread']:>7.1%} {m['idle'] * 1e3:>8.1f} "
                  f"{m['comm'] * 1e3:>8.1f} | "
                  f"{o['fraction']:>19.1%} {o['idle'] * 1e3:>8.1f} ms")
    print(f"\n{'schedule':<{w}} {'formula (nanoseek.estimate.pipeline)':<47} {'units':>5} {'frac':>6} | "
          f"{'torch order':>11} {'frac':>6} | {'F ms':>6} {'B ms':>6} {'W ms':>6} {'formula ms':>10} {'frac':>6}")
    for name, row in table.items():
        f, u = row["formula"], row["order_units"]
        print(f"{name:<{w}} {f['formula']:<47} {f['units']:>5.2f} {f['fraction_units']:>6.1%} | {u['idle']:>11.2f} "
              f"{u['fraction']:>6.1%} | {f['F'] * 1e3:>6.1f} {f['B'] * 1e3:>6.1f} {f['W'] * 1e3:>6.1f} "
              f"{f['seconds'] * 1e3:>10.1f} {f['fraction_measured']:>6.1%}")
    print("units: one stage's forward F = 1, B = 2, W = 1 (two stages per rank: half-size stages); ms: measured medians")
    for name, row in table.items():
        print(f"{name}: executed order {'=' if row['same_order'] else 'DIFFERS from'} torch's planned order; "
              f"step {row['span'] * 1e3:.0f} ms median, spread {row['span_spread']:.0%} of it over steps; "
              f"action medians " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(row["durations"].items())))
    plot(shown, table, args.png, about)
    args.trace.write_text(json.dumps(chrome_trace_of(shown)))
    print(f"wrote {args.png} and {args.trace} (chrome://tracing or ui.perfetto.dev)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
