"""lmforge: the LLM training pipeline from raw text to an evaluated chat model."""

__version__ = "0.1.0"
