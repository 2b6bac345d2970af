"""Shared pieces of the DeepSeek-V4 tests: small configs that exercise every layer kind, and
random weights for transformers' model (its own init leaves sinks, biases, mHC bases and the hash
table at zero, which would hide mistakes)."""

from __future__ import annotations

import torch

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

BASE = dict(vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_attention_heads=4, head_dim=16,
            q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, o_groups=2, o_lora_rank=8,
            index_n_heads=2, index_head_dim=8, max_position_embeddings=512, num_nextn_predict_layers=0,
            initializer_range=0.1)

# name -> (config overrides, sequence length); every case has sequences longer than the sliding
# window and more compressed entries than the indexer's top-k.
CASES = {
    "all_kinds_hc2": (dict(num_hidden_layers=4, layer_types=[SWA, CSA, HCA, CSA],
                           mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                           compress_rates={CSA: 4, HCA: 8}, sliding_window=6, index_topk=3, hc_mult=2,
                           partial_rotary_factor=0.25, swiglu_limit=0.5), 40),
    "default_schedule_yarn_sigmoid_hc3": (dict(num_hidden_layers=4, compress_rates={CSA: 2, HCA: 4},
                                               sliding_window=5, index_topk=4, hc_mult=3, hc_sinkhorn_iters=5,
                                               scoring_func="sigmoid", o_groups=4, routed_scaling_factor=2.5,
                                               rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 16,
                                                                "beta_fast": 32, "beta_slow": 1}), 33),
    "tied_top1_bias_hc1": (dict(num_hidden_layers=3, layer_types=[CSA, SWA, HCA], mlp_layer_types=["moe", "hash_moe", "moe"],
                                compress_rates={CSA: 3, HCA: 5}, sliding_window=7, index_topk=2, hc_mult=1,
                                num_experts_per_tok=1, mlp_bias=True, tie_word_embeddings=True,
                                partial_rotary_factor=0.5, rope_theta=500.0, compress_rope_theta=2000.0), 50),
}


@torch.no_grad()
def randomise(model, seed: int = 0) -> None:
    """Random values for every parameter and buffer (nanoseek's or transformers' model, same names)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, std, mean=0.0):
        return (torch.randn(t.shape, generator=g) * std + mean).to(t.dtype)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or leaf in ("scale", "hc_scale"):
            p.copy_(rnd(p, 0.2, 1.0))
        elif leaf in ("sinks", "position_bias", "base", "hc_base", "bias"):
            p.copy_(rnd(p, 0.5))
        else:
            p.copy_(rnd(p, 0.15))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(rnd(b, 0.1))
        elif name.endswith("tid2eid"):
            n_experts = model.config.n_routed_experts
            b.copy_(torch.randint(0, n_experts, b.shape, generator=g))


def ids_batch(seed: int, B: int, T: int, V: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
