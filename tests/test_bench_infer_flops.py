"""The inference benchmark's FLOP count: the grouped_mm formula it adds to torch's counter, and
the work per decoded token of our engine against transformers' on the same (tiny) weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_infer import HF, Ours, _grouped_mm_flops, decode_flops


def test_grouped_mm_formula_counts_every_row_once():
    from torch.utils.flop_counter import FlopCounterMode

    a, w = torch.randn(10, 16), torch.randn(3, 16, 24)
    offs = torch.tensor([2, 7, 10], dtype=torch.int32)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as fc:
        torch._grouped_mm(a, w, offs=offs)
    assert fc.get_total_flops() == 2 * 10 * 16 * 24
    with pytest.raises(NotImplementedError):
        _grouped_mm_flops((2, 3, 4, 5), (2, 5, 6))


def test_decode_flops_absorbed_mla_grows_slower_with_context(tmp_path):
    pytest.importorskip("transformers")
    from nanoseek.model.checkpoint import save_pretrained
    from nanoseek.model.config import load_model_config
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_model_config("tiny")).eval()
    save_pretrained(model, tmp_path / "ckpt")
    hf, ours = HF(str(tmp_path / "ckpt")), Ours(model, 256)
    short, long = torch.randint(8, 200, (2, 8)), torch.randint(8, 200, (2, 160))
    ours_short, ours_long = decode_flops(ours, short, 5), decode_flops(ours, long, 5)
    hf_short, hf_long = decode_flops(hf, short, 5), decode_flops(hf, long, 5)
    assert 0 < ours_short < ours_long and 0 < hf_short < hf_long
    # transformers re-expands the whole latent cache through kv_b_proj at every step; we attend
    # over the latent: our per-token work grows far more slowly with the context
    assert (ours_long - ours_short) * 3 < hf_long - hf_short
    assert ours_long < hf_long


def test_activated_weights_are_what_one_token_reaches():
    """The bandwidth figure's parameter count: every parameter a one-token forward reaches (gradient
    flows), plus the whole router (read to score every expert), minus the embedding table and MTP."""
    from bench_infer import activated_weights
    from nanoseek.model.config import load_model_config
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_model_config("tiny"))
    cfg = model.config
    assert 0 < cfg.num_experts_per_tok < cfg.n_routed_experts and model.moe_layers()
    model(torch.tensor([[5]])).logits.sum().backward()
    reached = 0
    for name, p in model.named_parameters():
        if ".mtp." in f".{name}" or "embed_tokens" in name:
            continue
        if p.grad is None:
            continue
        if ".gate." in name and "proj" not in name:          # the router: all of it is read, only top-k get grads
            reached += p.numel()
        elif p.dim() == 3 and p.shape[0] == cfg.n_routed_experts:     # stacked routed experts: the chosen ones
            reached += sum(p[e].numel() for e in range(p.shape[0]) if p.grad[e].abs().sum() > 0)
        else:
            reached += p.numel()
    assert activated_weights(model) == reached


@pytest.mark.slow
def test_llama_cpp_generator_decodes_our_greedy_tokens(tmp_path):
    """The benchmark's llama.cpp side runs the same model: its greedy tokens equal our engine's."""
    pytest.importorskip("llama_cpp")
    from bench_infer import LlamaCpp
    from nanoseek.cli import main
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model.checkpoint import save_pretrained
    from nanoseek.model.config import load_model_config
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_model_config("tiny")).eval()
    save_pretrained(model, tmp_path / "ckpt")
    Tokenizer.train(["The quick brown fox jumps over the lazy dog, 17 + 25 = 42."] * 4, vocab_size=300,
                    min_frequency=1).save(tmp_path / "ckpt")
    assert main(["export", "--format", "gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    llama, ours = LlamaCpp(str(tmp_path / "m.gguf"), 96, 1, f32_cache=True), Ours(model, 96)
    prompts = torch.randint(8, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    assert llama(prompts, 24) == ours(prompts, 24)
    assert llama(prompts[:1], 1) == ours(prompts[:1], 1)      # a re-run starts from an empty cache
