"""What a training step and a training run come back with, and how a run that stops early says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LMForgeError


class TrainingStopped(LMForgeError):
    """Raised when a run stops on a signal or repeated bad steps (after checkpointing)."""


@dataclass
class StepOutcome:
    """What `_train_step` did: `loss` is the mean over the step's units (None: nothing to
    train on); `bad` says why no update was applied ("non-finite", "spike") or is None."""

    loss: float | None
    extra: dict[str, float]
    units: int
    bad: str | None = None
    tokens: int = 0  # processed tokens over all ranks


@dataclass
class TrainResult:
    step: int
    tokens: int  # processed (non-padding) tokens
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    best_eval_loss: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    units: int = 0  # what the loss is normalised by (= tokens for pretraining)
    unit_name: str = "tokens"
    train_seconds: float = 0.0  # inside optimizer steps (no eval, no checkpointing)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    def speed_metrics(self) -> dict[str, Any]:
        """What every training stage reports: processed tokens/s, loss units (and per second)
        under their own name, and peak memory, for its summary and manifest."""
        secs = max(self.train_seconds, 1e-9)
        out: dict[str, Any] = {"tokens": self.tokens, "tokens_per_s": round(self.tokens / secs, 1)}
        if self.unit_name != "tokens":
            out[self.unit_name] = self.units
            out[f"{self.unit_name}_per_s"] = round(self.units / secs, 2)
        out["peak_memory_bytes"] = self.peak_memory_bytes
        out["peak_memory_gib"] = round(self.peak_memory_bytes / 2**30, 3)
        out["peak_memory_kind"] = self.peak_memory_kind
        return out
