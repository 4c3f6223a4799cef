"""Preference losses against hand-computed values, TRL's formulas, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.objectives.preference import (
    LOG2,
    PreferenceObjective,
    bradley_terry_loss,
    completion_logps,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    log1mexp,
    orpo_loss,
    preference_eval_metrics,
    reward_metrics,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


# policy / reference summed log-probs of two pairs
PC, PR, RC, RR = t(-10.0, -4.0), t(-12.0, -3.0), t(-11.0, -4.5), t(-11.5, -3.5)
H = [(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 3.5)]  # log-ratio differences: 1.5, 0.0


def test_dpo_sigmoid_hand_values_and_rewards():
    beta = 0.1
    out = dpo_loss(PC, PR, RC, RR, beta)
    want = [-math.log(sig(beta * h)) for h in H]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * 1.0, 0.1 * 0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 0.5])
    m = reward_metrics(out)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx(0.1 * (1.5 + 0) / 2)


def test_dpo_equals_log2_when_policy_is_reference():
    x, y = torch.randn(16, dtype=torch.float64) * 20, torch.randn(16, dtype=torch.float64) * 20
    for ls in (0.0, 0.2):
        out = dpo_loss(x, y, x.clone(), y.clone(), beta=0.37, label_smoothing=ls)
        assert torch.allclose(out.losses, torch.full_like(x, LOG2), atol=1e-12)


def test_conservative_dpo_matches_trl_formula():
    beta, eps = 0.5, 0.1
    out = dpo_loss(PC, PR, RC, RR, beta, label_smoothing=eps)
    logits = (PC - PR) - (RC - RR)  # TRL: pi_logratios - ref_logratios
    trl = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    assert torch.allclose(out.losses, trl)
    assert out.losses[0] == pytest.approx(-(0.9 * math.log(sig(0.75)) + 0.1 * math.log(sig(-0.75))))


def test_ipo_and_hinge_hand_values():
    beta = 0.25  # IPO target margin 1/(2 beta) = 2
    assert ipo_loss(PC, PR, RC, RR, beta).losses.tolist() == pytest.approx([(1.5 - 2) ** 2, (0 - 2) ** 2])
    assert hinge_loss(PC, PR, RC, RR, 0.5).losses.tolist() == pytest.approx([max(0, 1 - 0.75), 1.0])
    assert hinge_loss(PC, PR, RC, RR, 4.0).losses.tolist() == pytest.approx([0.0, 1.0])  # margin met: no loss


def test_orpo_hand_values_and_trl_formula():
    mc, mr, lam = t(-0.5, -2.0), t(-1.5, -1.0), 0.1
    out = orpo_loss(mc, mr, lam)
    for i, (a, b) in enumerate(zip(mc.tolist(), mr.tolist())):
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        want = -a - lam * math.log(sig(log_odds))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12)
    trl_log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
    assert torch.allclose(out.extra["log_odds_chosen"], trl_log_odds)
    assert torch.allclose(out.chosen_rewards, lam * mc)


def test_log1mexp_is_stable():
    x = t(-1e-9, -1e-3, -0.5, -5.0, -50.0)
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    assert y[2].item() == pytest.approx(math.log(1 - math.exp(-0.5)))
    assert y[4].item() == pytest.approx(-math.exp(-50.0), rel=1e-6)


def test_bradley_terry_with_margin():
    rc, rr = t(2.0, 0.0), t(1.0, 0.5)
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.5))])
    assert bradley_terry_loss(rc, rr, t(1.0, 0.0)).tolist() == pytest.approx([LOG2, -math.log(sig(-0.5))])


def test_eval_metrics_at_start_and_kl():
    nc, nr = t(4, 2), t(3, 3)
    m = preference_eval_metrics(PC, PR, nc, nr, PC, PR, "dpo", 0.1)
    assert m["loss"] == pytest.approx(LOG2) and m["log_ratio_chosen"] == 0 and m["reward_accuracy"] == 0.5
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(((-10 + 12) + (-4 + 3)) / 2)
    m = preference_eval_metrics(PC, PR, nc, nr, RC, RR, "dpo", 0.1)
    assert m["log_ratio_chosen"] == pytest.approx(((-10 + 11) + (-4 + 4.5)) / 6)
    assert m["reward_accuracy"] == pytest.approx(0.75)  # one win, one tie


def test_completion_logps_counts_only_labelled_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()
    ids = torch.randint(0, 40, (2, 7))
    labels = torch.full((2, 7), -100)
    labels[0, 2:5] = ids[0, 3:6]
    labels[1, 0:6] = ids[1, 1:7]
    lp, n = completion_logps(model, ids, labels)
    full = torch.log_softmax(model(ids).float(), -1)
    want0 = sum(full[0, t, ids[0, t + 1]] for t in range(2, 5))
    assert n.tolist() == [3, 6] and lp[0].item() == pytest.approx(want0.item(), abs=1e-5)
    # the objective's loss is log 2 per pair when the reference is the policy itself
    ids2 = torch.cat([ids, ids.flip(0)])
    labels2 = torch.cat([labels, labels.flip(0)])
    lp2, _ = completion_logps(model, ids2, labels2)
    batch = {"input_ids": ids2, "labels": labels2, "ref_logps": lp2.detach()}
    loss, count, metrics = PreferenceObjective("dpo", 0.1)(model, batch)
    assert count == 2 and loss.item() == pytest.approx(2 * LOG2, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
