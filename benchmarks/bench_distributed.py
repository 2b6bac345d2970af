"""Scale-out throughput: the real trainer in 1 process and in 2 (data parallel, expert parallel).

    python benchmarks/bench_distributed.py                       # CPU (gloo), the bench-moe model
    python benchmarks/bench_distributed.py --json out.json       # also write the figures
    python benchmarks/bench_distributed.py --batch 16 --seq 128 --steps 8

Each setup runs ``nanoseek pretrain`` on synthetic data through its real entry point: the
2-process setups are launched with ``torchrun --nproc_per_node 2`` (gloo on CPU, NCCL with
``--device cuda`` and 2 GPUs). The global batch is the same in every setup (``--batch`` rows of
``--seq`` tokens per step: 2 processes take ``batch / 2`` rows each), so the setups do the same
work and the same optimizer steps (strong scaling). Figures per setup:

* tokens/s: global tokens per step / the median step time of rank 0 after ``--warmup`` steps
  (the step time includes the gradient all-reduce and the all-to-alls);
* all-to-all bytes per step: bytes the ranks sent to other ranks in the expert-parallel
  dispatch and combine, forward and backward (``nanoseek.model.expert_parallel.COMM``), summed
  over ranks, beside the uniform-routing expectation ``4 exchanges x tokens x top_k x (1 - 1/ep)
  x hidden x 4 bytes`` per MoE layer (a pair bound for an expert on another rank crosses once per
  exchange; the ranks exchange full fp32 rows, one per (token, expert) pair, no de-duplication);
* the gradient all-reduce volume of data parallel is not counted (it is a fixed 4 bytes per
  replicated parameter per step, reported as "dp bytes").

On a shared 2-core CPU two processes cannot beat one: they split the same two cores, add the
gloo collectives and run smaller, less efficient matmuls. The point of the CPU run is that the
code paths work and what they cost; the speed-up belongs to GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bench-moe", help="model preset (default bench-moe)")
    p.add_argument("--batch", type=int, default=8, help="global rows per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, needs 2 GPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--setups", default="1p,1p2t,dp2,ep2", help="which of 1p (1 process), 1p2t (1 process, "
                   "2 threads), dp2, ep2 (2 processes) to run (default all)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)    # internal: one run, under torchrun
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- one run (every rank)
def worker(args: argparse.Namespace) -> None:
    import torch

    from nanoseek.model.expert_parallel import COMM
    from nanoseek.train.config import load_config
    from nanoseek.train.distributed import rank_world
    from nanoseek.train.loop import Hook
    from nanoseek.train.pretrain import pretrain

    torch.set_num_threads(args.threads)
    out = Path(args.worker)
    spec = json.loads((out / "spec.json").read_text())

    class CommPerStep(Hook):
        def __init__(self):
            self.per_step, self.last = [], 0

        def after_step(self, trainer, applied):
            self.per_step.append(COMM.bytes_sent - self.last)
            self.last = COMM.bytes_sent
            return None

    cfg = load_config(args.config, spec["overrides"])
    hook = CommPerStep()
    pretrain(cfg, progress=False, quiet=True, hooks=[hook])
    rank, world = rank_world()
    (out / f"rank{rank}.json").write_text(json.dumps({"a2a_bytes": hook.per_step, "world": world}))


# ---------------------------------------------------------------------------- the setups
def run_setup(args: argparse.Namespace, name: str, procs: int, threads: int, ep: int, tmp: Path) -> dict:
    out = tmp / name
    out.mkdir()
    overrides = [f"optim.micro_batch_size={args.batch // procs}", f"optim.seq_len={args.seq}", "optim.grad_accum=1",
                 f"train.max_steps={args.warmup + args.steps}", "train.save_every=0", "train.eval_every=0",
                 "data.val_batches=0", f"train.device={args.device}", f"parallel.ep={ep}",
                 f"train.out_dir={out / 'run'}", "train.log_every=1"]
    (out / "spec.json").write_text(json.dumps({"overrides": overrides}))
    me = [str(Path(__file__).resolve()), "--worker", str(out), "--config", args.config, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NANOSEEK_NO_PROGRESS": "1"}
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(_free_port()), *me]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    from nanoseek.train.metrics import read_metrics, step_records
    steps = step_records(read_metrics(out / "run" / "metrics.jsonl"))
    timed = [steps[s] for s in sorted(steps) if s > args.warmup]
    step_time = statistics.median(r["step_time"] for r in timed)
    tokens = timed[0]["tokens"]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    a2a = [sum(r["a2a_bytes"][s] for r in ranks) for s in range(args.warmup, args.warmup + args.steps)]
    return {"setup": name, "processes": procs, "threads_per_process": threads, "ep": ep,
            "tokens_per_step": tokens, "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "a2a_bytes_per_step": statistics.median(a2a) if a2a else 0, "losses": [r["loss"] for r in timed]}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_a2a_bytes(args: argparse.Namespace, ep: int) -> float:
    """Uniform-routing expectation of the all-to-all bytes per step, summed over ranks."""
    from nanoseek.train.config import load_config
    cfg = load_config(args.config).model.build_config()
    moe_layers = cfg.num_moe_layers + (cfg.num_nextn_predict_layers if cfg.is_moe_layer(cfg.num_hidden_layers) else 0)
    pairs = args.batch * args.seq * cfg.num_experts_per_tok
    return 4 * moe_layers * pairs * (1 - 1 / ep) * cfg.hidden_size * 4


def dp_bytes(args: argparse.Namespace) -> int:
    """Gradient all-reduce payload per step per rank of plain data parallel (fp32)."""
    from nanoseek.model.transformer import DeepseekV3ForCausalLM
    from nanoseek.train.config import load_config
    import torch
    cfg = load_config(args.config).model.build_config()
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, init_weights=False)
    return 4 * sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.batch % 2:
        raise SystemExit("--batch must be even (2 processes take half each)")
    plan = {"1p": (1, args.threads, 1), "1p2t": (1, 2 * args.threads, 1), "dp2": (2, args.threads, 1),
            "ep2": (2, args.threads, 2)}
    wanted = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in wanted:
        if s not in plan:
            raise SystemExit(f"--setups: unknown setup {s!r}; choose from {', '.join(plan)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            procs, threads, ep = plan[name]
            print(f"running {name}: {procs} process(es) x {threads} thread(s), ep {ep} ...", flush=True)
            results.append(run_setup(args, name, procs, threads, ep, Path(tmp)))
    import torch
    print(f"\n{args.config}: global batch {args.batch} x {args.seq} tokens, device {args.device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; median of {args.steps} steps after {args.warmup}")
    print(f"{'setup':6s} {'procs':>5s} {'thr':>3s} {'ep':>3s} {'step s':>8s} {'tokens/s':>10s} "
          f"{'a2a bytes/step':>15s} {'uniform-routing estimate':>25s}")
    for r in results:
        est = expected_a2a_bytes(args, r["ep"]) if r["ep"] > 1 else 0
        r["a2a_bytes_estimate"] = est
        print(f"{r['setup']:6s} {r['processes']:5d} {r['threads_per_process']:3d} {r['ep']:3d} {r['step_time_s']:8.3f} "
              f"{r['tokens_per_s']:10.1f} {r['a2a_bytes_per_step']:15,.0f} {est:25,.0f}")
    dpb = dp_bytes(args)
    print(f"dp bytes: the gradient all-reduce of data parallel carries {dpb:,} bytes (fp32) per rank per step")
    same = [r["losses"] for r in results]
    spread = max(abs(a - b) / abs(b) for ls in same for a, b in zip(ls, same[0]))
    print(f"per-step losses of all setups agree within {spread:.1e} relative (same global batch)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "results": results, "dp_bytes": dpb, "loss_spread": spread},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
