"""Helpers for the post-training tests (tests/test_post_*.py): a byte-level tokenizer, a tiny model
and that model saved as a checkpoint.

The tokenizer is trained on a few lines, so its vocabulary is the 256 bytes, the 7 special tokens
and a handful of merges (~300 ids); the model is DeepSeek-V3-shaped (MLA, MoE with shared and
routed experts, MTP) at hidden size 32 with that vocabulary.
"""

from __future__ import annotations

import functools

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import DeepseekV3ForCausalLM, ModelConfig

TEXTS = ["Reply with the digit 7. Answer: 7", "<think>\nsteps\n</think>\n\nAnswer: 7", "the answer is 12"]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300, min_frequency=1)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
               n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
               num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=None,
               initializer_range=0.02, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(ModelConfig(**cfg))


def saved_tiny_checkpoint(path):
    """A tiny model saved in HF format at ``path`` with its tokenizer (a stage's ``init_from``)."""
    from nanoseek.model.checkpoint import save_pretrained

    tk = tiny_tokenizer()
    save_pretrained(tiny_model(tk.vocab_size), path)
    tk.save(path)
    return path

