"""Human-readable tables for ``nanoseek estimate`` (rich). Formatting only: every number printed
here is a field of :class:`~nanoseek.estimate.estimate.Estimate`, which ``--json`` prints whole."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .activations import TENSOR_KINDS
from .estimate import Estimate, fmt_si

_PARAM_ROWS = (("embedding", "embedding (input)"), ("attention", "attention"),
               ("indexer", "lightning indexer (V3.2 / V4)"), ("compressor", "KV compressors (V4)"),
               ("hyper_connections", "hyper-connections (V4)"),
               ("dense_mlp", "dense MLP"), ("router", "router (gate + bias)"),
               ("shared_experts", "shared experts"), ("routed_experts", "routed experts"),
               ("norms", "norms"), ("lm_head", "output head"))


def _int(n: float) -> str:
    return f"{int(round(n)):,}"


def _gb(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:,.2f} GB" if n >= 1e7 else fmt_si(n, "B")


def _num(x: float) -> str:
    """Commas for large numbers, 3 significant digits for small ones."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _bytes(n: float) -> str:
    return f"{int(round(n)):,} B" if n < 1e6 else fmt_si(n, "B")


def _table(title: str, *cols: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def print_report(est: Estimate, console: Console | None = None) -> None:
    if console is None:
        width = None if sys.stdout.isatty() else 150       # fixed when piped: docs/estimate.md regenerates
        console = Console(file=sys.stdout, width=width, highlight=False)
    p, tr, mem, inf, comm = est.params, est.training, est.memory, est.inference, est.communication
    g = est.gpu
    console.print(f"[bold]nanoseek estimate[/bold]: {est.model} on {g['name']} "
                  f"(BF16 {g['bf16_tflops']:g} / FP8 {g['fp8_tflops'] or 'n/a'} TFLOP/s dense, "
                  f"{g['hbm_gb']:g} GB at {g['hbm_tb_s']:g} TB/s, NVLink {g['nvlink_gb_s']:g} GB/s, "
                  f"network {g['network_gb_s']:g} GB/s)")

    t = _table("Parameters", "component", "total", "activated per token")
    for key, label in _PARAM_ROWS:
        if p.breakdown.get(key):
            t.add_row(label, _int(p.breakdown[key]), _int(p.active_breakdown[key]))
    t.add_row("[bold]total (without MTP)[/bold]", f"[bold]{_int(p.total)}[/bold]", f"[bold]{_int(p.active)}[/bold]")
    t.add_row("  without the input embedding", _int(p.total - p.breakdown["embedding"]),
              _int(p.active_without_embedding))
    if p.mtp:
        t.add_row("MTP modules (shared embedding/head)", _int(p.mtp), _int(p.active_breakdown["mtp"]))
        t.add_row("total with MTP", _int(p.total_with_mtp), "")
    console.print(t)

    t = _table("Training", "quantity", "value")
    fb = tr.flops_breakdown
    t.add_row("tokens", f"{fmt_si(tr.tokens)} ({tr.tokens:.4g})")
    indexer = f" + indexer {fb['indexer']:.4g}" if fb.get("indexer") else ""
    indexer += f" + compressors {fb['compressor']:.4g}" if fb.get("compressor") else ""
    indexer += f" + mHC mixing {fb['mixing']:.4g}" if fb.get("mixing") else ""
    t.add_row("FLOPs per token", f"{tr.flops_per_token:.4g} = 6N {fb['matmul']:.4g} + attention "
              f"{fb['attention']:.4g}{indexer} (seq {tr.seq_len}) + MTP {fb['mtp']:.4g}")
    t.add_row("total FLOPs", f"{tr.total_flops:.4g}")
    t.add_row("GPUs", f"{tr.gpus:,} x {tr.gpu}")
    t.add_row(f"MFU vs dense BF16 peak ({tr.mfu_source})",
              f"{tr.mfu:.1%} ({tr.achieved_tflops_per_gpu:,.0f} TFLOP/s per GPU)")
    if tr.mfu_vs_fp8_peak is not None:
        t.add_row("  same, vs dense FP8 peak", f"{tr.mfu_vs_fp8_peak:.1%}")
    t.add_row("GPU-hours", f"{_num(tr.gpu_hours)} ({fmt_si(tr.gpu_hours)}; "
              f"{fmt_si(tr.gpu_hours_per_trillion_tokens)} per trillion tokens)")
    t.add_row("wall-clock", f"{_num(tr.days)} days on {tr.gpus:,} GPUs")
    t.add_row("cost", f"${_num(tr.cost_usd)} at ${tr.price_per_gpu_hour:g}/GPU-hour")
    console.print(t)

    _memory(console, est)

    naive = (any(v.is_model and v.kv_heads is None for v in inf.variants)
             and any(v.name.startswith("MHA") for v in inf.variants))
    t = _table(f"Inference: KV cache ({inf.kv_format}) at {inf.context:,} tokens of context"
               f"{' (MHA row = the naive, non-absorbed MLA cache)' if naive else ''}; decode upper bound at "
               f"batch {inf.batch} on "
               f"{inf.serve_gpus} GPU(s) ({inf.serve_gpus_source}), weights {_gb(inf.weights_bytes)} at "
               f"{inf.weight_bytes_per_param:g} B/param",
               "attention", "KV B/token/layer", "KV B/token", "per request", "vs model",
               "max requests", "tokens/s", "bound", "$/M tokens")
    for v in inf.variants:
        name = f"[bold]{v.name} (this model)[/bold]" if v.is_model else v.name
        tps = "does not fit" if v.tokens_per_s is None else (
            f"{v.tokens_per_s:,.0f}" + (f" (batch {v.batch})" if v.batch < inf.batch else ""))
        t.add_row(name, _int(v.bytes_per_token_per_layer), _int(v.bytes_per_token),
                  fmt_si(v.bytes_per_request, "B"), f"{v.times_model:.2f}x", _int(v.max_requests),
                  tps, v.bound or "", "" if v.usd_per_million_tokens is None else _num(v.usd_per_million_tokens))
    console.print(t)
    _kv_by_kind(console, inf)
    _contexts(console, est)

    if comm is None:
        console.print("[bold]Expert-parallel all-to-all[/bold]: none (dense model or --ep 1)")
    else:
        _comm(console, comm)
    _comparison(console, est)


_PART_NAMES = {"latent": "latent", "rope_key": "rope key", "indexer_key": "indexer key",
               "keys": "keys", "values": "values"}


def _kv_by_kind(console: Console, inf) -> None:
    t = _table(f"KV cache by layer kind ({inf.kv_format}: {inf.kv_format_about})",
               "layer kind", "layers", "bytes per token per layer, by part", "B/token/layer", "B/token")
    for k in inf.kinds:
        parts = " + ".join(f"{_PART_NAMES.get(n, n)} {_num(b)}" for n, b in k.parts.items())
        if k.fixed_bytes_per_layer:
            parts += f"{' + ' if parts else ''}ring of {_num(k.fixed_bytes_per_layer)} B per request"
        t.add_row(k.kind, str(k.layers), parts, _num(k.bytes_per_token_per_layer), _num(k.bytes_per_token))
    if len(inf.kinds) > 1:
        t.add_row("[bold]all layers[/bold]", str(sum(k.layers for k in inf.kinds)), "", "",
                  _num(sum(k.bytes_per_token for k in inf.kinds)))
    console.print(t)


def _flops(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _tps(r, batch: int) -> str:
    if r.tokens_per_s is None:
        return "does not fit"
    return f"{r.tokens_per_s:,.0f}" + (f" (batch {r.batch})" if r.batch < batch else "")


def _contexts(console: Console, est: Estimate) -> None:
    if not est.contexts:
        return
    inf = est.inference
    t = _table(f"Attention per decoded token at each context: forward FLOPs of the core attention (absorbed "
               f"MLA), the indexer, all attention (with the projections' {_flops(est.contexts[0].projection_flops)})"
               f" and the whole model; KV cache ({inf.kv_format}); decode upper bound at batch {inf.batch} on "
               f"{inf.serve_gpus} GPU(s)",
               "context", "keys attended", "keys scored", "core", "indexer", "attention", "model",
               "KV/request", "KV read/step", "tokens/s", "$/M tokens")
    for r in est.contexts:
        t.add_row(f"{r.context:,}" + (" *" if r.beyond_max_position else ""),
                  " + ".join(_num(v) for v in r.keys_attended.values()),
                  " + ".join(_num(v) for v in r.keys_scored.values()),
                  _flops(r.core_flops), _flops(r.indexer_flops), _flops(r.attention_flops), _flops(r.model_flops),
                  fmt_si(r.kv_bytes_per_request, "B"), fmt_si(r.kv_read_bytes_per_step, "B"), _tps(r, inf.batch),
                  "" if r.usd_per_million_tokens is None else f"{r.usd_per_million_tokens:.3g}")
    console.print(t)
    if any(r.beyond_max_position for r in est.contexts):
        console.print(f"* beyond the config's max_position_embeddings "
                      f"({est.config['max_position_embeddings']:,}): arithmetic only")


def _comparison(console: Console, est: Estimate) -> None:
    if not est.compared:
        return
    inf = est.inference
    t = _table(f"Per decoded token, {est.model} against {', '.join(c.model for c in est.compared)} (forward FLOPs; "
               f"KV {inf.kv_format}; decode bound at batch {inf.batch} on the same {inf.serve_gpus} GPU(s)); "
               f"ratio = {est.model} / the other",
               "context", "model", "attention FLOPs", "core + indexer", "model FLOPs", "KV B/token",
               "KV read/step", "$/M tokens")
    t.columns[1].justify = "left"

    def row(ctx: str, name: str, r) -> None:
        t.add_row(ctx, name, _flops(r.attention_flops),
                  _flops(r.core_flops + r.indexer_flops + r.compressor_flops),
                  _flops(r.model_flops), _num(r.kv_bytes_per_token), fmt_si(r.kv_read_bytes_per_step, "B"),
                  "n/a" if r.usd_per_million_tokens is None else f"{r.usd_per_million_tokens:.3g}")

    for i, mine in enumerate(est.contexts):
        row(f"{mine.context:,}", est.model, mine)
        for c in est.compared:
            row("", c.model, c.contexts[i])
            usd = c.usd_ratio[i]
            t.add_row("", f"ratio to {c.model}", f"{c.attention_flops_ratio[i]:.3f}",
                      f"{c.core_and_indexer_flops_ratio[i]:.3f}", f"{c.model_flops_ratio[i]:.3f}",
                      f"{c.kv_bytes_ratio[i]:.3f}", f"{c.kv_read_ratio[i]:.3f}",
                      "n/a" if usd is None else f"{usd:.3f}", end_section=i < len(est.contexts) - 1)
    console.print(t)


def _comm(console: Console, comm) -> None:
    c = comm.chosen
    console.print(
        f"[bold]Expert-parallel all-to-all[/bold] (ep={c.ep}: {c.nodes} node(s) x {c.gpus_per_node} GPUs), "
        f"per token per MoE layer, forward: dispatch {c.top_k} x FP8 = {_int(c.dispatch_bytes)} B, "
        f"combine {c.top_k} x BF16 = {_int(c.combine_bytes)} B before de-duplication; "
        f"{c.nodes_per_token:.2f} destination node(s){' (node-limited routing)' if c.node_limited else ''}.")
    t = _table("All-to-all time vs the MoE layer's compute at the training MFU (same layout on each GPU)",
               "GPU", "network B", "NVLink B", "network us", "NVLink us", "compute us",
               "comm / compute", "training (fwd+bwd)")
    for e in comm.by_gpu:
        name = f"[bold]{e.gpu}[/bold]" if e.gpu == c.gpu else e.gpu
        t.add_row(name, _int(e.network_bytes_per_token), _int(e.nvlink_bytes_per_token),
                  f"{e.network_time_us:.3f}", f"{e.nvlink_time_us:.3f}", f"{e.compute_time_us:.3f}",
                  f"{e.comm_to_compute:.2f}", f"{e.train_comm_to_compute:.2f}")
    if not any(e.gpu == c.gpu for e in comm.by_gpu):
        t.add_row(f"[bold]{c.gpu}[/bold]", _int(c.network_bytes_per_token), _int(c.nvlink_bytes_per_token),
                  f"{c.network_time_us:.3f}", f"{c.nvlink_time_us:.3f}", f"{c.compute_time_us:.3f}",
                  f"{c.comm_to_compute:.2f}", f"{c.train_comm_to_compute:.2f}")
    console.print(t)


_KIND_LABELS = {**{k: t.label for k, t in TENSOR_KINDS.items()},
                "recompute_working_set": "recompute working set (one layer, one micro-batch)",
                "logits": "fp32 logits (one micro-batch)"}


def _memory(console: Console, est: Estimate) -> None:
    mem, tr = est.memory, est.training
    lay, sch, rec = mem.layout, mem.schedule, mem.recompute
    zero = "FSDP" if lay["zero"] == 3 else f"ZeRO-{lay['zero']}"
    pipe = "" if lay["pp"] == 1 else f", {sch['name']} schedule, {sch['micro_batches']} micro-batches"
    layers = mem.stage_layers
    t = _table(f"Training memory per GPU: dp={lay['dp']} pp={lay['pp']} ep={lay['ep']} {zero}{pipe}, "
               f"{mem.precision['name']} recipe ({mem.precision['bytes_per_param']:g} B/param), "
               f"micro-batch {lay['micro_batch']} x {tr.seq_len}, recompute {rec['mode']}; heaviest rank "
               f"{mem.stage} (layers {_ranges(layers)}{''.join(', ' + h for h in mem.stage_holds)})"
               + (f"; ESTIMATE ONLY, nanoseek cannot run it: {escape(mem.estimate_only)}" if mem.estimate_only else ""),
               "item", "per GPU")
    pr = mem.precision
    two = " (two stages, each also on the mirror rank)" if sch["param_copies"] > 1 else ""
    t.add_row(f"parameters held{two}", f"{fmt_si(mem.params_per_gpu)}")
    t.add_row(f"weights ({pr['weight_bytes']:g} B)", _gb(mem.weights_bytes))
    t.add_row(f"gradients ({pr['grad_bytes']:g} B)", _gb(mem.grads_bytes))
    t.add_row(f"master weights ({pr['master_bytes']:g} B)", _gb(mem.master_bytes))
    t.add_row(f"AdamW moments ({pr['moment_bytes']:g} B)", _gb(mem.moments_bytes))
    mbs = mem.tokens_in_flight / (lay["micro_batch"] * tr.seq_len)
    t.add_row(f"activations ({mbs:g} micro-batches in flight per stage held)",
              _gb(mem.activations_bytes))
    for k, b in sorted(mem.activation_kinds_bytes.items(), key=lambda kv: -kv[1]):
        if b:
            t.add_row(f"  {_KIND_LABELS.get(k, k)}", _gb(b))
    verdict = "" if mem.fits is None else (" fits" if mem.fits else f" does NOT fit in {_gb(mem.hbm_bytes)}")
    t.add_row("[bold]total[/bold]", f"[bold]{_gb(mem.total_bytes)}[/bold]{verdict}")
    t.add_row("activations kept per token, all layers", _bytes(mem.activation_bytes_per_token))
    if lay["pp"] > 1:
        t.add_row(f"pipeline bubble ({sch['bubble_formula']}; B = 2F + recompute, W = F)",
                  f"{sch['bubble_fraction']:.1%} of the step")
    t.add_row("recomputed forward FLOPs", f"{rec['recompute_flops_fraction']:.1%} of the forward "
              f"(step x{rec['step_time_factor']:.3f})")
    console.print(t)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 58, 59, 60] -> '0-2, 58-60'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out) or "none"


def print_layouts(found, *, cfg_name: str, gpu: str, gpus: int, seq_len: int, micro_batch: int,
                  precision: str, console: Console | None = None, top: int = 25) -> None:
    if console is None:
        width = None if sys.stdout.isatty() else 150
        console = Console(file=sys.stdout, width=width, highlight=False)
    if not found:
        console.print(f"[bold]No layout of {gpus:,} x {gpu} fits {cfg_name}[/bold] (micro-batch {micro_batch} x "
                      f"{seq_len}, {precision} recipe): add GPUs, or try --zero 3, --precision fp8 or a shorter --seq-len.")
        return
    shown = found[:top]
    why = list(dict.fromkeys(f.estimate_only for f in shown if f.estimate_only))     # in order, once each
    star = f"; * estimate only: nanoseek cannot run it ({len(why)} reason(s) below)" if why else ""
    t = _table(f"Layouts of {gpus:,} x {gpu} that fit {cfg_name} (micro-batch {micro_batch} x {seq_len}, "
               f"{precision} recipe), fastest first by bubble and recomputation; {len(found):,} fit"
               f"{f', the first {top} shown' if len(found) > top else ''}{star}",
               "dp", "pp", "ep", "schedule", "recompute", "micro-batches", "per GPU", "activations",
               "bubble", "recompute FLOPs", "time factor")
    for f in shown:
        mark = " *" if f.estimate_only else ""
        t.add_row(str(f.dp), str(f.pp), str(f.ep), f.schedule + mark, f.recompute, str(f.micro_batches),
                  _gb(f.total_bytes), _gb(f.activations_bytes), f"{f.bubble_fraction:.1%}",
                  f"{f.recompute_flops_fraction:.1%}", f"{f.time_factor:.3f}")
    console.print(t)
    for w in why:
        console.print(f"* estimate only: {escape(w)}", soft_wrap=True)
