"""DeepSeek-V4: hybrid sliding-window / compressed-sparse / heavily-compressed attention, mHC, hash MoE.

config.py (``DeepseekV4Config``, transformers' field names), rope.py (the main and compressed-branch
RoPEs), compressor.py (KV compressors and the lightning indexer), attention.py (the three layer
kinds), hyper.py (manifold-constrained hyper-connections), moe.py (hash and learned routing,
``sqrtsoftplus``, clamped SwiGLU), transformer.py (``DeepseekV4ForCausalLM`` with transformers'
module names, MTP), cache.py (decoding cache), checkpoint.py (HF / DeepSeek checkpoints),
params.py (analytic parameter counts).

Names are imported lazily so the config can be read without importing torch.
"""

from .config import DeepseekV4Config, is_v4_config, load_v4_config

__all__ = ["DeepseekV4Config", "load_v4_config", "is_v4_config", "DeepseekV4ForCausalLM", "V4Cache"]


def __getattr__(name):
    if name == "DeepseekV4ForCausalLM":
        from .transformer import DeepseekV4ForCausalLM
        return DeepseekV4ForCausalLM
    if name == "V4Cache":
        from .cache import V4Cache
        return V4Cache
    raise AttributeError(f"module 'nanoseek.model.v4' has no attribute {name!r}")
