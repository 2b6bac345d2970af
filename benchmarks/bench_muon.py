"""AdamW vs Muon at the same budget: validation loss after N steps of the same run, per learning rate.

    python benchmarks/bench_muon.py                              # tiny recipe, 200 steps, lr 1e-3 3e-3 1e-2
    python benchmarks/bench_muon.py --config bench-moe --steps 300 --lrs 3e-4 1e-3 3e-3 --device cuda
    python benchmarks/bench_muon.py --json out.json              # also write the figures

Every run is ``nanoseek pretrain`` of the recipe (same model init, seed, data stream and schedule)
with ``--set optim.optimizer=adamw|muon --set optim.lr=LR``, in this process one after the other;
Muon runs with nanoseek's defaults (update RMS matched to AdamW's, so the same lr and weight
decay apply: ``muon_adjust_lr = "match_rms_adamw"``). The figure is the validation loss at the end
(``data.val_batches`` batches) and the mean training loss of the last 10% of steps; the wall
time per step is printed for information only (Newton-Schulz runs in bf16, slow on CPUs that
emulate it). A comparison at one scale and one data set: a hint, not a verdict.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nanoseek.train.config import load_config
from nanoseek.train.metrics import read_metrics, step_records
from nanoseek.train.pretrain import pretrain


def run(config: str, optimizer: str, lr: float, steps: int, device: str, out: Path, extra: list[str]) -> dict:
    overrides = [f"optim.optimizer={optimizer}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
                 f"train.max_steps={steps}", f"train.out_dir={out}", f"train.device={device}",
                 "train.eval_every=0", f"train.save_every={steps}", *extra]
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    res = pretrain(cfg, progress=False, quiet=True)
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in step_records(read_metrics(out)).values()]
    tail = max(1, len(losses) // 10)
    return {"optimizer": optimizer, "lr": lr, "steps": res.step, "val_loss": res.last_eval.get("val_loss"),
            "train_loss_tail": sum(losses[-tail:]) / tail, "s_per_step": wall / max(res.step, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="a shipped recipe or a TOML path (default: tiny)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            for optimizer in ("adamw", "muon"):
                row = run(args.config, optimizer, lr, args.steps, args.device, Path(tmp) / f"{optimizer}-{lr}", args.set)
                rows.append(row)
                print(f"{optimizer:6s} lr {lr:<8g} val_loss {row['val_loss']:.4f}  train loss (last 10%) "
                      f"{row['train_loss_tail']:.4f}  {row['s_per_step'] * 1000:.0f} ms/step", flush=True)
    best = {o: min((r for r in rows if r["optimizer"] == o), key=lambda r: r["val_loss"]) for o in ("adamw", "muon")}
    print(f"best: AdamW {best['adamw']['val_loss']:.4f} (lr {best['adamw']['lr']:g}), "
          f"Muon {best['muon']['val_loss']:.4f} (lr {best['muon']['lr']:g}) after {args.steps} steps of {args.config}")
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "steps": args.steps, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
