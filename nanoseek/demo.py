"""``nanoseek demo``: a 10-second tour of the model API without any data.

Builds a small random DeepSeek-V3 model (MLA, DeepSeekMoE, MTP), prints its parameter counts
and KV-cache size, saves it as an HF-format checkpoint, loads it back, and greedy-decodes a few
tokens with the latent cache, checking that the reloaded model produces the same tokens.

``--out`` is claimed like every output folder (:mod:`nanoseek.outdir`): a missing or empty
folder, or one an earlier ``nanoseek demo`` wrote, is (re)written; any other non-empty folder is
refused unless ``--overwrite`` (the refusal names the files it would replace), and even then only
the model files (``config.json``, the weights) are replaced: every other file is kept.
"""

from __future__ import annotations

import argparse

from nanoseek import limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="model preset or config.json (default: tiny)")
    p.add_argument("--out", default="runs/demo", help="where to save the checkpoint (default: runs/demo)")
    p.add_argument("--tokens", type=limits.positive_int, default=16, help="tokens to decode (default: 16)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder another command wrote: replaces its config.json and weight "
                        "files (model.safetensors, shards and their index); every other file is kept")


def greedy(model, prompt, n):
    import torch

    model.set_absorb(True)
    ids = torch.tensor([prompt])
    cache = model.new_cache(1, len(prompt) + n)
    pos = torch.arange(len(prompt))[None]
    out = []
    with torch.no_grad():
        logits = model(ids, positions=pos, cache=cache, logits_to_keep=1).logits
        for t in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), positions=torch.tensor([[len(prompt) + t]]), cache=cache).logits
    return out


def run(args) -> int:
    from nanoseek.errors import UserError
    from nanoseek.model.checkpoint import CheckpointError, check_model_dir_writable, is_weight_file
    from nanoseek.model.registry import load_config
    from nanoseek.outdir import check_claimable, claim

    cfg = load_config(args.config)                 # every input first
    limits.check_model_fits(cfg, "--config")             # before allocating the weights
    claim_args = dict(flag="--out", overwrite=args.overwrite, overwrite_flag="--overwrite",
                      replaces=lambda n: n == "config.json" or is_weight_file(n))
    check_claimable(args.out, "demo", **claim_args)
    try:
        check_model_dir_writable(args.out)               # before anything is written
    except CheckpointError as e:
        raise UserError(f"--out {e}") from None
    with claim(args.out, "demo", **claim_args):
        return _demo(args, cfg)


def _demo(args, cfg) -> int:
    import torch

    from nanoseek.model.registry import V3, build_model, count_params, family_of, from_pretrained, save_pretrained

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    pc = count_params(cfg)
    print(f"model: {family_of(cfg).name}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts "
          f"(top-{cfg.num_experts_per_tok})")
    print(f"parameters: {pc.total:,} total, {pc.active:,} activated per token, {pc.mtp:,} in MTP")
    if family_of(cfg) is V3:
        from nanoseek.model.params import kv_cache_bytes_per_token
        print(f"KV cache: {kv_cache_bytes_per_token(cfg, 4):,} bytes/token in fp32 (latent {cfg.kv_lora_rank} + rope "
              f"{cfg.qk_rope_head_dim} per layer)")
    else:   # fixed rings (sliding window, compressor) plus one entry per compressed block
        n = 4096
        print(f"KV cache: {model.new_cache(1, n, torch.float32).nbytes / n:,.0f} bytes/token in fp32 at {n} tokens "
              f"(sliding-window ring + compressed entries)")
    path = save_pretrained(model, args.out)
    print(f"saved HF-format checkpoint to {path}")
    loaded = from_pretrained(path).eval()
    prompt = [1, 2, 3, 4]
    a, b = greedy(model, prompt, args.tokens), greedy(loaded, prompt, args.tokens)
    print(f"greedy tokens: {a}")
    if a != b:
        print("reloaded model decodes differently!")
        return 1
    print("reloaded model decodes identically")
    return 0
