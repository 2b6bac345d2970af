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



@functools.lru_cache(maxsize=1)
def tool_tokenizer() -> Tokenizer:
    """:func:`tiny_tokenizer`'s vocabulary with DeepSeek-V3.1's seven tool-call strings as special tokens
    (nanoseek's own vocabulary has them once the tool-use tokenizer lands; then this is that one)."""
    import json

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    from nanoseek.tools.format import TOOL_TOKENS, ToolTokens

    texts = TEXTS + ['{"expression": "347 * 829"}', "Answer: 287663", "This needs the calculator tool."]
    base = Tokenizer.train(texts, vocab_size=340, min_frequency=1)
    if ToolTokens.of(base) is not None:
        return base
    hf = HF.from_str(base._tk.to_str())
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_TOKENS])
    tk = Tokenizer(HF.from_str(hf.to_str()))
    assert ToolTokens.of(tk) is not None and json.loads(hf.to_str())
    return tk


def tool_completion(tk, toolbox, head: str, arguments: str, final: str, name: str = "calculator", eos: bool = True):
    """A completion as the engine's tool loop returns it (design: model_mask, tool_calls, tool_results,
    final_text): the model writes ``head`` and one call of ``name`` with ``arguments``; the loop appends
    EOS and the tool's real output (mask 0); the model then writes ``final`` (and EOS)."""
    from types import SimpleNamespace

    from nanoseek.tools.format import ToolCall, ToolTokens

    t = ToolTokens.of(tk)
    call = ToolCall(name, arguments)
    result = toolbox.run(call)
    model1 = (tk.encode_text(head) + [t.calls_begin, t.call_begin] + tk.encode_text(name) + [t.sep]
              + tk.encode_text(arguments) + [t.call_end, t.calls_end])
    loop = [tk.eos_id, t.output_begin] + tk.encode_text(result.output) + [t.output_end]
    model2 = tk.encode_text(final) + ([tk.eos_id] if eos else [])
    ids = model1 + loop + model2
    return SimpleNamespace(token_ids=ids, model_mask=[1] * len(model1) + [0] * len(loop) + [1] * len(model2),
                           text=head + name + arguments + result.output + final, final_text=final,
                           tool_calls=[call], tool_results=[result], finish_reason="stop" if eos else "length",
                           stop_reason="eos" if eos else None, completion_tokens=len(ids), reasoning=None,
                           logprobs=[0.0] * len(ids))


class WithoutToolTokens:
    """A tokenizer as an older vocabulary without the tool-call tokens looks to ``ToolTokens.of``."""

    def __init__(self, tk):
        self._tk = tk

    def token_to_id(self, token: str):
        from nanoseek.tools.format import TOOL_TOKENS

        return None if token in TOOL_TOKENS else self._tk.token_to_id(token)

    def __getattr__(self, name):
        return getattr(self._tk, name)
