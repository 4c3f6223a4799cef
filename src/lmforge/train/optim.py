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

`build_optimizer(model, cfg)` is what the trainer calls: `cfg.optimizer` = `adamw` (default)
or `muon`. Muon (Keller Jordan, 2024; `torch.optim.Muon`) takes the 2-D weight matrices of the
hidden layers (attention q/k/v/o, dense and shared-expert MLP projections); AdamW keeps the
embeddings, the LM head, norms, biases, the MoE router and the stacked 3-D expert tensors
(`torch.optim.Muon` orthogonalises 2-D matrices only). Muon's update is the Nesterov momentum
(0.95) of the gradient, orthogonalised by 5 Newton-Schulz iterations with the quintic
coefficients (3.4445, -4.7750, 2.0315) (in bf16, as torch does on every device), then scaled by
`0.2 * sqrt(max(rows, cols))` ("match AdamW RMS", Liu et al. 2025, "Muon is Scalable for LLM
Training"): the update then has about AdamW's RMS, so the AdamW learning rate, schedule and
weight decay carry over unchanged. `cfg.muon_lr` (default: `cfg.lr`) sets the Muon groups' peak
learning rate through a per-group `lr_scale` = muon_lr / lr, which the LR schedule multiplies in.
Weight decay is decoupled (`p *= 1 - lr * wd`) in both.

The two optimizers are held by one `CombinedOptimizer` with the `torch.optim.Optimizer` surface
the trainer and checkpoints use (`param_groups`, `step`, `zero_grad`, `state_dict`,
`load_state_dict`); iterating over it yields the parts, which is what
`torch.distributed.checkpoint.state_dict.get_state_dict` accepts for several optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

MUON_ADJUST = "match_rms_adamw"  # update scaled by 0.2 * sqrt(max(rows, cols))


def lr_multiplier(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
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


def build_adamw(
    params,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    seen: set[int] = set()
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps)
    # fused AdamW exists for CUDA and (since 2.4) CPU; it is the fastest path on both.
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=device_type != "cpu" or None, **kwargs)


# ----------------------------------------------------------------------------- Muon
def muon_param_names(model: torch.nn.Module) -> list[str]:
    """The parameters Muon takes: trainable 2-D matrices inside the transformer blocks, except
    the MoE router (a classifier over experts, kept on AdamW like the embeddings and head)."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight"):
            out.append(name)
    return out


class CombinedOptimizer:
    """Several optimizers stepping as one (here: AdamW + Muon)."""

    def __init__(self, **parts: torch.optim.Optimizer):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts.values())

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts.values() for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.parts.values() for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.parts.values():
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: o.state_dict() for name, o in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.parts):
            have = "+".join(state) if "param_groups" not in state else "a single optimizer"
            raise CheckpointError(
                f"the checkpoint's optimizer state is for {have}, this run uses "
                f"{'+'.join(self.parts)}; resume with the optimizer the run started "
                f"with, or start the stage afresh"
            )
        for name, o in self.parts.items():
            scales = [g.get("lr_scale", 1.0) for g in o.param_groups]
            o.load_state_dict(state[name])
            for g, sc in zip(o.param_groups, scales):  # this run's muon_lr wins over the saved one
                g["lr_scale"] = sc

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(f'{k}={type(v).__name__}' for k, v in self.parts.items())})"


def build_muon(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float | None = None,
    momentum: float = 0.95,
    device_type: str = "cpu",
) -> CombinedOptimizer:
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(
            f"optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
            f"{torch.__version__}. Upgrade torch or use optimizer=adamw"
        )
    names = set(muon_param_names(model))
    if not names:
        raise ConfigError("optimizer=muon: the model has no 2-D hidden-layer matrices to give Muon")
    params = dict(model.named_parameters())
    if any(type(params[n]).__name__ == "DTensor" for n in names):
        raise ConfigError(
            "optimizer=muon does not support parallel=fsdp yet (Newton-Schulz needs whole "
            "matrices, FSDP shards them); use parallel=ddp or optimizer=adamw"
        )
    matrices = [params[n] for n in params if n in names]
    muon_ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    adamw = build_adamw(rest, lr=lr, weight_decay=weight_decay, betas=betas, device_type=device_type)
    base = muon_lr or lr
    muon = torch.optim.Muon(
        matrices,
        lr=base,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=True,
        adjust_lr_fn=MUON_ADJUST,
    )
    for g in adamw.param_groups:
        g["lr_scale"] = 1.0
    for g in muon.param_groups:
        g["lr_scale"] = base / lr
    return CombinedOptimizer(adamw=adamw, muon=muon)


EIGHT_BIT = ("adamw8bit", "paged_adamw8bit")  # bitsandbytes' AdamW with 8-bit (and paged) state


def build_optimizer(
    model: torch.nn.Module, cfg, kind: str | None = None, log: Callable[[str], None] | None = None
) -> torch.optim.Optimizer | CombinedOptimizer:
    """The optimizer `kind` names, default `cfg.optimizer` (adamw when the field is absent): adamw,
    muon, or bitsandbytes' adamw8bit / paged_adamw8bit (QLoRA's memory savers; AdamW, with a
    logged note, where bitsandbytes is missing). Reads `lr`, `weight_decay`, `beta1`, `beta2` and,
    for Muon, `muon_lr` and `muon_momentum`. Every param group carries `lr_scale`: the schedule
    should set `g["lr"] = lr * g["lr_scale"]`."""
    kind = kind or getattr(cfg, "optimizer", "adamw")
    first = next(model.parameters(), None)
    device_type = first.device.type if first is not None else "cpu"
    betas = (cfg.beta1, cfg.beta2)
    if kind in EIGHT_BIT:
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw8bit" else bnb.optim.AdamW8bit
            params = [p for p in model.parameters() if p.requires_grad]
            opt = cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
            for g in opt.param_groups:
                g["lr_scale"] = 1.0
            return opt
        except (ImportError, RuntimeError, AttributeError) as e:
            if log is not None:
                log(f"optimizer: {kind} unavailable ({type(e).__name__}); using AdamW")
            kind = "adamw"
    if kind == "adamw":
        opt = build_adamw(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, device_type=device_type
        )
        for g in opt.param_groups:
            g["lr_scale"] = 1.0
        return opt
    if kind == "muon":
        return build_muon(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=betas,
            muon_lr=getattr(cfg, "muon_lr", None),
            momentum=getattr(cfg, "muon_momentum", 0.95),
            device_type=device_type,
        )
    raise ConfigError(f"optimizer {kind!r} is not known (adamw, muon, {', '.join(EIGHT_BIT)})")
