"""A tiny model folder made in a second, for tests, benchmarks and trying the server offline.

The weights are random (seeded), so the text is gibberish, but the folder is a real lmforge /
Hugging Face model folder: config.json, model.safetensors and a trained byte-level BPE tokenizer
with lmforge's chat template.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The function returns a list of the items in the mapping.",
    "A socket is one endpoint of a two-way communication link between two programs.",
    "This module provides regular expression matching operations similar to those in Perl.",
    "Return the absolute value of a number. The argument may be an integer or a float.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Open the file and return a stream; raise OSError upon failure.",
] * 8


def make_tiny_model(
    folder: str | Path,
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 384,
    max_seq_len: int = 256,
    seed: int = 0,
) -> Path:
    import torch

    from ..model.config import ModelConfig
    from ..model.hf import save_pretrained
    from ..model.transformer import Transformer
    from ..tokenizer import train_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, vocab_size=vocab_size)
    tok.save(folder)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        max_seq_len=max_seq_len,
    )
    model = Transformer(cfg)
    save_pretrained(model, folder, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return folder
