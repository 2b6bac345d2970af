"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the bench-moe config.

    python benchmarks/bench_train.py                     # CPU, fp32 (+ bf16 where the CPU has it)
    python benchmarks/bench_train.py --device cuda       # on a GPU: fp32 and bf16 autocast
    python benchmarks/bench_train.py --json out.json     # also write the figures

Both sides train the same weights (ours saved with ``save_pretrained``, loaded by
``transformers.DeepseekV3ForCausalLM.from_pretrained``) on the same synthetic batches of 8 x 256
tokens: one step = forward with labels + backward + AdamW (betas 0.9/0.95, weight decay 0.1) +
zero_grad, and for nanoseek the aux-loss-free bias update. Our MTP module is switched off for
the comparison (transformers has none, so the two do the same work); "nanoseek+MTP" is the
real pre-training step, reported beside it. transformers runs with its SDPA attention and
each experts implementation it offers ("eager" loop, "grouped_mm"); its fastest counts.

Steps of the two sides alternate (ours, theirs, ours, ...) so load from other processes hits
both alike; the figure per side is the median step time. MFU = tokens/s x model FLOPs per token
(``nanoseek.estimate``: 6 x activated non-embedding parameters + attention) / the matmul peak
measured here in the same precision.

Precision: bf16 figures count only if (a) the device multiplies in bf16 at least half as fast as
in fp32 (CPUs without native bf16 emulate it ~50x slower, where fp32 is the best precision for
both sides and bf16 is skipped unless ``--force-bf16``) and (b) our bf16 loss curve matches the
fp32 one within noise over ``--curve-steps`` steps from the same initialisation.

Finally torch.profiler tables of one step of nanoseek and of the fastest transformers setup
(top 15 operators by self time) show where the time goes, and the matmul share bounds the
ratio: both sides run the same matmuls, so nanoseek / transformers <= transformers' step time /
nanoseek's matmul time however much other overhead nanoseek removes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.estimate.flops import flops_per_token
from nanoseek.model.checkpoint import save_pretrained
from nanoseek.model.config import load_model_config
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.train.metrics import measure_matmul_peak
from nanoseek.train.synthetic import SyntheticLoader


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bench-moe", help="model preset (default bench-moe)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    p.add_argument("--curve-steps", type=int, default=12, help="steps of the bf16-vs-fp32 loss check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where the device emulates it")
    p.add_argument("--hf-experts", default="eager,grouped_mm",
                   help="transformers experts implementations to try (comma-separated)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p.parse_args()


class Side:
    """One model with its optimizer; ``step(x, y)`` is a timed training step."""

    def __init__(self, name: str, model, device, dtype: str, kind: str):
        self.name, self.model, self.device, self.dtype, self.kind = name, model.to(device).train(), device, dtype, kind
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                                     weight_decay=0.1, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        self.times: list[float] = []

    def autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, x, y):
        with self.autocast():
            out = self.model(x, labels=y)
        if self.kind == "hf":
            return out.loss
        loss = out.loss
        if out.mtp_loss is not None:
            loss = loss + 0.3 * out.mtp_loss
        return loss

    def step(self, x, y) -> tuple[float, float]:
        sync(self.device)
        t0 = time.perf_counter()
        loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "ours":
            self.model.update_expert_bias(0.001)
        sync(self.device)
        dt = time.perf_counter() - t0
        return dt, float(loss.detach())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(vocab: int, batch: int, seq: int, device, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = SyntheticLoader(vocab, batch, seq, seed=0)
    return [tuple(t.to(device) for t in next(loader)[:2]) for _ in range(n)]


def build_sides(args, device, dtype: str, ckpt: Path, mtp_too: bool) -> list[Side]:
    import transformers
    from nanoseek.model.checkpoint import from_pretrained

    sides = []
    ours = from_pretrained(ckpt)
    ours.use_mtp = False
    sides.append(Side("nanoseek", ours, device, dtype, "ours"))
    if mtp_too:
        sides.append(Side("nanoseek+MTP", from_pretrained(ckpt), device, dtype, "ours"))
    for impl in [s for s in args.hf_experts.split(",") if s]:
        with warnings_quiet():
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                                    attn_implementation="sdpa",
                                                                    experts_implementation=impl)
        sides.append(Side(f"transformers[{impl}]", hf, device, dtype, "hf"))
    return sides


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    transformers.logging.set_verbosity(level)


def time_sides(sides: list[Side], data, warmup: int, steps: int) -> None:
    for i in range(warmup):
        for s in sides:
            s.step(*data[i % len(data)])
    for i in range(steps):
        for s in sides:                                   # interleaved: background load hits all alike
            dt, _ = s.step(*data[(warmup + i) % len(data)])
            s.times.append(dt)


def loss_curve(ckpt: Path, device, dtype: str, data) -> list[float]:
    from nanoseek.model.checkpoint import from_pretrained
    model = from_pretrained(ckpt)
    side = Side("curve", model, device, dtype, "ours")
    return [side.step(x, y)[1] for x, y in data]


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")


def profile_step(side: Side, data, device, tries: int = 2) -> tuple[str, float, float]:
    """(top-15 table, total self time s, self time in matmul kernels s) of one training step,
    the least disturbed (shortest) of ``tries`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile
    side.step(*data[0])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    best = None
    for i in range(tries):
        with profile(activities=acts) as prof:
            side.step(*data[1 + i % (len(data) - 1)])
        avg = prof.key_averages()
        total = sum(getattr(e, attr) for e in avg) / 1e6
        if best is None or total < best[1]:
            mm = sum(getattr(e, attr) for e in avg if e.key in MATMUL_OPS) / 1e6
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            best = (avg.table(sort_by=key, row_limit=15), total, mm)
    return best


def print_profiles(args, device, ckpt: Path, data, ours: dict, theirs: dict, results: dict) -> None:
    """Operator tables of one step of each side, and what the matmul share says about the 2x target."""
    impl = theirs["side"][len("transformers["):-1]
    ns = argparse.Namespace(hf_experts=impl)
    mine = build_sides(argparse.Namespace(hf_experts=""), device, ours["dtype"], ckpt, mtp_too=False)[0]
    hf = [s for s in build_sides(ns, device, theirs["dtype"], ckpt, mtp_too=False) if s.kind == "hf"][0]
    prof = {}
    for label, side in (("nanoseek", mine), (theirs["side"], hf)):
        table, total, mm = profile_step(side, data, device)
        prof[label] = {"total_s": total, "matmul_s": mm, "table": table}
        print(f"\n# one {label} step ({side.dtype}): top 15 operators by self time "
              f"({mm:.2f} s of {total:.2f} s, {100 * mm / total:.0f}%, in matmuls)")
        print(table)
    a, b = prof["nanoseek"], prof[theirs["side"]]
    mm = min(a["matmul_s"], b["matmul_s"])         # the same matmul FLOPs: the faster reading is the less disturbed
    bound = b["total_s"] / mm if mm else float("nan")
    print(f"# both sides run the same matmul FLOPs (measured {a['matmul_s']:.2f} s vs {b['matmul_s']:.2f} s of matmul "
          f"self time); non-matmul time: nanoseek {a['total_s'] - a['matmul_s']:.2f} s, transformers "
          f"{b['total_s'] - b['matmul_s']:.2f} s."
          f"\n# Even with zero non-matmul time, nanoseek / transformers <= {bound:.2f}x in this precision: "
          + ("the 2x target needs fewer or faster matmuls (lower precision, fused kernels), not less overhead."
             if bound < 2 else "the 2x target is reachable by cutting non-matmul (elementwise, routing, copy) time."))
    results["profile"] = prof
    results["ratio_bound_zero_overhead"] = bound


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_model_config(args.config)
    B, T = args.batch, args.seq
    tokens = B * T
    fpt = flops_per_token(cfg, T, include_mtp=False)
    fpt_mtp = flops_per_token(cfg, T, include_mtp=True)
    peak = {d: measure_matmul_peak(str(device), d) for d in ("float32", "bfloat16")}
    print(f"# bench_train: {args.config} (vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}), batch {B} x {T} = {tokens} tokens/step")
    print(f"# device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"matmul peak fp32 {peak['float32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/token {fpt / 1e6:.2f} M ({fpt_mtp / 1e6:.2f} M with MTP)")
    dtypes = ["float32"]
    bf16_note = ""
    if peak["bfloat16"] >= 0.5 * peak["float32"] or args.force_bf16:
        dtypes.append("bfloat16")
    else:
        bf16_note = (f"bf16 skipped: this device multiplies bf16 at {peak['bfloat16'] / 1e9:.2f} GFLOP/s vs "
                     f"{peak['float32'] / 1e9:.1f} in fp32 (emulated), so fp32 is the best precision for both sides")
        print(f"# {bf16_note}")

    results: dict = {"config": args.config, "batch": B, "seq": T, "device": str(device), "peak_flops": peak,
                     "flops_per_token": fpt, "runs": [], "bf16_note": bf16_note}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(cfg)
        ckpt = save_pretrained(model, Path(tmp) / "bench")
        data = batches(cfg.vocab_size, B, T, device, max(args.warmup + args.steps, args.curve_steps))

        # same weights on both sides: their initial losses agree
        sides = build_sides(args, device, "float32", ckpt, mtp_too=False)
        with torch.no_grad():
            l0 = [float(s.loss(*data[0])) for s in sides]
        print("# initial loss: " + ", ".join(f"{s.name} {v:.5f}" for s, v in zip(sides, l0)))
        del sides

        if "bfloat16" in dtypes:
            c32 = loss_curve(ckpt, device, "float32", data[:args.curve_steps])
            c16 = loss_curve(ckpt, device, "bfloat16", data[:args.curve_steps])
            rel = [abs(a - b) / a for a, b in zip(c32, c16)]
            drop = c32[0] - c32[-1]
            ok = max(abs(a - b) for a, b in zip(c32, c16)) < max(0.05 * drop, 0.02)
            print(f"# bf16 vs fp32 loss curve over {args.curve_steps} steps: max relative diff {max(rel):.4f}, "
                  f"fp32 {c32[0]:.4f} -> {c32[-1]:.4f}, bf16 {c16[0]:.4f} -> {c16[-1]:.4f}: "
                  f"{'matches within noise' if ok else 'DOES NOT MATCH: bf16 figures not claimed'}")
            results["bf16_curve"] = {"fp32": c32, "bf16": c16, "match": ok}
            if not ok:
                dtypes.remove("bfloat16")

        print(f"\n{'side':26s} {'precision':9s} {'step s':>8s} {'tokens/s':>10s} {'MFU':>7s}")
        for dtype in dtypes:
            sides = build_sides(args, device, dtype, ckpt, mtp_too=True)
            time_sides(sides, data, args.warmup, args.steps)
            for s in sides:
                med = statistics.median(s.times)
                f = fpt_mtp if s.name.endswith("MTP") else fpt
                row = {"side": s.name, "dtype": dtype, "step_s": med, "tokens_per_s": tokens / med,
                       "mfu": tokens / med * f / peak[dtype], "times": s.times}
                results["runs"].append(row)
                print(f"{s.name:26s} {dtype:9s} {med:8.3f} {row['tokens_per_s']:10.1f} {100 * row['mfu']:6.2f}%")
            del sides

        best = lambda pred: max((r for r in results["runs"] if pred(r["side"])), key=lambda r: r["tokens_per_s"])
        ours, theirs = best(lambda s: s == "nanoseek"), best(lambda s: s.startswith("transformers"))
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        results["ratio"] = ratio
        print(f"\nratio nanoseek / transformers (best precision and implementation each): {ratio:.2f}x "
              f"(nanoseek {ours['dtype']} {ours['tokens_per_s']:.1f} tok/s vs {theirs['side']} {theirs['dtype']} "
              f"{theirs['tokens_per_s']:.1f} tok/s; target >= 2x)")

        if not args.no_profile:
            print_profiles(args, device, ckpt, data, ours, theirs, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
