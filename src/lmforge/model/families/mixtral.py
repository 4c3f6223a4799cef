"""Mixtral and lmforge's own MoE layout, registered as a family; the mapping itself is in
`model/hf_moe.py` (stacked experts in memory, per-expert tensors on disk)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...errors import CheckpointError
from ..config import ModelConfig
from ..hf_moe import LMFORGE_MOE, from_mixtral_keys, moe_from_hf_config, moe_hf_config, to_mixtral_keys
from .base import Family, Items
from .common import base_fields


def from_hf(hf: dict, source: str) -> ModelConfig:
    if hf.get("model_type") == LMFORGE_MOE:
        return moe_from_hf_config(hf, source, {})
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} not supported (need silu)")
    common = base_fields(hf, source)
    if hf.get("sliding_window"):
        common["sliding_window"] = int(hf["sliding_window"])
    return moe_from_hf_config(hf, source, common)


def to_hf(cfg: ModelConfig) -> dict:
    return moe_hf_config(cfg)


def keys_in(items: Items, cfg: ModelConfig, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    return from_mixtral_keys(items, cfg.n_experts, source)


def keys_out(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return to_mixtral_keys(state) if moe_hf_config(cfg)["model_type"] == "mixtral" else state


FAMILIES = [Family("mixtral", ("mixtral", LMFORGE_MOE), from_hf, to_hf, keys_in, keys_out)]
