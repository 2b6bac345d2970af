"""Activation recomputation on the CPU: what each ``[train] recompute`` mode keeps and what it costs.

    python benchmarks/bench_recompute.py                     # 4 layers, hidden 256, 2 x 512 tokens
    python benchmarks/bench_recompute.py --steps 8 --json out.json
    python benchmarks/bench_recompute.py --layers 6 --hidden 384 --seq 1024

One process builds one DeepSeek-V3-shaped model (MLA, a dense first layer then DeepSeekMoE layers,
one MTP module) and runs forward + backward of the same batch under ``none``, ``selective`` and
``full`` (``nanoseek.train.recompute``), the modes taking turns step by step so that machine noise
falls on all of them alike. Figures per mode:

* activation bytes: the storages created in the forward and still alive when it returns (what
  autograd, checkpoint regions and the selective cache hold for the backward, i.e. the activation
  peak of the step; ``held_activation_bytes``), for the decoder layers (per token per layer) and
  for the whole step (embeddings, final norm, logits and MTP included), beside the analytic count
  of ``nanoseek.estimate.activations`` for the layers;
* step time: the median time of forward + backward after one warm-up step, by default this
  process's CPU time (``--clock cpu``: with one thread it is the work done, much less disturbed by
  other jobs on a shared machine than ``--clock wall``);
* ratios to ``none``.

The model uses equal key and value head sizes, so the CPU's fused (flash) attention kernel runs,
as it does on GPUs; results are identical across modes (checked: the loss is compared exactly).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoseek.estimate.activations import MODES, activation_bytes_per_token  # noqa: E402
from nanoseek.model import DeepseekV3ForCausalLM, ModelConfig  # noqa: E402
from nanoseek.train.recompute import apply_recompute, held_activation_bytes  # noqa: E402


def build_config(layers: int, hidden: int) -> ModelConfig:
    heads = max(1, hidden // 64)
    return ModelConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096, rope_scaling=None,
        initializer_range=0.02).validate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="step time: process CPU time or wall time")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = build_config(args.layers, args.hidden)
    torch.manual_seed(0)
    base = DeepseekV3ForCausalLM(cfg)
    base.set_seq_aux_alpha(1e-4)
    models = {m: apply_recompute(copy.deepcopy(base), m) for m in MODES}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq

    def step(model):
        out = model(ids, labels=ids)
        return out.loss + 0.3 * out.mtp_loss + out.aux_loss

    figures, losses = {}, {}
    for mode, model in models.items():          # the memory figures (and one warm-up step)
        loss, held = held_activation_bytes(model, lambda: step(model))
        layers = sum(v for k, v in held.items() if k.startswith("model.layers."))
        figures[mode] = {"layer_bytes_per_token": layers / tokens / cfg.num_hidden_layers,
                         "analytic_bytes_per_token": sum(activation_bytes_per_token(cfg, i, 4, mode, kernels="eager")
                                                         for i in range(cfg.num_hidden_layers)) / cfg.num_hidden_layers,
                         "step_activation_bytes": sum(held.values()), "times": []}
        loss.backward()
        losses[mode] = loss.item()
        model.zero_grad(set_to_none=True)
    for _ in range(args.steps):                 # step times, the modes taking turns
        for mode, model in models.items():
            t0 = clock()
            step(model).backward()
            figures[mode]["times"].append(clock() - t0)
            model.zero_grad(set_to_none=True)
            for moe in model.moe_layers():
                moe.load.zero_()
    ref = figures["none"]
    print(f"model: {args.layers} layers (1 dense), hidden {args.hidden}, {cfg.num_attention_heads} heads, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, MTP 1; batch {args.batch} x {args.seq} "
          f"tokens, fp32, {args.threads} thread(s), {args.steps} timed steps, {args.clock} clock")
    print(f"{'mode':<10} {'layer B/token':>14} {'analytic':>9} {'kept':>6} {'step act. MB':>13} {'kept':>6} "
          f"{'step s':>8} {'time':>6}")
    for mode, f in figures.items():
        f["step_seconds"] = statistics.median(f.pop("times"))
        f["layer_fraction"] = f["layer_bytes_per_token"] / ref["layer_bytes_per_token"]
        f["step_fraction"] = f["step_activation_bytes"] / ref["step_activation_bytes"]
        f["time_ratio"] = f["step_seconds"] / ref["step_seconds"]
        print(f"{mode:<10} {f['layer_bytes_per_token']:>14,.0f} {f['analytic_bytes_per_token']:>9,.0f} "
              f"{f['layer_fraction']:>6.3f} {f['step_activation_bytes'] / 2**20:>13.1f} {f['step_fraction']:>6.3f} "
              f"{f['step_seconds']:>8.3f} {f['time_ratio']:>6.2f}x")
    same = len(set(losses.values())) == 1
    print(f"losses identical across modes: {same} ({losses['none']:.6f})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "figures": figures, "losses": losses}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
