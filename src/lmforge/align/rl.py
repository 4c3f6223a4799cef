"""On-policy RL for language models: PPO (RLHF) and GRPO."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PPOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty against the reference")


class GRPOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(4, ge=2, description="samples per prompt")
    scale: Literal["group", "batch", "none"] = "group"


def run_rl(ctx, cfg) -> dict:
    raise NotImplementedError("PPO / GRPO are not implemented yet")
