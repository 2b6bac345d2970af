"""nanoseek: DeepSeek-V3 / DeepSeek-R1 in plain PyTorch, small enough to read, HF-checkpoint compatible."""

__version__ = "0.1.0"
