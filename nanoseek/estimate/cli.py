"""``nanoseek estimate``: parameters, FLOPs, GPU-hours, cost, memory, KV cache and all-to-all.

Does the arithmetic behind the public numbers about DeepSeek-V3 (671B parameters, 37B activated,
2.788M H800 GPU-hours, $5.576M, a KV cache tens of times smaller than MHA, H800 vs H100) for any
config: a preset (deepseek-v3, deepseek-v3.2, deepseek-v4-pro, deepseek-v4-flash, deepseek-v2,
tiny, ...) or an HF config.json (DeepSeek-V2, V3, V3.2 or V4, by its model_type).

examples:
  nanoseek estimate --config deepseek-v3 --tokens 14.8T --gpu h800 --gpus 2048 \\
      --gpu-hours-per-trillion 180K --price 2 --pp 16 --ep 64 --zero 1 --schedule dualpipev \\
      --micro-batches 120 --recompute selective --precision fp8
  nanoseek estimate --config deepseek-v3 --gpu h100 --gpus 512 --layouts
  nanoseek estimate --config path/to/config.json --gpu h100 --gpus 64 --mfu 0.35 --json
  nanoseek estimate --config deepseek-v2-lite --gpu-spec my_gpu.toml --context 32768 --batch 16
  nanoseek estimate --config deepseek-v3.2 --compare deepseek-v3 --contexts 4K,128K,1M
  nanoseek estimate --config deepseek-v4-pro --compare deepseek-v3.2 --kv-dtype fp8-flashmla

With --gpu-hours (or --gpu-hours-per-trillion) the MFU they imply is solved for; otherwise
GPU-hours follow from --mfu (default 0.4). MFU is always against the dense BF16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses

from nanoseek import limits
import json
import sys
from pathlib import Path

GPU_NAMES = "a100, h100, h800, h20, h200, b200"
# nanoseek.estimate.pipeline.SCHEDULES' names that torch ships (not imported: `nanoseek --help` stays fast)
SCHEDULE_NAMES = "1f1b, gpipe, interleaved-1f1b, zbv, dualpipev"
# nanoseek.model.params.KV_FORMATS' names (not imported: `nanoseek --help` must not load torch)
KV_DTYPES = ("bf16", "fp32", "fp8", "bf16-fp8-index", "fp8-flashmla")


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--config", default="deepseek-v3", metavar="NAME_OR_PATH",
                   help="preset name (nanoseek/configs/models/NAME.json) or an HF config.json "
                        "file or checkpoint directory (default: deepseek-v3)")
    t = p.add_argument_group("training")
    t.add_argument("--tokens", metavar="N",
                   help="training tokens, with K/M/B/T suffixes, e.g. 14.8T "
                        "(default: 20 per activated parameter)")
    t.add_argument("--seq-len", type=limits.positive_int,
                   help="training sequence length for the attention FLOPs and activations "
                        "(default: 4096, V3's, or max_position_embeddings if smaller)")
    t.add_argument("--gpu", default="h800", metavar="NAME", help=f"built-in GPU: {GPU_NAMES} (default h800)")
    t.add_argument("--gpu-spec", metavar="FILE",
                   help="another accelerator, JSON or TOML with fields name, bf16_tflops, hbm_gb, "
                        "hbm_tb_s, nvlink_gb_s (both directions), network_gb_s (one direction), and "
                        "optionally fp8_tflops, gpus_per_node (8), source")
    t.add_argument("--gpus", type=limits.positive_int,
                   help="training GPUs (default: dp x pp, with dp 8 when --dp is not given)")
    t.add_argument("--mfu", type=limits.open_prob,
                   help="model FLOPs utilisation against the dense BF16 peak (default 0.4)")
    t.add_argument("--gpu-hours", metavar="N",
                   help="total GPU-hours of the run (e.g. 2.664M): solve for the MFU they imply")
    t.add_argument("--gpu-hours-per-trillion", metavar="N",
                   help="GPU-hours per trillion tokens (e.g. 180K, DeepSeek-V3's figure): solve for the MFU")
    t.add_argument("--price", type=limits.nonneg_float, default=2.0,
                   help="dollars per GPU-hour (default 2.0, the V3 report's)")
    t.add_argument("--no-mtp", action="store_true",
                   help="leave the multi-token-prediction modules out of the training FLOPs and memory")
    lay = p.add_argument_group("parallel layout and memory")
    lay.add_argument("--dp", type=limits.positive_int, help="data-parallel size (default: GPUs / pp)")
    lay.add_argument("--pp", type=limits.positive_int, default=1, help="pipeline ranks, GPUs along the pipeline (default 1); the schedule "
                                                              "puts one or two stages on each")
    lay.add_argument("--ep", type=limits.positive_int,
                     help="expert-parallel size, carved out of dp (default: the largest divisor of dp "
                          "and the expert count that fits in one node)")
    lay.add_argument("--zero", type=limits.nonneg_int, choices=(0, 1, 2, 3), default=1,
                     help="ZeRO stage over the data-parallel group: 1 shards optimizer state (default, "
                          "as DeepSeek-V3), 2 also gradients, 3 also weights (FSDP)")
    lay.add_argument("--fsdp", action="store_true", help="same as --zero 3")
    lay.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                     help="training memory recipe: bf16 = 2+4+4+8 bytes/param; fp8 = the V3 report's "
                          "1+4+4+4 (fp8 weights, fp32 grads and master, bf16 AdamW moments), and "
                          "its FP8 activation caching (Linear inputs in FP8, SwiGLU output recomputed)")
    lay.add_argument("--micro-batch", type=limits.positive_int, default=1, help="sequences per micro-batch (default 1)")
    lay.add_argument("--recompute", nargs="?", const="full", default="none", metavar="MODE",
                     help="activation recomputation, as [train] recompute: none (default), selective "
                          "(DeepSeek-V3's: RMSNorm outputs and the MLA up-projections recomputed in the "
                          "backward) or full (only each layer's input kept); --recompute alone is full")
    lay.add_argument("--schedule", metavar="NAME",
                     help=f"pipeline schedule with --pp > 1, as [parallel] schedule: {SCHEDULE_NAMES} "
                          f"(torch.distributed.pipelining's), or dualpipe (DeepSeek-V3's bidirectional "
                          f"schedule, twice the parameters per rank; estimate only) (default 1f1b)")
    lay.add_argument("--micro-batches", type=limits.positive_int, metavar="M",
                     help="micro-batches per step through each pipeline, for the bubble and GPipe's "
                          "activations (default 4 x pp, at least the schedule's minimum)")
    lay.add_argument("--estimate-only", action="store_true",
                     help="price a layout nanoseek's trainer refuses (pipeline stages under FSDP or for "
                          "V3.2 / V4, recomputation for V4): the report marks it ESTIMATE ONLY; without "
                          "this flag such a layout is refused, as the trainer would")
    lay.add_argument("--layouts", action="store_true",
                     help="search layouts instead: every pp (a divisor of --gpus), ep, schedule and "
                          "recompute mode at this --gpus, --zero, --precision and --micro-batch; print "
                          "those that fit the GPU, fastest first (bubble and recomputation)")
    inf = p.add_argument_group("inference")
    inf.add_argument("--context", type=limits.positive_int,
                     help="tokens of context per request (default: min(max_position_embeddings, 131072))")
    inf.add_argument("--batch", type=limits.positive_int, default=64, help="concurrent requests decoding (default 64)")
    inf.add_argument("--serve-gpus", type=limits.positive_int,
                     help="GPUs serving one model replica (default: smallest power of two that fits)")
    inf.add_argument("--kv-dtype", choices=KV_DTYPES, default="bf16",
                     help="how the KV cache stores each value: bf16 or fp32 (nanoseek's own cache, every "
                          "part in the model's dtype), fp8 (one byte per value, scales not counted), "
                          "bf16-fp8-index (DeepSeek-V3.2's inference code: latent and rope key in bf16, "
                          "indexer key in FP8 with an fp32 scale per 128 values), fp8-flashmla (FlashMLA's "
                          "FP8 sparse decode cache, 656 B per MLA entry, and the FP8 indexer key) "
                          "(default bf16)")
    inf.add_argument("--contexts", default="4K,128K,1M", metavar="LIST",
                     help="context lengths of the attention-per-token table, comma-separated, "
                          "K = 1,024 and M = 1,048,576 (default 4K,128K,1M)")
    inf.add_argument("--compare", action="append", metavar="NAME_OR_PATH",
                     help="another preset or config.json whose per-token attention cost and KV cache go "
                          "beside this model's at the same contexts and serving GPUs; repeatable "
                          "(e.g. --config deepseek-v3.2 --compare deepseek-v3)")
    inf.add_argument("--infer-dtype", choices=("auto", "bf16", "fp8"), default="auto",
                     help="weight dtype when serving (default: fp8 if the config ships FP8, else bf16)")
    inf.add_argument("--gqa-groups", type=limits.positive_int,
                     help="KV heads of the GQA comparison row (default 8 when it divides the heads)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of tables")


def load_config(name_or_path: str):
    """Load a preset or config.json (or a checkpoint directory's), of the family its ``model_type``
    names (:mod:`nanoseek.model.registry`; the estimate's reading: :func:`.family.family_for_dict`).
    A typo (unknown field), a bad value or a missing size field is a UserError naming the file and
    the field."""
    from nanoseek.errors import ConfigError, UserError
    from nanoseek.model.config_fields import config_file, preset_or_path, read_json
    from .family import family_for_dict

    p = Path(name_or_path)
    if p.is_dir() and not (p / "config.json").exists():   # a run folder: the model its checkpoints hold
        held = [d for d in (p / "final", p / "model", p / "hf") if (d / "config.json").is_file()]
        held += sorted(d for d in p.glob("checkpoints/step-*") if (d / "config.json").is_file())[-1:]
        if not held:
            raise UserError(f"--config {p}: a directory with no config.json, and not a run folder (no "
                            f"final/config.json or checkpoints/step-*/config.json)")
        name_or_path = held[0]
    try:
        path = config_file(preset_or_path(name_or_path))
        d = read_json(path)
        family = family_for_dict(d, str(path))
        missing = family.missing_fields(d)
        if missing:
            raise UserError(f"{path}: missing field(s) {', '.join(repr(k) for k in missing)}; the "
                            f"estimate would otherwise use DeepSeek-V3's defaults (e.g. hidden_size "
                            f"7168). Write them in the config.")
        return family.config_class.from_dict(d, source=str(path))
    except ConfigError as e:
        raise UserError(str(e)) from None


def _resolve(args, cfg, gpu):
    from nanoseek.errors import UserError
    from .memory import Layout

    pp = args.pp
    if pp < 1:
        raise UserError(f"--pp must be >= 1, got {pp}")
    if args.dp is not None:
        dp = args.dp
        if args.gpus is not None and dp * pp != args.gpus:
            raise UserError(f"--dp {dp} x --pp {pp} = {dp * pp} GPUs, but --gpus is {args.gpus}")
    else:
        gpus = args.gpus if args.gpus is not None else 8 * pp
        if gpus < 1 or gpus % pp:
            raise UserError(f"--gpus {gpus} is not a multiple of --pp {pp}")
        dp = gpus // pp
    ep = args.ep
    if ep is None:
        ep = 1
        if cfg.n_routed_experts and cfg.num_moe_layers:
            ep = max(e for e in range(1, gpu.gpus_per_node + 1)
                     if dp % e == 0 and cfg.n_routed_experts % e == 0)
    from .activations import MODES
    if args.recompute not in MODES:
        raise UserError(f"--recompute: unknown mode '{args.recompute}'; choose from {', '.join(MODES)}")
    from .pipeline import DEFAULT_SCHEDULE, SCHEDULES
    schedule = args.schedule or DEFAULT_SCHEDULE
    if schedule not in SCHEDULES:
        raise UserError(f"--schedule: unknown schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")
    if args.schedule and pp == 1 and not args.layouts:
        raise UserError(f"--schedule {schedule} needs a pipeline: give --pp > 1")
    if args.micro_batches is not None and pp == 1:
        raise UserError(f"--micro-batches {args.micro_batches} needs a pipeline (they are the micro-batches "
                        f"through its stages): give --pp > 1")
    layout = Layout(dp=dp, pp=pp, ep=ep, zero=3 if args.fsdp else args.zero,
                    micro_batch=args.micro_batch, recompute=args.recompute, schedule=schedule,
                    micro_batches=args.micro_batches)
    from .memory import trainer_refusal
    layout.validate(cfg)                # what the estimate cannot price at all comes first
    why = trainer_refusal(cfg, layout)
    if why and not args.estimate_only:
        raise UserError(f"this layout: {why}; give --estimate-only to price it anyway")
    return layout


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError
    from .estimate import estimate, parse_contexts, parse_count
    from .flops import EstimateError
    from .gpus import GPUSpecError, get_gpu, load_gpu_spec

    cfg = load_config(args.config)
    compare_with = {name: load_config(name) for name in args.compare or []}
    try:
        contexts = parse_contexts(args.contexts, "--contexts")
        gpu = load_gpu_spec(args.gpu_spec) if args.gpu_spec else get_gpu(args.gpu)
        tokens = parse_count(args.tokens, "--tokens") if args.tokens is not None else None
        gpu_hours = parse_count(args.gpu_hours, "--gpu-hours") if args.gpu_hours is not None else None
        if args.gpu_hours_per_trillion is not None:
            if gpu_hours is not None:
                raise UserError("give --gpu-hours or --gpu-hours-per-trillion, not both")
            if tokens is None:
                raise UserError("--gpu-hours-per-trillion needs --tokens")
            gpu_hours = parse_count(args.gpu_hours_per_trillion, "--gpu-hours-per-trillion") * tokens / 1e12
        seq_len = args.seq_len if args.seq_len is not None else min(4096, cfg.max_position_embeddings)
        if args.layouts:
            return _layouts(args, cfg, gpu, seq_len)
        layout = _resolve(args, cfg, gpu)
        est = estimate(
            cfg, gpu, model_name=str(args.config), tokens=tokens, seq_len=seq_len, mfu=args.mfu,
            gpu_hours=gpu_hours, price=args.price, include_mtp=not args.no_mtp, layout=layout,
            precision=args.precision, context=args.context, batch=args.batch,
            serve_gpus=args.serve_gpus, kv_format=args.kv_dtype,
            infer_weight_bytes={"auto": None, "bf16": 2.0, "fp8": 1.0}[args.infer_dtype],
            gqa_groups=args.gqa_groups, contexts=contexts, compare_with=compare_with)
    except (EstimateError, GPUSpecError) as e:
        raise UserError(str(e)) from None
    if args.json:
        json.dump(est.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from .report import print_report
        print_report(est)
    return 0


def _layouts(args, cfg, gpu, seq_len: int) -> int:
    """``--layouts``: every layout at --gpus that fits, fastest first (:func:`.search.search_layouts`)."""
    from nanoseek.errors import UserError
    from .search import search_layouts

    if args.pp != 1 or args.ep is not None or args.dp is not None or args.schedule:
        raise UserError("--layouts searches pp, ep, schedule and recompute itself: give --gpus (and "
                        "optionally --zero, --precision, --micro-batch, --micro-batches), not --pp/--ep/--dp/--schedule")
    if args.recompute != "none":
        raise UserError("--layouts tries every --recompute mode itself: leave --recompute out")
    if args.estimate_only:
        raise UserError("--layouts lists the layouts nanoseek cannot run too, marked *: leave --estimate-only out")
    gpus = args.gpus if args.gpus is not None else 8
    found = search_layouts(cfg, gpu, gpus, zero=3 if args.fsdp else args.zero, precision=args.precision,
                           micro_batch=args.micro_batch, micro_batches=args.micro_batches, seq_len=seq_len,
                           include_mtp=not args.no_mtp)
    if args.json:
        json.dump([dataclasses.asdict(f) for f in found], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from .report import print_layouts
        print_layouts(found, cfg_name=str(args.config), gpu=gpu.name, gpus=gpus, seq_len=seq_len,
                      micro_batch=args.micro_batch, precision=args.precision)
    return 0
