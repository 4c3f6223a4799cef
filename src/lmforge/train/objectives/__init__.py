"""Objectives: what the one training engine minimises, one small object per method.

An objective turns a batch and the model(s) into (loss summed over its units, the number of
units, extra metrics) and says how many units a batch holds before the backward pass, so the
engine can normalise accumulated gradients exactly (`Objective` below). Everything else --
batching, accumulation, mixed precision, clipping, schedule, checkpoints, metrics files -- is
the engine's. The objectives live here, below the domain packages that build their batches:

    pretrain.py    next-token cross-entropy over token rows (pretraining, continued pretraining)
    sft.py         assistant-only cross-entropy over packed chat rows
    reward.py      Bradley-Terry over preference pairs (reward models)
    preference.py  DPO / IPO / hinge / ORPO and the log-prob helpers they share
    rl.py          PPO (clipped policy + value loss) and GRPO updates, with their advantage math
    kl.py          the per-token KL estimators RL penalises and reports
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    """Optionally also: `unit_name` (what `count` counts when not all tokens: "assistant_tokens",
    "pairs") and `tokens(batch)` (processed non-padding tokens; default: `count`)."""

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """(loss summed over `count` units, count, extra metrics as floats or 0-d tensors)."""

    def count(self, batch: Any) -> int:
        """Units the loss of `batch` is summed over (needed before backward for normalisation)."""
