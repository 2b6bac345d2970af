"""The DeepSeek-V3 model: config, MLA, DeepSeekMoE, MTP, transformer, HF checkpoints, sizes."""

from .config import ConfigError, ModelConfig, load_model_config
from .transformer import CausalLMOutput, DeepseekV3ForCausalLM

__all__ = ["ConfigError", "ModelConfig", "load_model_config", "CausalLMOutput", "DeepseekV3ForCausalLM"]
