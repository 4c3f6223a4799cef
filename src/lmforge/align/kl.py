"""KL to the reference in on-policy RL: the per-token estimators (`train/objectives/kl.py`, where
the PPO/GRPO objectives use them), the coefficient controllers and the hard guard here, so PPO,
GRPO and the held-out evaluation name the same quantities.

Why three pieces:
* **Estimators** (Schulman, "Approximating KL divergence", 2020). With d = log pi - log ref at a
  token sampled from pi: k1 = d is unbiased but negative on many tokens, so a small average can
  read as "KL < 0"; k3 = exp(-d) + d - 1 is unbiased too and never negative. As a *penalty in the
  reward* k1 is the one whose policy gradient is the gradient of the KL (the reward is treated as
  a constant: E_pi[grad k1] = 0, E_pi[grad k3] != 0), so PPO penalises with k1 by default and
  every reported KL is k3. The mean of k1 is reported as what it is: a log-ratio.
* **Controller** (Ziegler et al. 2019): beta <- beta * (1 + clip(KL / target - 1, +-0.2) * n / H),
  n = samples in the rollout, H = the horizon in samples. A horizon much longer than the run
  cannot move beta (10 000 samples against 192 sampled in the default pipeline: +3% at most), so
  the default horizon is one rollout: beta moves by up to 20% per rollout. n / H is capped at 1,
  so a short horizon never flips the sign of beta.
* **Guard**: a rollout whose KL exceeds `guard * target` trains on the KL penalty alone (its
  reward scores are dropped), so the update pulls the policy back towards the reference
  instead of further along the reward; the trip is logged and counted. With a fixed coefficient
  of 0 that is a skipped update.
"""

from __future__ import annotations

import math

MAX_STEP = 0.2  # Ziegler et al.: the proportional error is clipped to +-20%


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the measured KL tracks `target`; the
    proportional error is clipped to +-20% and scaled by n_samples / horizon (capped at 1)."""

    def __init__(self, value: float, target: float, horizon: int):
        if target <= 0 or horizon < 1:
            raise ValueError(f"target_kl must be > 0 and kl_horizon >= 1 (got {target}, {horizon})")
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -MAX_STEP), MAX_STEP)
        self.value *= 1.0 + err * min(n_samples / self.horizon, 1.0)


class KLGuard:
    """Trips when a rollout's KL exceeds `factor * target` (factor 0 = never)."""

    def __init__(self, factor: float, target: float):
        self.factor, self.target = factor, target
        self.trips = 0

    @property
    def limit(self) -> float:
        return self.factor * self.target if self.factor > 0 else math.inf

    def check(self, kl: float) -> bool:
        tripped = math.isfinite(kl) and kl > self.limit
        self.trips += int(tripped)
        return tripped

    def message(self, rollout: int, kl: float, coef: float) -> str:
        return (
            f"warning: rollout {rollout}: KL to the reference {kl:.2f} nats/sequence (k3) exceeds "
            f"{self.factor:g} x target_kl = {self.limit:.3g}; this rollout trains on the KL penalty only "
            f"(its reward scores are dropped; kl_coef {coef:.4f}). {self.trips} trip(s) so far. If this "
            f"repeats, lower the learning rate or raise kl_coef / target_kl."
        )


def make_kl_controller(s, n_seq: int) -> FixedKLController | AdaptiveKLController:
    """PPO's KL coefficient: adaptive (horizon `kl_horizon` samples, default one rollout of
    `n_seq`) or fixed."""
    if s.adaptive_kl:
        return AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon or n_seq)
    return FixedKLController(s.kl_coef)
