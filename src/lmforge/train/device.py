"""The device a run trains on: choosing it, the autocast dtype it supports, and its peak memory."""

from __future__ import annotations

import os
import resource

import torch

from ..errors import LMForgeError


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA `max_memory_allocated` since the last reset, else the process's peak
    resident set size (Linux reports KiB, macOS bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if os.uname().sysname == "Darwin" else rss * 1024), "cpu_peak_rss"


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for `dtype` = auto | float32 | bfloat16 | float16 on `device`."""
    if dtype == "float32":
        return None
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # on CPU fp32 is faster than emulated bf16 matmuls for small models
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LMForgeError("run.device is 'cuda' but no CUDA device is visible; use run.device=auto or cpu")
    return torch.device(name)
