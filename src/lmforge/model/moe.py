"""Mixture-of-Experts feed-forward layer (Mixtral / DeepSeek style), used in place of the
dense SwiGLU MLP when `ModelConfig.n_experts > 0`.

Routing: a linear router scores every token against E experts; each token goes to its top-k.
- `softmax` gates (Mixtral): softmax over all experts, keep the top-k, renormalise to sum 1.
- `sigmoid` gates (DeepSeek-V3): independent sigmoid scores, keep the top-k, renormalise.
Auxiliary losses, returned through `aux_loss` after each forward:
- load balancing (Switch Transformer): E * sum_e f_e * P_e, where f_e is the share of routed
  assignments that went to expert e and P_e its mean router probability; 1.0 when balanced;
- router z-loss (ST-MoE): mean squared log-sum-exp of the router logits, keeps logits small.
Capacity: with `capacity_factor` set, each expert takes at most ceil(cf * tokens * k / E)
assignments per forward, in token order; the rest are dropped (the token keeps its residual
path) and counted. `capacity_factor = None` is dropless.
An optional shared expert (DeepSeek-MoE) processes every token beside the routed ones.

Expert weights are stored stacked, as `transformers` 5 keeps Mixtral in memory:
`experts.gate_up_proj` [E, 2*ff, d] and `experts.down_proj` [E, d, ff]; the router is `gate`.
Per-layer statistics of the last forward (expert load, dropped assignments) are kept on the
module for logging.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import MLP


class Experts(nn.Module):
    def __init__(self, n: int, d: int, ff: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * ff, d))
        self.down_proj = nn.Parameter(torch.empty(n, d, ff))

    # `gate_up` / `down` are the two matmuls of one expert; adapter and quantised versions of
    # this module (peft/) provide the same three methods, so the MoE layer runs them unchanged.
    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gate_up_proj[e])

    def down(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_proj[e])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, F.silu(gate) * up)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_top_k
        self.gate_type, self.capacity_factor = cfg.moe_gate, cfg.capacity_factor
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_dim)
        self.shared_expert = MLP(cfg, cfg.expert_dim) if cfg.shared_expert else None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.stats: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = x.reshape(-1, D)
        N, E, k = h.shape[0], self.n_experts, self.top_k
        logits = self.gate(h).float()
        if self.gate_type == "softmax":
            probs = logits.softmax(-1)
        else:
            probs = logits.sigmoid()
        top_w, top_i = probs.topk(k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True).clamp_min(1e-9)

        # aux losses on the full (undropped) routing decision
        assign = F.one_hot(top_i, E).sum(1).float()  # [N, E] 0/1
        f = assign.mean(0) / k  # share of assignments
        p = (probs / probs.sum(-1, keepdim=True)).mean(0)  # mean routing prob
        self.aux_loss = E * (f * p).sum()
        self.z_loss = torch.logsumexp(logits, -1).pow(2).mean()

        flat_e = top_i.reshape(-1)  # [N*k] expert of each assignment
        flat_t = torch.arange(N, device=x.device).repeat_interleave(k)  # token of each assignment
        flat_w = top_w.reshape(-1)
        keep = torch.ones_like(flat_e, dtype=torch.bool)
        if self.capacity_factor is not None:
            cap = max(1, math.ceil(self.capacity_factor * N * k / E))
            onehot = F.one_hot(flat_e, E)
            pos = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank within its expert
            keep = pos < cap
        out = torch.zeros_like(h)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e[keep], minlength=E).tolist()
        sorted_keep = keep[order]
        start = 0
        for e, n_all in enumerate(torch.bincount(flat_e, minlength=E).tolist()):
            idx = order[start : start + n_all][sorted_keep[start : start + n_all]]
            start += n_all
            if idx.numel() == 0:
                continue
            tok = flat_t[idx]
            y = self.experts.expert(e, h[tok]) * flat_w[idx, None].to(h.dtype)
            out.index_add_(0, tok, y)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        dropped = int((~keep).sum())
        self.stats = {
            "dropped_frac": dropped / max(flat_e.numel(), 1),
            "load_max": max(counts) * E / max(sum(counts), 1),
        }
        return out.view(B, T, D)
