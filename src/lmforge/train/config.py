"""What the one training loop is configured with (`TrainConfig`, shared by every stage's config)
and what it reads batches from (`StatefulIterator`: resumable data, so a resumed run continues on
exactly the batches it would have seen)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Optimisation settings shared by every training stage."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="muon: Muon for the hidden-layer matrices, AdamW for embeddings, head, norms, router",
    )
    muon_lr: float | None = Field(
        None, gt=0, description="muon: peak learning rate of the Muon matrices (default: lr)"
    )
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables")
    eval_every: int = Field(100, ge=0, description="0 = only at the end")
    early_stopping_patience: int = Field(0, ge=0, description="evals without improvement; 0 = off")
    checkpoint_every: int = Field(100, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(
        5, ge=1, description="consecutive bad steps (non-finite or spiking loss) before stopping"
    )
    spike_factor: float = Field(
        4.0, ge=0, description="a loss over this x the running median is a bad step; 0 = off"
    )
    spike_window: int = Field(
        32, ge=2, description="good steps in the running median (detection starts once full)"
    )
    spike_min_excess: float = Field(
        1.0,
        ge=0,
        description="a spike must also exceed the median by this much (nats), "
        "so losses near 0 (DPO, reward models) never trip it",
    )
    rollback_after: int = Field(
        3,
        ge=0,
        description="consecutive bad steps before rolling back to the last "
        "checkpoint, past the offending batches; 0 = never",
    )
    max_rollbacks: int = Field(3, ge=0, description="rollbacks per run before bad steps stop it")
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile the model (worth it on GPU); auto = on CUDA only"
    )
    parallel: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="data parallelism under torchrun; auto = ddp when WORLD_SIZE > 1"
    )
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep parameters and optimizer state in CPU memory"
    )
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")


class StatefulIterator(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
