"""Small helpers every training loop and objective needs: the plain model inside compile / DDP /
FSDP wrappers, and a batch moved to the device."""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside tuples / lists / dicts to `device` (non-blocking where possible)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
