"""Data-parallel training through PyTorch's own machinery: DDP and FSDP2 under `torchrun`.

The same config runs on one process or many: the world size comes from the environment that
`torchrun` (or Slurm through torchrun) sets, never from the config. `batch_size` in the config
is the *global* micro-batch; each rank takes `batch_size / world` rows of it, so a run can be
resumed on a different number of processes and continue with the same global batches.

- `ddp`: `DistributedDataParallel`; gradient all-reduce is skipped on all but the last
  micro-batch of an accumulation step (`no_sync`).
- `fsdp`: FSDP2 (`fully_shard` per transformer block, then the root), with a mixed-precision
  policy (bf16 params/compute, fp32 gradient reduction when autocast is bf16), optional CPU
  offload, and gradient sync only on the last micro-batch. Checkpoints are sharded with
  `torch.distributed.checkpoint` and reshard on load to any world size.
- activation checkpointing wraps each block (`torch.utils.checkpoint`), trading compute for
  memory; it works with all three modes.

Backend: NCCL on CUDA, gloo on CPU (what the tests use: two CPU processes).

When a rank dies: `torchrun` notices the dead worker, stops the others and exits non-zero; a
survivor blocked in a collective also gets an error as soon as the dead peer's socket closes.
For the cases nothing closes (a hung rank, a lost node), every collective has a timeout,
`LMFORGE_DIST_TIMEOUT_S` seconds (default 900; torch's own default is 30 minutes), after which
the process group raises instead of waiting forever. Raise it if a rank legitimately waits
longer at a barrier (rank 0 writing a very large unsharded checkpoint, a long `torch.compile`).
Re-running the same command resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


DEFAULT_TIMEOUT_S = 900.0


def dist_timeout() -> timedelta:
    """How long a collective may wait for the other ranks (`LMFORGE_DIST_TIMEOUT_S`)."""
    raw = os.environ.get("LMFORGE_DIST_TIMEOUT_S", "")
    try:
        secs = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"LMFORGE_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if secs <= 0:
        raise ConfigError(f"LMFORGE_DIST_TIMEOUT_S={raw!r} must be > 0")
    return timedelta(seconds=secs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, need_group: bool = False) -> DistInfo:
    """Join the process group `torchrun` describes in the environment. With `need_group`
    (FSDP on a single process) a one-process group is created."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1 and not need_group:
        return DistInfo()
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=dist_timeout())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} (the global micro-batch) is not divisible by the "
            f"world size {world}; use a multiple of {world}"
        )
    return batch_size // world


def resolve_strategy(strategy: str, world: int) -> str:
    if strategy == "auto":
        return "ddp" if world > 1 else "none"
    return strategy


def decoder_blocks(model: Any) -> list[nn.Module]:
    """The repeated decoder blocks of `model`: what activation checkpointing recomputes and FSDP
    shards one by one. lmforge's `Transformer.layers`, also through a trunk (a reward model, a
    prompt-tuned or LoRA wrapper); a model on the generic path (any transformers architecture,
    whose blocks sit at `model.layers`, `gpt_neox.layers`, `transformer.h`, ...) gives the modules
    of the classes its transformers class names in `_no_split_modules` (its decoder layers)."""
    owner = model
    for _ in range(3):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
        owner = getattr(owner, "model", None)
        if owner is None:
            break
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"cannot find the decoder blocks of this {type(model).__name__} (no `layers` list and no "
            f"transformers `_no_split_modules`), so activation checkpointing and FSDP cannot be applied"
        )
    return blocks


def apply_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder block's activations in the backward pass (any model holding a
    trunk: a Transformer, a reward model, a prompt-tuned wrapper, a generic-path model)."""
    from torch.utils.checkpoint import checkpoint

    for block in decoder_blocks(model):
        fwd = block.forward

        def wrapped(*args, _fwd=fwd, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *args, use_reentrant=False, **kw)
            return _fwd(*args, **kw)

        block.forward = wrapped


def wrap(
    model: Any,
    strategy: str,
    info: DistInfo,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    cpu_offload: bool = False,
) -> nn.Module:
    """The module the training loop calls forward on (DDP wrapper, or the FSDP2-sharded model)."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {}
        if amp_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        if cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    raise ConfigError(f"unknown parallel strategy {strategy!r} (auto, none, ddp, fsdp)")


@contextlib.contextmanager
def grad_sync(module: Any, strategy: str, sync: bool):
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if sync or strategy == "none":
        yield
    elif strategy == "ddp":
        with module.no_sync():
            yield
    elif strategy == "fsdp":
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
