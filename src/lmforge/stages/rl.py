"""`lmforge rl`: on-policy RL of the run's latest model -- GRPO (default) or PPO.

GRPO on the built-in arithmetic word problems by default: verifiable answers, so the summary's
before/after is held-out exact-match accuracy. PPO needs a reward model (`lmforge reward`, or
`rl.reward_model=PATH`) or reward functions (`rl.ppo.rewards=[...]`). Everything is in
`lmforge.align.rl`; this module registers the stage with RL-sized defaults and hands it the
model to start from (`rl.model`, or the run's model of the last stage before `rl`). (`lmforge
align align.method=ppo|grpo` runs the same code with the align stage's settings.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..align.config import AlignConfig
from ..align.rl import run_rl
from .align import estimate_rl_time
from .base import StageContext, define_stage


class RLConfig(AlignConfig):
    method: Literal["ppo", "grpo"] = "grpo"
    max_steps: int = Field(40, ge=1)
    batch_size: int = Field(
        16, ge=1, description="sequences per micro-batch (GRPO: a multiple of group_size per rollout)"
    )
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    grad_clip: float = Field(1.0, ge=0)
    max_val_examples: int = Field(64, ge=1)
    eval_every: int = Field(10, ge=0)
    checkpoint_every: int = Field(20, ge=0)
    log_every: int = Field(5, ge=1)
    spike_factor: float = Field(
        0.0, ge=0, description="off for RL: its losses hover around 0 and change sign"
    )


@define_stage(
    "rl",
    RLConfig,
    uses_model=True,
    help="on-policy RL: GRPO on verifiable prompts, or PPO against a reward model",
    flags=(
        ("--model", "model", "policy model folder (default: the run's latest model)"),
        ("--method", "method", "grpo | ppo"),
        ("--data", "data", "prompt JSONL (prompt/answer, GSM8K question/answer) or 'builtin'"),
    ),
)
def rl_stage(ctx: StageContext) -> dict:
    cfg: RLConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
    estimate_rl_time(ctx, cfg, model_dir)
    return run_rl(ctx, cfg, model_dir=model_dir)
