"""Configuration of the alignment stages (`lmforge align`, `lmforge rl`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..peft.lora import LoraSettings
from ..peft.qlora import QLoraSettings
from ..train.engine import TrainConfig
from .rl import GRPOSettings, PPOSettings

PREFERENCE_METHODS = ("dpo", "ipo", "hinge", "orpo")
# Loss-spike skipping is off for alignment: a pairwise loss several times its running median is
# a batch of hard pairs (IPO's squared loss varies by 5x between batches of 8), not a numerical
# blow-up; skipping those steps would quietly train on the easy pairs only. NaN/inf steps are
# still skipped by the engine.
SPIKE_NOTE = "skip steps whose loss exceeds this x the running median; 0 = off (the alignment default)"
RL_METHODS = ("ppo", "grpo")


class PairTrainConfig(TrainConfig):
    """What the reward and alignment stages share: the model to start from, preference / prompt
    data and its held-out split, sequence limits, full / LoRA / QLoRA, alignment-sized defaults."""

    model: str | None = Field(
        None, description="model to start from; default: the run's latest model before this stage (sft)"
    )
    data: list[str] = Field(
        default_factory=lambda: ["builtin"], description="preference JSONL files, or 'builtin'"
    )
    val_data: list[str] | None = Field(None, description="held-out files; default: a hashed split of `data`")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_examples: int | None = Field(None, ge=1)
    max_val_examples: int = Field(128, ge=1)
    seq_len: int | None = Field(
        None, ge=8, description="prompt + completion tokens; default: the model's context"
    )
    max_prompt_len: int | None = Field(
        None,
        ge=1,
        description="over-long pairs: keep the last N prompt tokens (default: never cut the prompt)",
    )
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="over-long pairs: cut the completions to fit seq_len, or drop the pair"
    )
    eval_batch_size: int = Field(
        16, ge=1, description="pairs per forward when scoring held-out pairs / the reference"
    )
    peft: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: QLoraSettings = Field(default_factory=QLoraSettings)
    # alignment-sized defaults for the shared optimisation settings
    max_steps: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(25, ge=0)
    spike_factor: float = Field(0.0, ge=0, description=SPIKE_NOTE)

    @field_validator("data", "val_data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class AlignConfig(PairTrainConfig):
    method: Literal["dpo", "ipo", "hinge", "orpo", "ppo", "grpo"] = "dpo"
    model: str | None = Field(None, description="policy to start from; default: the run's latest model (sft)")
    ref_model: str | None = Field(None, description="frozen reference; default: the starting policy")
    reward_model: str | None = Field(
        None, description="reward model folder (ppo); default: this run's reward/model"
    )
    data: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="preference JSONL (dpo/ipo/hinge/orpo) or prompt sources (ppo/grpo)",
    )
    beta: float = Field(0.1, gt=0, description="strength of the KL-style regulariser (DPO beta, ORPO lambda)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed label-noise rate"
    )
    precompute_ref: bool = Field(True, description="score the reference once and cache its log-probs on disk")
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)


class RewardConfig(PairTrainConfig):
    """`lmforge reward`: a Bradley-Terry reward model on preference pairs."""

    model: str | None = Field(
        None,
        description="model whose trunk the reward model starts from; default: the "
        "run's latest model before this stage (sft)",
    )
    max_val_examples: int = Field(256, ge=1)
    use_margin: bool = Field(
        True, description="subtract each pair's 'margin' field inside the Bradley-Terry loss"
    )
    lr: float = Field(3e-4, gt=0)
