"""The generic family: a causal LM lmforge has no converter for, run by `transformers` itself.

Such a model keeps its own `config.json` and weight names (the model is `transformers`'
`AutoModelForCausalLM`, see `model/generic.py`), so there is nothing to convert: `from_hf` fills
the `ModelConfig` fields lmforge's stages read (vocabulary, widths, heads, context, tied head)
from the usual Hugging Face keys and keeps the whole config.json in `hf_config`, and `to_hf`
gives it back. Weight names pass through unchanged both ways.
"""

from __future__ import annotations

from typing import Any

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family
from .common import config_errors

# the Hugging Face keys of each size, in the order configs are tried (GPT-2 / NeoX-era names last)
KEYS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "d_model": ("hidden_size", "d_model", "n_embd", "n_embed"),
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "max_seq_len": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
}


def _first(hf: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise KeyError(keys[0])


def from_hf(hf: dict, source: str) -> ModelConfig:
    with config_errors(hf, source):
        f = {k: int(_first(hf, keys)) for k, keys in KEYS.items()}
        kv = int(hf.get("num_key_value_heads") or hf.get("num_kv_heads") or f["n_heads"])
        hd = hf.get("head_dim")
        head = int(hd) if hd else None
        if head is None and f["d_model"] % f["n_heads"]:
            raise CheckpointError(
                f"{source}: {f['n_heads']} heads do not divide width {f['d_model']} and there is no head_dim"
            )
        return ModelConfig(
            **f,
            n_kv_heads=kv,
            head_size=head if head and head != f["d_model"] // f["n_heads"] else None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hf_type=hf.get("model_type"),
            positions="learned",  # lmforge's own RoPE never runs on these models
            hf_config=dict(hf),
        )


def to_hf(cfg: ModelConfig) -> dict:
    if cfg.hf_config is None:
        raise CheckpointError(f"model_type {cfg.hf_type!r}: no config.json kept for this generic model")
    return dict(cfg.hf_config)


GENERIC = Family("generic", (), from_hf, to_hf)
