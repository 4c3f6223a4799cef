"""Model families: how each Hugging Face `model_type` maps to lmforge's one decoder.

A `Family` holds four small functions: config.json -> `ModelConfig` (refusing, with the key
named, what the decoder would compute differently), `ModelConfig` -> config.json, and the
weight-name mapping in each direction (identity for the families whose names lmforge's modules
already use; Phi-3 splits and re-fuses its fused projections, GPT-2 renames and transposes its
Conv1D weights, Mixtral stacks and unstacks experts), and for the families with fused layers the
same for LoRA adapters (`lora_layout.py`), so an adapter loads in `peft` on the family's model. Reading streams (name, tensor) pairs, so
a converter never needs the whole checkpoint in memory.

`family_for_type` finds the reader of a config.json, `family_for_config` the writer of a model:
the family the model was imported from (`ModelConfig.hf_type`), else Llama / Qwen2 / Mistral /
Mixtral chosen from the flags, as lmforge's own models have always been written.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..config import ModelConfig
from . import gemma, gpt2, llama, mixtral, phi3, qwen3
from .base import Family, Items
from .generic import GENERIC

__all__ = [
    "GENERIC",
    "Family",
    "Items",
    "family_for_config",
    "family_for_type",
    "families",
    "supported_types",
]


def _registry() -> dict[str, Family]:
    out = {}
    for mod in (llama, qwen3, gemma, phi3, gpt2, mixtral):
        for fam in mod.FAMILIES:
            for mt in fam.model_types:
                out[mt] = fam
    return out


FAMILIES: dict[str, Family] = {}


def families() -> dict[str, Family]:
    if not FAMILIES:
        FAMILIES.update(_registry())
    return FAMILIES


def supported_types() -> list[str]:
    return sorted(families())


def family_for_type(model_type: str | None, source: str = "config.json") -> Family:
    fam = families().get(model_type or "")
    if fam is None:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (supported: {supported_types()})"
        )
    return fam


def family_for_config(cfg: ModelConfig) -> Family:
    if cfg.hf_config is not None:  # run by transformers: its own config.json and names
        return GENERIC
    if cfg.hf_type:
        return family_for_type(cfg.hf_type, "model config (hf_type)")
    if cfg.n_experts:
        return families()["mixtral"]
    return families()["llama"]
