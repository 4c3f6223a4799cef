"""Per-token estimators of KL(pi || ref) from the log-probs of sampled tokens (Schulman,
"Approximating KL divergence", 2020). k1 = log pi - log ref is unbiased but negative on many
tokens, so its mean is reported as what it is, a log-ratio; k3 = exp(-d) + d - 1 is unbiased and
never negative, and is what every reported KL uses. As a penalty in PPO's reward k1 is the one
whose policy gradient is the KL's gradient. The controllers and guard that use these live with
the rollouts (`align/kl.py`).
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log ref per token (the k1 estimator of KL; negative on many tokens)."""
    return logp - ref_logp


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    if estimator == "k1":
        return log_ratio(logp, ref_logp)
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of completion-aligned [N, L] log-probs: (KL estimate = sum of k3 over its
    tokens, never negative; log-ratio = sum of log pi - log ref, the k1 estimate)."""
    return (k3_kl(logp, ref_logp) * mask).sum(1), (log_ratio(logp, ref_logp) * mask).sum(1)
