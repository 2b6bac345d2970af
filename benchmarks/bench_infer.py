"""Inference benchmark: nanoseek's engine against transformers ``generate`` on the same weights.

What it measures, on the ``bench-moe`` config (4 layers, 16 routed experts, MLA, vocab 4096) with
random weights, in fp32 on the CPU:

* decode tokens/s at batch 1 and batch 16 (128 new tokens, greedy, EOS disabled on both sides),
  computed as ``B * (N - 1) / (t(N new tokens) - t(1 new token))`` so the prefill cancels out;
* prefill tokens/s (16 prompts of 256 tokens, time to the first token);
* the KV-cache bytes per token: ours must be exactly ``(kv_lora_rank + qk_rope_head_dim) x layers
  x dtype size`` (checked); transformers' is measured from its returned cache;
* llama.cpp (llama-cpp-python, ``make install-llama``; skipped with a line when it is not
  importable) on the same weights exported by ``nanoseek export --format gguf`` (f32 weights and
  f32 KV cache, and f16 weights with llama.cpp's default f16 cache), batch 1: prefill and decode
  tokens/s beside our engine's, the greedy tokens checked equal to ours, and each side's
  weight-read bandwidth (activated parameters x bytes per weight x decode tokens/s);
* MTP self-speculative decoding: acceptance and tokens/s with and without drafting, on the random
  weights (acceptance ~0: the MTP head predicts noise) and on a ``tiny`` model trained here for a
  few hundred steps on the shipped text corpus (byte-level ids) with the MTP loss, where the
  draft is meaningful.

transformers loads the checkpoint nanoseek saved (``save_pretrained`` -> ``from_pretrained``); the
benchmark first checks that both give the same logits. Runs interleave ours and transformers'
and keep the best of ``--repeats`` (the CPU may be shared: the minimum is the least disturbed run).
``--threads`` sets torch's intra-op threads for both (default 1: on a shared 2-core machine more
threads mostly add contention). ``--profile`` prints a torch.profiler table of our decode steps.
``--compile`` adds a third generator, the engine with ``compile=True`` (decode steps through
torch.compile): it is warmed up first at every batch size and prompt length measured, so the
compilation is excluded from the figures; its time is printed.

    python benchmarks/bench_infer.py                 # everything, a few minutes on 2 cores
    python benchmarks/bench_infer.py --quick         # fewer tokens and repeats, no training
    python benchmarks/bench_infer.py --clock cpu --repeats 3 --compile   # the README's figures
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.checkpoint import save_pretrained
from nanoseek.model.config import load_model_config
from nanoseek.model.transformer import DeepseekV3ForCausalLM


CLOCK = time.perf_counter   # switched to time.process_time by --clock cpu


def best_times(fns: dict, repeats: int) -> dict:
    """Best time of each function over ``repeats`` rounds, the functions interleaved."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            best[k] = min(best[k], CLOCK() - t0)
    return best


# ---------------------------------------------------------------------- the two generators
class Ours:
    def __init__(self, model, max_len: int, use_mtp: bool = False, temperature: float = 0.0, compile: bool = False):
        self.engine = Engine(model, None, max_batch_size=16, max_seq_len=max_len, use_mtp=use_mtp, compile=compile)
        self.temperature = temperature

    def __call__(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=self.temperature, seed=0, ignore_eos=True)
        return [r[0].token_ids for r in self.engine.generate(prompts.tolist(), params)]


class HF:
    def __init__(self, path: str):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None       # fixed-length generation
        self.model.generation_config.pad_token_id = 0
        self.experts = getattr(self.model.config, "_experts_implementation", None) or "default"

    @torch.inference_mode()
    def __call__(self, prompts: torch.Tensor, new_tokens: int, return_cache: bool = False):
        out = self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                  do_sample=False, return_dict_in_generate=True)
        ids = out.sequences[:, prompts.shape[1]:].tolist()
        return (ids, out.past_key_values) if return_cache else ids


def cache_bytes_per_token(past, tokens: int, batch: int) -> int:
    """Bytes of a transformers cache object per (row, token)."""
    total = 0
    for layer in getattr(past, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total // (tokens * batch)


def decode_rates(gens: dict, prompts: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of each generator: B (N - 1) / (t(N new tokens) - t(1 new token))."""
    fns = {}
    for name, gen in gens.items():
        fns[(name, "full")] = lambda gen=gen: gen(prompts, new_tokens)
        fns[(name, "first")] = lambda gen=gen: gen(prompts, 1)
    t = best_times(fns, repeats)
    B = prompts.shape[0]
    return {name: B * (new_tokens - 1) / max(t[(name, "full")] - t[(name, "first")], 1e-9) for name in gens}


class LlamaCpp:
    """llama.cpp on a GGUF export of the same weights, one sequence at a time (llama-cli's way), greedy."""

    def __init__(self, gguf_path: str, max_len: int, threads: int, f32_cache: bool):
        import llama_cpp

        cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=max_len, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, seed=0, **cache)
        self.get_logits, self.n_vocab = llama_cpp.llama_get_logits, self.llm.n_vocab()

    def _last_logits(self):
        import numpy as np      # the last evaluated position's logits, read in place (the only output row)

        return np.ctypeslib.as_array(self.get_logits(self.llm.ctx), shape=(self.n_vocab,))

    def __call__(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        out = []
        for row in prompts.tolist():
            llm, ids = self.llm, []
            llm.reset()
            llm.eval(row)
            for i in range(new_tokens):
                ids.append(int(self._last_logits().argmax()))
                if i + 1 < new_tokens:
                    llm.eval([ids[-1]])
            out.append(ids)
        return out


def activated_weights(model) -> int:
    """Parameters one decoded token reads: all but the routed experts not chosen (top-k of E per MoE
    layer), without the MTP module (a plain decode does not run it) and the embedding table (one row)."""
    cfg = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if ".mtp." not in f".{n}" and "embed_tokens" not in n)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * len(model.moe_layers())
    return total - idle


def llama_cpp_comparison(args, results: dict, model, ours: Ours, rand_prompts, max_len: int,
                         compiled: Ours | None = None) -> None:
    """Our engine (and the compiled one, with --compile) against llama.cpp on the same weights (GGUF f32
    and f16), batch 1, side by side."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:             # not installed, or its shared library does not load
        print(f"\nllama.cpp: skipped (llama-cpp-python not importable: {type(e).__name__}: {e}; "
              "`make install-llama` installs it)")
        return
    root = Path(__file__).resolve().parent.parent / "nanoseek" / "data" / "corpus"
    texts = [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))]
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        _llama_cpp_rows(args, results, model, ours, compiled, rand_prompts, max_len, tmp, texts)


def _llama_cpp_rows(args, results: dict, model, ours: Ours, compiled: Ours | None, rand_prompts, max_len: int,
                    tmp: str, texts) -> None:
    import llama_cpp

    from nanoseek.cli import main as nanoseek_main
    from nanoseek.data.tokenizer import Tokenizer

    save_pretrained(model, Path(tmp) / "ckpt")
    tok = Tokenizer.train(texts, vocab_size=model.config.vocab_size)     # GGUF carries a vocabulary
    tok.save(Path(tmp) / "ckpt")
    gens = {"ours": ours, **({"compiled": compiled} if compiled else {})}
    bytes_per_weight = dict.fromkeys(gens, 4)
    for dtype in ("f32", "f16"):
        out = Path(tmp) / f"model-{dtype}.gguf"
        if nanoseek_main(["export", "--format", "gguf", "--dtype", dtype, str(Path(tmp) / "ckpt"), str(out)]) != 0:
            print(f"llama.cpp: the {dtype} export failed (above); skipped")
            return
        gens[f"llama.cpp {dtype}"] = LlamaCpp(str(out), max_len, args.threads, f32_cache=dtype == "f32")
        bytes_per_weight[f"llama.cpp {dtype}"] = 4 if dtype == "f32" else 2
    warm = rand_prompts(1, min(args.prompt_lens))
    reference = ours(warm, 32)[0]
    same = {name: sum(a == b for a, b in zip(reference, gen(warm, 32)[0])) for name, gen in gens.items()
            if name.startswith("llama")}
    print(f"\nllama.cpp {llama_cpp.__version__} on `nanoseek export --format gguf` of the same weights "
          f"({args.threads} thread(s), one sequence at a time); greedy tokens equal to ours: "
          + ", ".join(f"{k} {v}/32" for k, v in same.items()))
    results["llama_cpp"] = {"version": llama_cpp.__version__, "greedy_equal": {k: v / 32 for k, v in same.items()}}
    prefill = rand_prompts(1, args.prefill_len)
    t = best_times({name: (lambda gen=gen: gen(prefill, 1)) for name, gen in gens.items()}, args.repeats)
    rows = [{"what": f"prefill tok/s (1 x {args.prefill_len})", **{n: args.prefill_len / t[n] for n in gens}}]
    for T in args.prompt_lens:
        rows.append({"what": f"decode tok/s, batch 1, prompt {T}",
                     **decode_rates(gens, rand_prompts(1, T), args.new_tokens, args.repeats)})
    active = activated_weights(model)
    llamas = [n for n in gens if n.startswith("llama")]
    mine = [n for n in gens if n not in llamas]
    print(f"{'':34}" + "".join(f" {n:>10}" for n in mine) + "".join(f" {n:>15} {'ratio':>6}" for n in llamas)
          + ("   (ratio: nanoseek / llama.cpp" + (", eager and compiled)" if compiled else ")")))
    for r in rows:
        print(f"{r['what']:34}" + "".join(f" {r[n]:>10.1f}" for n in mine)
              + "".join(f" {r[n]:>15.1f} " + "/".join(f"{r[m] / r[n]:.2f}x" for m in mine) for n in llamas))
    print(f"weight reads while decoding (prompt {min(args.prompt_lens)}; {active:,} activated parameters per token "
          "x bytes per weight x tokens/s): "
          + ", ".join(f"{n} {active * bytes_per_weight[n] * rows[1][n] / 1e9:.2f} GB/s" for n in gens))
    results["llama_cpp"].update(rows=rows, activated_weights=active)


# ---------------------------------------------------------------------- FLOPs per decoded token
def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """aten._grouped_mm as the MoE experts use it: [M, K] rows, each times one of [E, K, N]."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:      # batched: [E, M, K] x [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    raise NotImplementedError(f"grouped_mm FLOPs for shapes {a_shape} x {b_shape}")


def decode_flops(gen, prompts: torch.Tensor, new_tokens: int = 17) -> float:
    """FLOPs per decoded token (torch's FlopCounterMode, which does not know grouped_mm, so the
    experts' formula is added): (F(new_tokens) - F(1)) / (B (new_tokens - 1)), prefill cancelled."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    totals = []
    for n in (1, new_tokens):
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            gen(prompts, n)
        totals.append(fc.get_total_flops())
    return (totals[1] - totals[0]) / (prompts.shape[0] * (new_tokens - 1))


# ---------------------------------------------------------------------- a briefly trained model
def corpus_ids() -> list[int]:
    from nanoseek.tasks.generators import corpus_document, get_task

    tok = ByteTokenizer()
    root = Path(__file__).resolve().parent.parent / "nanoseek" / "data" / "corpus"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt")))
    text += "\n".join(corpus_document(p) for p in get_task("arithmetic").generate("train", 300, seed=0, unique=False))
    return tok.encode(text)


def train_tiny(steps: int, seed: int = 0, batch: int = 16, seq: int = 128, log=print):
    """The ``tiny`` preset trained on byte-level text with the MTP loss (lambda 0.3)."""
    torch.manual_seed(seed)
    cfg = load_model_config("tiny")
    model = DeepseekV3ForCausalLM(cfg)
    data = torch.tensor(corpus_ids())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        lr = 3e-3 * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(x, labels=y)
        loss = out.loss + 0.3 * out.mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_expert_bias(0.001)
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"  train step {step}/{steps}: loss {out.loss.item():.3f}, mtp loss {out.mtp_loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return model.eval(), data


def distinct_4grams(seqs: list[list[int]]) -> float:
    """Share of distinct 4-grams in the outputs: low when the model loops (which inflates acceptance)."""
    grams = [tuple(s[i:i + 4]) for s in seqs for i in range(len(s) - 3)]
    return len(set(grams)) / max(len(grams), 1)


def mtp_comparison(model, prompts: torch.Tensor, new_tokens: int, repeats: int, temperature: float = 0.0) -> dict:
    """Tokens/s with and without MTP drafting; greedy output must match (sampled: same distribution)."""
    max_len = prompts.shape[1] + new_tokens + 4
    plain = Ours(model, max_len, temperature=temperature)
    spec = Ours(model, max_len, use_mtp=True, temperature=temperature)
    out_plain, out_spec = plain(prompts, new_tokens), spec(prompts, new_tokens)
    same = out_plain == out_spec if temperature == 0 else None
    spec.engine.spec_stats.reset()
    t = best_times({"plain": lambda: plain(prompts, new_tokens), "spec": lambda: spec(prompts, new_tokens)}, repeats)
    t_plain, t_spec = t["plain"], t["spec"]
    s = spec.engine.spec_stats
    B = prompts.shape[0]
    return {"batch": B, "temperature": temperature, "identical_greedy": same, "acceptance": s.acceptance_rate,
            "distinct_4grams": distinct_4grams(out_plain),
            "tokens_per_step": s.tokens_per_step, "tok_s_plain": B * new_tokens / t_plain,
            "tok_s_mtp": B * new_tokens / t_spec, "speedup": t_plain / t_spec}


def print_mtp(rows: list[dict], title: str) -> None:
    print(title)
    print(f"  {'temp':>4} {'batch':>5} {'accept':>7} {'tok/step':>8} {'plain tok/s':>11} {'MTP tok/s':>10} "
          f"{'speed-up':>8} {'distinct 4-grams':>16}  identical greedy output")
    for r in rows:
        same = "-" if r["identical_greedy"] is None else r["identical_greedy"]
        print(f"  {r['temperature']:>4} {r['batch']:>5} {r['acceptance']:>7.1%} {r['tokens_per_step']:>8.2f} "
              f"{r['tok_s_plain']:>11.1f} {r['tok_s_mtp']:>10.1f} {r['speedup']:>7.2f}x {r['distinct_4grams']:>16.2f}"
              f"  {same}")


# ---------------------------------------------------------------------- main
def throughput(args, results: dict, ours: Ours, hf: HF | None, rand_prompts, compiled: Ours | None = None) -> None:
    """Prefill and decode tokens/s, ours (eager, and compiled with --compile) and transformers' side by side."""
    gens = {"ours": ours, **({"compiled": compiled} if compiled else {}), **({"transformers": hf} if hf else {})}
    prefill = rand_prompts(16, args.prefill_len)
    for gen in gens.values():
        gen(prefill, 2)                                    # warm-up at full size (allocations, kernels)
    if compiled:   # compile outside the timed runs: every batch size and prompt length measured
        for T in args.prompt_lens:
            for B in (1, 16):
                compiled(rand_prompts(B, T), 4)
        eng = compiled.engine
        check = rand_prompts(16, min(args.prompt_lens))
        out_c, out_e = compiled(check, 32), ours(check, 32)
        same = sum(a == b for x, y in zip(out_c, out_e) for a, b in zip(x, y))
        print(f"compiled engine: {eng.compile_seconds:.0f} s compiling (wall, excluded from the figures); "
              f"compiled step in use: {eng.compile}; greedy tokens equal to eager {same}/{16 * 32}")
        results["compile_seconds"] = eng.compile_seconds
        results["compiled_greedy_equal"] = same / (16 * 32)
    t = best_times({name: (lambda gen=gen: gen(prefill, 1)) for name, gen in gens.items()}, args.repeats)
    rows = [{"what": f"prefill tok/s (16 x {args.prefill_len})",
             **{name: 16 * args.prefill_len / t[name] for name in gens}}]
    for T in args.prompt_lens:
        for B in (1, 16):
            rates = decode_rates(gens, rand_prompts(B, T), args.new_tokens, args.repeats)
            rows.append({"what": f"decode tok/s, batch {B}, prompt {T}", **rates})
    head = f"\n{'':34} {'nanoseek':>10}"
    if compiled:
        head += f" {'compiled':>10}"
    if hf:
        head += f" {'transformers':>13} {'ratio':>7}" + (f" {'compiled ratio':>14}" if compiled else "")
    print(head)
    for r in rows:
        line = f"{r['what']:34} {r['ours']:>10.1f}"
        if compiled:
            line += f" {r['compiled']:>10.1f}"
        if hf:
            line += f" {r['transformers']:>13.1f} {r['ours'] / r['transformers']:>6.2f}x"
            if compiled:
                line += f" {r['compiled'] / r['transformers']:>13.2f}x"
        print(line)
    results["throughput"] = rows
    if hf:   # the work each side does: the ratio of FLOPs bounds what a faster kernel could give
        print(f"\n{'decode FLOPs per token, batch 16':34} {'nanoseek':>10} {'transformers':>13} {'ratio':>7}")
        flops = []
        for T in args.prompt_lens:
            prompts = rand_prompts(16, T)
            f_ours, f_hf = decode_flops(ours, prompts), decode_flops(hf, prompts)
            flops.append({"prompt": T, "ours": f_ours, "transformers": f_hf})
            print(f"{f'prompt {T} (MFLOP)':34} {f_ours / 1e6:>10.1f} {f_hf / 1e6:>13.1f} {f_hf / f_ours:>6.2f}x")
        results["decode_flops_per_token"] = flops
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prompts = rand_prompts(16, min(args.prompt_lens))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(prompts, 16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time by the wall clock, or by this process's CPU time (robust on a shared machine; "
                        "with 1 thread it is the time an idle machine would take)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, best kept (default 3)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode length (default 128)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 512],
                   help="prompt lengths of the decode runs (default 32 512)")
    p.add_argument("--prefill-len", type=int, default=256, help="prompt tokens for the prefill run (default 256)")
    p.add_argument("--train-steps", type=int, default=300, help="steps for the MTP-trained tiny model (0: skip)")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--skip-throughput", action="store_true", help="only the cache check and the MTP figures")
    p.add_argument("--skip-llama-cpp", action="store_true", help="do not run llama.cpp (run when importable)")
    p.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat, no training")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our decode step")
    p.add_argument("--compile", action="store_true",
                   help="also measure the engine with compile=True (torch.compile'd decode steps; compile time excluded)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.train_steps, args.prompt_lens = 32, 1, 0, [32]
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1 (CPU time of several threads is not elapsed time)")
        CLOCK = time.process_time
    warnings.filterwarnings("ignore")
    if args.compile:   # dynamo logs each (expected) graph break at the host syncs as a warning
        import logging

        torch._logging.set_logs(dynamo=logging.ERROR)
    results: dict = {"threads": args.threads, "clock": args.clock, "torch": torch.__version__}

    torch.manual_seed(0)
    cfg = load_model_config("bench-moe")
    model = DeepseekV3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rand_prompts = lambda B, T: torch.randint(8, cfg.vocab_size, (B, T), generator=g)  # noqa: E731
    args.prompt_len = min(args.prompt_lens)                # for the MTP and sanity runs
    max_len = max(max(args.prompt_lens) + args.new_tokens, args.prefill_len + 1) + 4
    ours = Ours(model, max_len)
    print(f"bench-moe: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts "
          f"(top-{cfg.num_experts_per_tok}), vocab {cfg.vocab_size}; fp32, {args.threads} thread(s), "
          f"torch {torch.__version__}; {args.clock} clock, best of {args.repeats}")

    # --- KV cache
    dtype_size = 4
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * dtype_size
    got = ours.engine.cache.bytes_per_token
    assert got == expected, f"cache bytes/token {got} != (kv_lora_rank + qk_rope_head_dim) x layers x 4 = {expected}"
    results["cache_bytes_per_token"] = {"ours": got, "formula": expected}

    hf = None
    if not args.skip_hf and not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, Path(tmp) / "ckpt")
            hf = HF(str(Path(tmp) / "ckpt"))
        x = rand_prompts(2, 24)
        with torch.inference_mode():
            diff = (model(x).logits - hf.model(x).logits).abs().max().item()
        warm = rand_prompts(1, args.prompt_len)
        same = sum(a == b for a, b in zip(ours(warm, 32)[0], hf(warm, 32)[0]))
        print(f"same weights: max |logit difference| {diff:.2e}; greedy tokens equal {same}/32; "
              f"transformers experts implementation: {hf.experts}")
        _, past = hf(warm, 8, return_cache=True)
        results["cache_bytes_per_token"]["transformers"] = cache_bytes_per_token(past, args.prompt_len + 7, 1)
        results["logit_max_abs_diff"] = diff
    cb = results["cache_bytes_per_token"]
    cb["per_head_kv"] = (cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
                         * dtype_size)
    print(f"KV cache bytes/token: ours {cb['ours']:,} (= ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x "
          f"{cfg.num_hidden_layers} layers x 4 bytes, checked); per-head K/V would be {cb['per_head_kv']:,}"
          + (f"; transformers {cb['transformers']:,} (it caches the latent too, but expands it through "
             "kv_b_proj for every cached token at every step; we attend over it directly)" if hf else ""))

    if not args.skip_throughput:
        compiled = Ours(model, max_len, compile=True) if args.compile else None
        throughput(args, results, ours, hf, rand_prompts, compiled)
        if not args.skip_llama_cpp:
            llama_cpp_comparison(args, results, model, ours, rand_prompts, max_len, compiled)

    # --- MTP speculative decoding
    mtp_rows = [mtp_comparison(model, rand_prompts(B, args.prompt_len), args.new_tokens, args.repeats)
                for B in (1, 16)]
    print_mtp(mtp_rows, "\nMTP self-speculative decoding, bench-moe random weights (the draft is noise):")
    results["mtp_random"] = mtp_rows
    if args.train_steps:
        print(f"\ntraining the tiny preset for {args.train_steps} steps (byte-level corpus, MTP loss):")
        tiny, data = train_tiny(args.train_steps)
        starts = torch.randint(0, len(data) - args.prompt_len, (16,), generator=g)
        prompts = torch.stack([data[s:s + args.prompt_len] for s in starts])
        trained = [mtp_comparison(tiny, prompts[:B], args.new_tokens, args.repeats, temperature)
                   for temperature in (0.0, 1.0) for B in (1, 16)]
        print_mtp(trained, f"MTP self-speculative decoding, tiny model after {args.train_steps} training steps:")
        results["mtp_trained"] = trained
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
