"""Compute-optimal planning: allocations, budgets, inference-aware mode, LR/batch, warnings."""

import argparse
import json

import pytest

from lmforge.errors import ConfigError
from lmforge.scaling import laws as L
from lmforge.scaling import plan as P
from lmforge.scaling.cli import add_parser
from lmforge.scaling.cost import peak_flops


def run_cli(argv, capsys):
    ap = argparse.ArgumentParser(prog="lmforge")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["scaling", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_law_optimum_and_rule_of_thumb():
    p = P.make_plan(1e22)
    o, r = p.optimal, p.rule_of_thumb
    assert o.train_flops == pytest.approx(1e22) and r.train_flops == pytest.approx(1e22)
    assert r.tokens_per_param == pytest.approx(20.0)
    assert o.loss <= r.loss  # the law's optimum is the best split of the same compute
    assert o.loss == pytest.approx(P.DEFAULT_PLAN_LAW.loss(o.n_params, o.tokens))
    assert p.law is P.DEFAULT_PLAN_LAW is L.BESIROGLU2024 and p.inference_aware is None
    assert not any("1e+2" in w for w in p.warnings)


def test_chinchilla_budget_rule_gives_chinchilla():
    # Gopher's budget 5.76e23 FLOPs with 20 tokens/param -> Chinchilla's 70B x 1.4T
    r = P.make_plan(5.76e23).rule_of_thumb
    assert r.n_params == pytest.approx(70e9, rel=0.02)
    assert r.tokens == pytest.approx(1.4e12, rel=0.02)


def test_budget_forms_agree():
    hours = 1000.0
    f = hours * 3600 * peak_flops("A100") * 0.5
    assert P.budget_to_flops(gpu_hours=hours, accelerator="A100", mfu=0.5) == pytest.approx(f)
    assert P.budget_to_flops(money=2000.0, accelerator="A100", mfu=0.5, price_per_hour=2.0) == pytest.approx(
        f
    )
    p = P.make_plan(money=2000.0, accelerator="A100", mfu=0.5, price_per_hour=2.0, n_gpus=10)
    assert p.budget_flops == pytest.approx(f)
    assert p.optimal.cost.gpu_hours == pytest.approx(hours)
    assert p.optimal.cost.wall_hours == pytest.approx(100.0)
    assert p.optimal.cost.cost_usd == pytest.approx(2000.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"budget_flops": 1e20, "gpu_hours": 3.0}, "exactly one"),
        ({"money": 1000.0, "accelerator": "H200"}, "no catalogue price"),
        ({"budget_flops": -5.0}, "positive"),
        ({"gpu_hours": 10.0, "mfu": 1.5}, "mfu"),
        ({"target_loss": 1.5}, "irreducible"),
        ({"budget_flops": 1e20, "inference_tokens": -1.0}, "inference_tokens"),
    ],
)
def test_plan_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        P.make_plan(**kwargs)


def test_target_loss_plans_smallest_budget():
    target = 2.2
    p = P.make_plan(target_loss=target)
    assert p.optimal.loss == pytest.approx(target, abs=1e-6)
    assert p.law.optimal_loss(p.budget_flops * 0.9) > target


def test_inference_aware_is_smaller_trained_longer_same_loss():
    p = P.make_plan(1e23, inference_tokens=5e12)
    o, i = p.optimal, p.inference_aware
    assert i.loss == pytest.approx(o.loss, abs=1e-9)
    assert i.n_params < o.n_params and i.tokens > o.tokens
    assert i.train_flops > o.train_flops  # pays more up front...
    assert i.lifetime_flops < o.lifetime_flops  # ...and less over the model's life
    assert o.inference_flops == pytest.approx(2 * o.n_params * 5e12)
    # with next to no inference, the inference-aware plan is the compute-optimal one
    q = P.make_plan(1e23, inference_tokens=1.0)
    assert q.inference_aware.n_params == pytest.approx(q.optimal.n_params, rel=1e-3)


def test_regulatory_thresholds():
    assert P.threshold_warnings(1e24) == []
    eu = P.threshold_warnings(5e25)
    assert len(eu) == 1 and "EU AI Act" in eu[0]
    both = P.threshold_warnings(2e26)
    assert len(both) == 2 and "1e+26" in both[0] and "14110" in both[0]
    p = P.make_plan(2e26, price_per_hour=2.0)
    assert any("1e+26" in w for w in p.warnings)


def test_deepseek_hparams():
    hp = P.recommend_hparams(1e20, seq_len=4096)
    # DeepSeek LLM (arXiv:2401.02954) Eq. 1: B = 0.2920 C^0.3271, eta = 0.3118 C^-0.1250
    assert hp.batch_tokens == pytest.approx(0.2920 * 1e20**0.3271)
    assert hp.lr == pytest.approx(0.3118 * 1e20**-0.125)
    assert hp.lr == pytest.approx(9.86e-4, rel=1e-3)
    assert hp.batch_sequences == round(hp.batch_tokens / 4096)
    assert "2401.02954" in hp.source and not hp.notes
    far = P.recommend_hparams(1e26)
    assert any("extrapolated" in n for n in far.notes)


def test_hparams_from_user_sweep_override():
    lr_law = L.PowerLaw("lr_opt(C)", 1.0, -0.2, 4, 0.99, "C", "lr", "your sweep")
    hp = P.recommend_hparams(1e20, laws={"lr": lr_law})
    assert hp.lr == pytest.approx(1e20**-0.2)
    assert hp.batch_tokens == pytest.approx(0.2920 * 1e20**0.3271)  # still DeepSeek
    assert "your sweep" in hp.source and "2401.02954" in hp.source


def test_plan_with_fitted_law_file(tmp_path):
    law = L.ParametricLaw(E=2.0, A=300.0, B=900.0, alpha=0.3, beta=0.3)
    (tmp_path / "fit.json").write_text(json.dumps({"parametric": {"law": law.to_dict()}}))
    p = P.make_plan(1e21, law=str(tmp_path / "fit.json"))
    assert p.law.E == 2.0 and p.law.name == "fit:fit.json"
    # alpha == beta and A/B = 1/3: N_opt = (A/B)^(1/0.6) (C/6)^0.5
    assert p.optimal.n_params == pytest.approx((300 / 900) ** (1 / 0.6) * (1e21 / 6) ** 0.5)
    assert not any("Chinchilla's published fit" in w for w in p.warnings)
    assert not any(w.startswith("your fit") for w in p.warnings)  # no runs, no warnings listed
    # a real fit.json carries its runs and warnings: the plan repeats them and measures the
    # extrapolation in decades of compute
    runs = [
        {"params": 1e6, "tokens": 2e7, "compute": 1.2e14},
        {"params": 4e6, "tokens": 4e7, "compute": 9.6e14},
    ]
    (tmp_path / "fit.json").write_text(
        json.dumps(
            {
                "runs": runs,
                "parametric": {
                    "law": law.to_dict(),
                    "warnings": ["bootstrap: E ended on its bound in 9 of 40 resamples"],
                    "ci95": {"alpha": [0.2, 0.4], "beta": [0.25, 0.35]},
                },
            }
        )
    )
    w = P.make_plan(9.6e16, law=str(tmp_path / "fit.json")).warnings
    assert "your fit: bootstrap: E ended on its bound in 9 of 40 resamples" in w
    assert any("C = 9.6e+16 is 2.0 decade(s) beyond its runs" in x and "alpha in [0.2, 0.4]" in x for x in w)
    assert not any("beyond its runs" in x for x in P.make_plan(5e14, law=str(tmp_path / "fit.json")).warnings)
    (tmp_path / "skipped.json").write_text(json.dumps({"parametric": {"skipped": "too few runs"}}))
    with pytest.raises(ConfigError, match="too few runs"):
        P.make_plan(1e21, law=str(tmp_path / "skipped.json"))


def test_cli_plan(tmp_path, capsys):
    rc, out = run_cli(
        [
            "plan",
            "--flops",
            "5.76e23",
            "--inference-tokens",
            "2T",
            "--seq-len",
            "2048",
            "--n-gpus",
            "1000",
            "--price",
            "2.5",
            "--json",
        ],
        capsys,
    )
    data = json.loads(out)
    assert data["rule_of_thumb"]["n_params"] == pytest.approx(69.3e9, rel=0.01)
    assert data["inference_aware"]["n_params"] < data["optimal"]["n_params"]
    assert data["optimal"]["cost"]["price_per_hour"] == 2.5
    rc, out = run_cli(["plan", "--gpu-hours", "1000", "--gpu", "A100", "--law", "besiroglu2024"], capsys)
    assert rc == 0 and "besiroglu2024" in out and "peak LR" in out
    with pytest.raises(SystemExit):  # the budget options are mutually exclusive
        run_cli(["plan", "--flops", "1e20", "--gpu-hours", "5"], capsys)
    with pytest.raises(ConfigError, match="not a known law"):
        run_cli(["plan", "--flops", "1e20", "--law", str(tmp_path / "missing.json")], capsys)


# Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens)
TABLE3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
]


@pytest.mark.parametrize("n,flops,tokens", TABLE3)
def test_default_plan_reproduces_chinchilla_table3(n, flops, tokens):
    o = P.make_plan(flops).optimal
    assert o.n_params == pytest.approx(n, rel=0.15) and o.tokens == pytest.approx(tokens, rel=0.15)


def test_rounded_chinchilla_law_is_still_available_and_far_from_table3():
    o = P.make_plan(5.76e23, law="chinchilla").optimal
    assert o.n_params < 0.6 * 67e9  # the issue this default fixes: 32B / 3.0T
