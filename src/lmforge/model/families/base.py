"""What a model family is: the four converters between a Hugging Face `model_type` and
lmforge's `ModelConfig` / weight names (see the package docstring), as one frozen value."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..config import ModelConfig

Items = Iterable[tuple[str, torch.Tensor]]


def _same_in(items: Items, cfg: ModelConfig, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(items)


def _same_out(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return state


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    from_hf: Callable[[dict, str], ModelConfig]
    to_hf: Callable[[ModelConfig], dict]
    keys_in: Callable[[Items, ModelConfig, str], Iterator[tuple[str, torch.Tensor]]] = _same_in
    keys_out: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] = _same_out
    # LoRA tensors in the family's layer names (fused layers): (state, adapter settings) ->
    # (state, adapter_config.json updates), and back; None = lmforge's names are the family's
    lora_out: Callable[[dict[str, torch.Tensor], ModelConfig, dict], tuple[dict, dict]] | None = None
    lora_in: Callable[[dict[str, torch.Tensor], ModelConfig, dict, str], tuple[dict, dict]] | None = None
