"""Configuration of the alignment stages (`lmforge align`, `lmforge rl`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..peft.lora import LoraSettings
from ..peft.qlora import QLoraSettings
from ..train.config import TrainConfig
from .reward_functions import DEFAULT_FORMAT_PATTERN

# Loss-spike skipping is off for alignment: a pairwise loss several times its running median is
# a batch of hard pairs (IPO's squared loss varies by 5x between batches of 8), not a numerical
# blow-up; skipping those steps would quietly train on the easy pairs only. NaN/inf steps are
# still skipped by the engine.
SPIKE_NOTE = "skip steps whose loss exceeds this x the running median; 0 = off (the alignment default)"
RL_METHODS = ("ppo", "grpo")


class RolloutSettings(BaseModel):
    """Settings shared by PPO and GRPO (each method has its own copy under `ppo.` / `grpo.`)."""

    model_config = ConfigDict(extra="forbid")

    rewards: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="reward terms: exact_match, format, reward_model, module:function; "
        "'W*name' weights a term",
    )
    format_pattern: str = Field(DEFAULT_FORMAT_PATTERN, description="regex of the `format` reward")
    max_new_tokens: int = Field(32, ge=1, description="completion budget per sample")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature of rollouts (and of the log-probs)"
    )
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    epochs: int = Field(
        1, ge=1, description="optimisation passes over each rollout (PPO epochs / GRPO iterations)"
    )
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per pass over a rollout")
    mask_truncated: bool = Field(
        False, description="drop completions that hit max_new_tokens without stopping"
    )
    backend: Literal["lmforge", "vllm", "auto"] = Field(
        "lmforge",
        description="rollout generation: lmforge (KV cache), vllm, auto (vllm when importable + CUDA)",
    )
    gen_batch_size: int = Field(64, ge=1, description="sequences the generation engine runs at once")
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="held-out completion budget; default max_new_tokens"
    )
    num_samples: int = Field(4, ge=0, description="held-out answers shown before/after in samples.jsonl")

    @model_validator(mode="after")
    def _rewards_nonempty(self):
        if not self.rewards:
            raise ValueError("rewards: give at least one reward term")
        return self


class PPOSettings(RolloutSettings):
    rewards: list[str] = Field(default_factory=lambda: ["reward_model"])
    epochs: int = Field(4, ge=1, description="PPO epochs per rollout")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty against the reference")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="per-token KL of the penalty: k1 = log pi - log ref (its policy gradient is the KL's), "
        "k3 = exp(-d) + d - 1 (never negative); every reported KL is k3",
    )
    adaptive_kl: bool = Field(False, description="adapt kl_coef so the KL tracks target_kl (Ziegler et al.)")
    target_kl: float = Field(
        6.0,
        gt=0,
        description="KL per sequence (nats, k3) to aim for (adaptive_kl); also the guard's and the summary's bound",
    )
    kl_horizon: int | None = Field(
        None, ge=1, description="adaptive_kl: horizon in samples; default: one rollout's samples"
    )
    kl_guard: float = Field(
        3.0,
        ge=0,
        description="a rollout whose KL exceeds kl_guard x target_kl trains on the KL penalty only "
        "(reward dropped, warning logged); 0 = off",
    )
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of completions that never stop"
    )


class GRPOSettings(RolloutSettings):
    group_size: int = Field(4, ge=2, description="samples per prompt")
    scale: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0, description="lower clip of the ratio (1 - epsilon)")
    epsilon_high: float | None = Field(
        None,
        gt=0,
        description="upper clip (1 + epsilon_high); default epsilon (DAPO's clip-higher uses e.g. 0.28)",
    )
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient; 0 = no reference model is loaded")
    loss_type: Literal["seq", "token", "dr_grpo"] = Field(
        "token",
        description="seq: per-sequence mean then mean; token: over all tokens; "
        "dr_grpo: sum / (sequences * max_new_tokens)",
    )


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
