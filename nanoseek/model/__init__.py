"""The DeepSeek-V3 model: config, MLA, DeepSeekMoE, MTP, transformer, HF checkpoints, sizes.

Names are imported lazily so that ``nanoseek.model.config`` (pure Python) can be used, e.g. by
``nanoseek estimate``, without importing torch.
"""

from .config import ModelConfig, load_model_config

__all__ = ["ModelConfig", "load_model_config", "CausalLMOutput", "DeepseekV3ForCausalLM"]


def __getattr__(name):
    if name in ("CausalLMOutput", "DeepseekV3ForCausalLM"):
        from . import transformer
        return getattr(transformer, name)
    raise AttributeError(f"module 'nanoseek.model' has no attribute {name!r}")
