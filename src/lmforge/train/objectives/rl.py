"""The arithmetic of PPO and GRPO, as small pure functions (tested against hand-computed
values), and the two objectives the training engine runs.

Conventions: per-token tensors are completion-aligned, shape [N, L]: row i holds the L first
tokens of completion i, `mask` is 1.0 on its real tokens (0 on padding and on samples dropped
from the update). Log-probs are of the sampled tokens under logits / temperature (the
distribution that was sampled from), as in TRL.

PPO (Ziegler et al. 2019; Ouyang et al. 2022; TRL's PPOTrainer):
    kl_t      = logp_old_t - logp_ref_t  (k1; or k3, see kl.py)  (per-token KL estimate)
    r_t       = -kl_coef * kl_t  (+ score at the last token)    (reward, optionally whitened)
    delta_t   = r_t + gamma V_{t+1} - V_t ;  A_t = delta_t + gamma lam A_{t+1}    (GAE)
    R_t       = A_t + V_t ; A whitened over the batch's tokens
    L_pg      = max(-A ratio, -A clip(ratio, 1-c, 1+c))         ratio = exp(logp - logp_old)
    L_vf      = 0.5 max((V - R)^2, (clip(V, V_old +- cv) - R)^2)
    loss      = token-mean(L_pg + vf_coef L_vf)
GRPO (Shao et al. 2024; DAPO; Dr. GRPO; TRL's GRPOTrainer):
    A_i       = r_i - mean(group)  [/ std(group) | / std(batch) | as is]
    L_t       = -min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A) + beta k3_t
    k3_t      = exp(ref - logp) - (ref - logp) - 1              (unbiased, always >= 0)
    loss      = seq: mean over sequences of each one's token-mean
                token: sum over tokens / number of tokens
                dr_grpo: sum over tokens / (sequences * max_new_tokens)
The engine divides a summed loss by a count, so each normalisation is written as (sum, count).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..modules import unwrap
from .kl import KLEstimator, k3_kl, kl_per_token

STD_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)


# ----------------------------------------------------------------------------- masked stats
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked entries; with shift_mean=False the mean is added back
    (reward whitening rescales without changing the sign of the average reward)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------- PPO
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion-aligned [N, L] tensors. The value after
    the last token is 0 (the episode ends). Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    N, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(L)):
        nxt = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def kl_penalty_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * kl_t (kl_t from `estimator`, see kl.py) with each sequence's
    score added at its last token; returns (rewards, per-token kl_t)."""
    kl = kl_per_token(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(1).long()
    rows = torch.nonzero(lengths > 0).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores[rows]
    return rewards * mask, kl


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss; also (ratio, clipped) for the logs."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(l1, l2), ratio, (l2 > l1).float()


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2); also `clipped`."""
    clipped_v = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), (l2 > l1).float()


# ----------------------------------------------------------------------------- GRPO
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"],
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages for rewards [P * G] laid out prompt-major (the G samples of prompt p are
    rows p*G .. p*G+G-1). `valid` marks samples whose reward is usable: the mean and std of a
    group are over its valid samples only, and a group with fewer than two is dropped.

    Returns (advantages [P*G] (0 where not kept), kept [P*G] bool, zero_std [P] bool over the
    kept groups). A group whose rewards are all equal has zero advantage everywhere: it gives
    no policy gradient (only the KL term, if any)."""
    r = rewards.reshape(-1, group_size).double()
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(-1, group_size)
    r = torch.where(v, r, torch.zeros_like(r))
    n = v.sum(1, keepdim=True)
    group_ok = n >= 2
    nz = n.clamp(min=1)
    mean = r.sum(1, keepdim=True) / nz
    var = (((r - mean) ** 2) * v).sum(1, keepdim=True) / (n - 1).clamp(min=1)  # unbiased, as torch.std
    std = var.sqrt()
    adv = (r - mean) * v
    zero_std = (std.squeeze(1) < 1e-8) & group_ok.squeeze(1)
    kept = v & group_ok
    if scale == "group":
        adv = adv / (std + STD_EPS)
    elif scale == "batch":
        flat = rewards.reshape(-1, group_size).double()[kept]
        bstd = flat.std() if flat.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        adv = adv / (bstd + STD_EPS)
    adv = torch.where(kept, adv, torch.zeros_like(adv))
    return adv.reshape(-1).float(), kept.reshape(-1), zero_std


def grpo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped loss with per-sequence advantages adv [N]; also (ratio, clipped low/high)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    l1, l2 = ratio * a, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    loss = -torch.minimum(l1, l2)
    clipped_low = ((ratio < 1.0 - eps_low) & (a < 0)).float()
    clipped_high = ((ratio > 1.0 + eps_high) & (a > 0)).float()
    return loss, ratio, clipped_low + clipped_high


def normalized_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int
) -> tuple[torch.Tensor, int]:
    """(summed loss, count) such that sum / count is the loss under `loss_type` (see above).
    Sequences with no kept token count for nothing."""
    seq_tokens = mask.sum(1)
    live = int((seq_tokens > 0).sum())
    if loss_type == "token":
        return masked_sum(per_token, mask), int(mask.sum())
    if loss_type == "seq":
        return (masked_sum(per_token, mask, 1) / seq_tokens.clamp(min=1)).sum(), live
    if loss_type == "dr_grpo":
        return masked_sum(per_token, mask) / max_new_tokens, live
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_count(mask: torch.Tensor, loss_type: str) -> int:
    return int(mask.sum()) if loss_type == "token" else int((mask.sum(1) > 0).sum())


# ----------------------------------------------------------------------------- forward
def policy_forward(
    model: torch.nn.Module, batch: dict, temperature: float, *, values: bool = False, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log-probs [b, L] of the completion tokens, entropy [b, L] or None, values [b, L] or
    None). The vocabulary projection runs only at completion positions."""
    core: Any = unwrap(model)  # the Transformer (or reward / value model) under any wrapper
    h = core.hidden_states(batch["input_ids"])
    idx = batch["idx"]
    hs = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1]))
    logits = core.lm_head(hs).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch["targets"][:, :, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    val = core.v_head(hs.float()).squeeze(-1) if values else None
    return logp, ent, val


def _f(x: torch.Tensor) -> torch.Tensor:
    """A metric as a detached device scalar: the engine reads a step's metrics back once."""
    return x.detach()


class PPOObjective:
    """Clipped policy + value loss, token-mean; count = completion tokens in the batch."""

    def __init__(self, s, temperature: float):
        self.s, self.temperature = s, temperature

    def __call__(self, model, b):
        logp, ent, values = policy_forward(model, b, self.temperature, values=True)
        m = b["mask"]
        pg, ratio, pg_clip = ppo_policy_loss(logp, b["old_logp"], b["advantages"], self.s.cliprange)
        vf, vf_clip = ppo_value_loss(values, b["old_values"], b["returns"], self.s.cliprange_value)
        loss = masked_sum(pg + self.s.vf_coef * vf, m)
        with torch.no_grad():
            metrics = {
                "policy/clipfrac": _f(masked_mean(pg_clip, m)),
                "policy/approxkl": _f(masked_mean(0.5 * (logp - b["old_logp"]) ** 2, m)),
                "policy/ratio": _f(masked_mean(ratio, m)),
                "policy/entropy": _f(masked_mean(ent, m)),
                "loss/policy": _f(masked_mean(pg, m)),
                "loss/value": _f(masked_mean(vf, m)),
                "val/clipfrac": _f(masked_mean(vf_clip, m)),
                "val/error": _f(masked_mean((values - b["returns"]) ** 2, m)),
                "val/mean": _f(masked_mean(values, m)),
            }
        return loss, self.count(b), metrics

    def count(self, b) -> int:
        return int(b["mask"].sum())


class GRPOObjective:
    """Clipped GRPO loss (+ beta k3 KL) under one of the three normalisations."""

    def __init__(self, s, temperature: float):
        self.s, self.temperature = s, temperature
        self.eps_high = s.epsilon_high if s.epsilon_high is not None else s.epsilon

    def __call__(self, model, b):
        logp, ent, _ = policy_forward(model, b, self.temperature)
        m = b["mask"]
        old = b["old_logp"] if "old_logp" in b else logp.detach()
        per_tok, ratio, clipped = grpo_token_loss(logp, old, b["advantages"], self.s.epsilon, self.eps_high)
        metrics = {}
        if self.s.beta > 0:
            kl = k3_kl(logp, b["ref_logp"])
            per_tok = per_tok + self.s.beta * kl
            metrics["kl"] = _f(masked_mean(kl, m))
        loss, n = normalized_loss(per_tok, m, self.s.loss_type, self.s.max_new_tokens)
        with torch.no_grad():
            metrics.update(
                {
                    "clip_ratio": _f(masked_mean(clipped, m)),
                    "policy/ratio": _f(masked_mean(ratio, m)),
                    "policy/entropy": _f(masked_mean(ent, m)),
                }
            )
        return loss, n, metrics

    def count(self, b) -> int:
        return grpo_count(b["mask"], self.s.loss_type)
