"""KL control for PPO: the estimators against the exact KL of a categorical distribution, the
adaptive controller on a toy policy (the KL tracks its target; a fixed coefficient does not),
the guard, and the signals that flag reward hacking."""

from __future__ import annotations

import math

import torch

from lmforge.align.kl import AdaptiveKLController, FixedKLController, KLGuard
from lmforge.align.signals import distinct_n, hacking_warning
from lmforge.train.objectives.kl import k3_kl, kl_per_token, log_ratio, sequence_kl
from lmforge.train.objectives.rl import kl_penalty_rewards


def _exact_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


def test_both_estimators_average_to_the_exact_kl_and_k3_is_never_negative():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(10, generator=g), torch.randn(10, generator=g)
    lp, lq = pol.log_softmax(-1), ref.log_softmax(-1)
    p = lp.exp()
    exact = _exact_kl(pol, ref)
    # expectations under the policy, taken exactly over its 10 outcomes
    assert math.isclose(float((p * kl_per_token(lp, lq, "k1")).sum()), exact, rel_tol=1e-5)
    assert math.isclose(float((p * kl_per_token(lp, lq, "k3")).sum()), exact, rel_tol=1e-5)
    assert (k3_kl(lp, lq) >= 0).all() and (log_ratio(lp, lq) < 0).any()  # k1 is negative somewhere
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl, lr = sequence_kl(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-2.0, -1.0, 0.0]]), mask)
    assert math.isclose(float(lr), 0.0, abs_tol=1e-6)  # +1 and -1: the log-ratios cancel
    assert math.isclose(float(kl), (math.exp(-1) + 1 - 1) + (math.exp(1) - 1 - 1), rel_tol=1e-5)


def test_penalty_uses_the_named_estimator():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])
    mask = torch.ones(1, 2)
    _, k1 = kl_penalty_rewards(logp, ref, torch.zeros(1), mask, 0.1, "k1")
    _, k3 = kl_penalty_rewards(logp, ref, torch.zeros(1), mask, 0.1, "k3")
    assert torch.allclose(k1, logp - ref) and torch.allclose(k3, k3_kl(logp, ref))


def test_a_horizon_shorter_than_a_rollout_moves_at_most_twenty_percent():
    ada = AdaptiveKLController(1.0, target=1.0, horizon=10)
    ada.update(0.0, 1000)  # error -100% clipped to -20%; n / horizon capped at 1
    assert math.isclose(ada.value, 0.8)
    ada.update(50.0, 1000)
    assert math.isclose(ada.value, 0.8 * 1.2)


def _optimal_kl(ref: torch.Tensor, r: torch.Tensor, beta: float) -> float:
    """KL of the KL-regularised optimum pi ~ ref * exp(r / beta) to ref."""
    return _exact_kl(ref.log_softmax(-1) + r / beta, ref)


def test_controller_on_the_closed_form_optimum_settles_at_the_target():
    ref, r = torch.zeros(16), torch.linspace(0, 5, 16)
    ctl = AdaptiveKLController(0.05, target=0.5, horizon=64)
    for _ in range(60):
        ctl.update(_optimal_kl(ref, r, ctl.value), 64)
    assert abs(_optimal_kl(ref, r, ctl.value) / 0.5 - 1) < 0.05


def _toy_ppo(controller, rollouts: int = 250, n: int = 64, seed: int = 0) -> list[float]:
    """A one-token policy (16 actions, uniform reference, reward 0..5) trained by policy gradient
    on score - kl_coef * k1, the controller fed the k3 KL of each rollout as in the rollout loader.
    Returns the exact KL to the reference after each rollout."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.zeros(16)
    reward = torch.linspace(0, 5, 16)
    logits = torch.zeros(16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    kls = []
    for _ in range(rollouts):
        with torch.no_grad():
            a = torch.multinomial(logits.softmax(-1), n, replacement=True, generator=g)
            old = logits.log_softmax(-1)[a][:, None]
            refp = ref.log_softmax(-1)[a][:, None]
            mask = torch.ones(n, 1)
            tok_rewards, _ = kl_penalty_rewards(old, refp, reward[a], mask, controller.value, "k1")
            ret = tok_rewards.sum(1)
            adv = (ret - ret.mean()) / (ret.std() + 1e-8)  # whitened, as PPO does
            measured = float(sequence_kl(old, refp, mask)[0].mean())
        loss = -(adv * logits.log_softmax(-1)[a]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.update(measured, n)
        kls.append(_exact_kl(logits.detach(), ref))
    return kls


def test_adaptive_kl_tracks_its_target_on_a_toy_policy_and_a_fixed_coefficient_does_not():
    # the policy answers the coefficient with a lag of tens of rollouts (one Adam step each), so
    # the horizon is four rollouts: a shorter one overshoots and oscillates on this plant
    target = 0.5
    tracked = _toy_ppo(AdaptiveKLController(0.05, target=target, horizon=4 * 64))
    late = sum(tracked[-80:]) / 80
    assert abs(late / target - 1) < 0.3, late
    free = _toy_ppo(FixedKLController(0.05))
    assert sum(free[-80:]) / 80 > 4 * target  # the same start without control drifts far past it


def test_guard_trips_above_its_multiple_and_counts():
    guard = KLGuard(3.0, target=2.0)
    assert not guard.check(5.9) and guard.check(6.1) and not guard.check(float("nan"))
    assert guard.trips == 1 and "exceeds 3 x target_kl = 6;" in guard.message(4, 6.1, 0.1)
    off = KLGuard(0.0, target=2.0)
    assert not off.check(1e9) and off.trips == 0


def test_distinct_n_and_the_hacking_warning():
    assert distinct_n([[1, 2, 3], [4, 5]], 2) == 1.0
    assert distinct_n([[7, 7, 7, 7]], 2) == 1 / 3 and math.isnan(distinct_n([[1]], 2))
    start = {"r": 0.1, "d": 0.9, "nll": 1.0}
    assert (
        hacking_warning(start, {"r": 0.5, "d": 0.8, "nll": 1.2}, reward="r", distinct="d", nll="nll") is None
    )
    w = hacking_warning(start, {"r": 0.5, "d": 0.3, "nll": 1.2}, reward="r", distinct="d", nll="nll")
    assert w and "possible reward hacking" in w and "0.900 -> 0.300" in w
    w = hacking_warning(start, {"r": 0.5, "d": 0.9, "nll": 2.0}, reward="r", distinct="d", nll="nll")
    assert w and "NLL" in w
    # diversity collapsed but the reward did not rise: not hacking (just a bad run)
    assert hacking_warning(start, {"r": 0.0, "d": 0.1}, reward="r", distinct="d") is None
