"""Optimizer and learning-rate schedules.

AdamW with the usual split: weight decay on matrices (dim >= 2), none on norms, biases and
other vectors. The fused CUDA/CPU kernel is used where torch offers it (`fused=True`), else the
multi-tensor `foreach` path.

Schedules map a step to a multiplier of the peak learning rate:
- `cosine`: linear warmup, cosine decay to `min_lr_ratio`.
- `wsd` (warmup-stable-decay): linear warmup, flat, then a linear decay over the last
  `decay_fraction` of training to `min_lr_ratio`. Lets a run be extended or annealed later
  without re-planning the whole schedule (MiniCPM, DeepSeek).
- `constant`: warmup then flat.
"""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, *, max_steps: int, warmup_steps: int, schedule: str,
                  min_lr_ratio: float, decay_fraction: float = 0.2) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def build_adamw(params, *, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float = 1e-8, device_type: str = "cpu") -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=lr, betas=betas, eps=eps)
    # fused AdamW exists for CUDA and (since 2.4) CPU; it is the fastest path on both.
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=device_type != "cpu" or None, **kwargs)
