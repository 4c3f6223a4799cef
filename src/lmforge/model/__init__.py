"""Model definitions: config, transformer, generation, checkpoint I/O."""

from .config import ModelConfig
from .transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
