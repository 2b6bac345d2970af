"""DeepSeek-V3, V3.2 and V4 side by side at long context, against DeepSeek's published claims.

Renders the markdown tables of ``docs/estimate.md`` (section "DeepSeek-V4 against V3.2 and V3"):
per decoded token at 4K / 128K / 1M tokens of context, each preset's attention FLOPs, whole-model
FLOPs and KV-cache bytes (from :func:`.inference.context_costs`, so from the layer-kind registry
of :mod:`.attention`), in two KV formats, and each claim of :data:`CLAIMS` with the estimated ratio
and estimate / claim. ``python -m nanoseek.estimate.generations`` prints them; a test checks the
docs hold exactly this output.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import DEFAULT_CONTEXTS
from .gpus import get_gpu
from .inference import ContextCost, context_costs

MODELS = ("deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro")
BASE = "deepseek-v3.2"
# (name, what the format stores) -- nanoseek's / transformers' cache, and DeepSeek's FP8 serving format
FORMATS = ("bf16", "fp8-flashmla")


@dataclass(frozen=True)
class Claim:
    text: str
    source: str
    model: str
    base: str
    context: int
    quantity: str               # a ContextCost field
    claimed: float


CLAIMS = (
    Claim("V4-Pro at 1M tokens: 27% of V3.2's single-token inference FLOPs", "DeepSeek-V4 model card",
          "deepseek-v4-pro", BASE, 1048576, "model_flops", 0.27),
    Claim("V4-Pro at 1M tokens: 10% of V3.2's KV cache", "DeepSeek-V4 model card",
          "deepseek-v4-pro", BASE, 1048576, "kv_bytes_per_token", 0.10),
)


def _costs(models, contexts, fmt) -> dict[str, list[ContextCost]]:
    from .cli import load_config
    gpu = get_gpu("h800")
    # the same serving assumptions for every model: FP8 weights (only the decode $ depend on them)
    return {m: context_costs(load_config(m), gpu, list(contexts), kv_format=fmt, weight_bytes=1.0)
            for m in models}


def _ctx(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _e(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def generations_markdown(models=MODELS, contexts=DEFAULT_CONTEXTS, formats=FORMATS, base=BASE) -> str:
    by_fmt = {f: _costs(models, contexts, f) for f in formats}
    first = by_fmt[formats[0]]
    head = ["context", "model", "core + indexer + compressors", "attention (with projections)",
            "model", f"model / {base}"]
    for f in formats:
        head += [f"KV B/token ({f})", f"/ {base}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, n in enumerate(contexts):
        for m in models:
            r, b = first[m][i], first[base][i]
            row = [_ctx(n), m, _e(r.core_flops + r.indexer_flops + r.compressor_flops), _e(r.attention_flops),
                   _e(r.model_flops), f"{r.model_flops / b.model_flops:.3f}"]
            for f in formats:
                r, b = by_fmt[f][m][i], by_fmt[f][base][i]
                row += [f"{r.kv_bytes_per_token:,.0f}", f"{r.kv_bytes_per_token / b.kv_bytes_per_token:.3f}"]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| DeepSeek's claim (source) | claimed | estimated | estimate / claim |", "|---|---|---|---|"]
    for c in CLAIMS:
        est = []
        for f in (formats if c.quantity.startswith("kv") else formats[:1]):
            got = _costs((c.model, c.base), (c.context,), f)
            ratio = getattr(got[c.model][0], c.quantity) / getattr(got[c.base][0], c.quantity)
            est.append((f, ratio))
        label = lambda f: f" ({f})" if c.quantity.startswith("kv") else ""   # noqa: E731
        lines.append(f"| {c.text} ({c.source}) | {c.claimed:.0%} | "
                     + "; ".join(f"{r:.1%}{label(f)}" for f, r in est) + " | "
                     + "; ".join(f"{r / c.claimed:.2f}{label(f)}" for f, r in est) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(generations_markdown())
