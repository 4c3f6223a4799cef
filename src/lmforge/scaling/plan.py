"""Compute-optimal planning: how to split a budget between parameters and tokens.

Given a budget (FLOPs, GPU-hours on a named GPU at an assumed MFU, money at a price per
GPU-hour, or a target loss) the planner returns:

* the law's compute-optimal (N, D) under C = 6ND and its predicted loss
  (`ParametricLaw.optimal`: N_opt = G (C/6)^(beta/(alpha+beta)), Hoffmann et al. 2022);
* the ~20 tokens-per-parameter rule (Hoffmann et al. 2022, Table 3: Chinchilla 70B on 1.4T
  tokens), i.e. N = sqrt(C / (6 x 20));
* optionally an **inference-aware** plan (Sardana et al. 2024, "Beyond Chinchilla-Optimal",
  arXiv:2401.00448): the same predicted loss at the lowest *lifetime* FLOPs
  6 N D + 2 N D_inference. With inference tokens the model gets smaller and trains on more
  tokens; its training FLOPs exceed the budget, its lifetime FLOPs are lower;
* time, cost, energy and CO2 of each (`cost.estimate_cost`);
* a recommended batch size and peak learning rate for the compute, from the user's sweep
  (`laws.fit_hparam_laws`, stored in fit.json) or DeepSeek LLM's published fit
  (Bi et al. 2024, arXiv:2401.02954, Sec. 3.1, Eq. 1):
  B_opt = 0.2920 C^0.3271 tokens, eta_opt = 0.3118 C^-0.1250;
* a warning when a run crosses a regulatory compute threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError
from lmforge.scaling.cost import (
    DEFAULT_CARBON_INTENSITY,
    DEFAULT_MFU,
    DEFAULT_PUE,
    CostEstimate,
    estimate_cost,
    get_accelerator,
    peak_flops,
)
from lmforge.scaling.laws import (
    BESIROGLU2024,
    CHINCHILLA,
    PUBLISHED_LAWS,
    ParametricLaw,
    PowerLaw,
    load_fit_json,
    load_law,
)

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, Table 3 (70B params, 1.4T tokens)
# The default law of `scaling plan`: Epoch's refit of Chinchilla's own runs. Its compute-optimal
# split reproduces Hoffmann et al.'s Table 3 within 15% in N and D for every row from 400M to
# 1T parameters (Chinchilla's budget 5.76e23: 72B / 1.33T vs the paper's 67B / 1.5T; the 10T
# row is 23% off); the rounded approach-3 law printed in the paper gives 32B / 3.0T there (half
# the paper's N), because its B and beta were ill-fitted (Besiroglu et al. 2024).
DEFAULT_PLAN_LAW = BESIROGLU2024

# Compute thresholds with legal meaning (training FLOPs, cumulative).
REPORTING_THRESHOLDS = [
    (
        1e26,
        "US Executive Order 14110 (30 Oct 2023), Sec. 4.2(b)(i): models trained with more "
        "than 1e26 operations must be reported to the US government (the order was revoked "
        "on 20 Jan 2025; the threshold remains the reference figure)",
    ),
    (
        1e25,
        "EU AI Act (Regulation 2024/1689), Art. 51(2): more than 1e25 FLOPs presumes a "
        "general-purpose model has systemic risk (obligations of Art. 55)",
    ),
]

# DeepSeek LLM (Bi et al. 2024, arXiv:2401.02954), Sec. 3.1, Eq. 1. C is their compute
# M*D (non-embedding FLOPs/token x tokens, ~6ND); batch size in tokens; fitted on 1e17-2e19
# FLOPs and checked at 1e20, AdamW with a multi-step schedule.
DEEPSEEK_BATCH = PowerLaw(
    "batch_tokens_opt(C)",
    0.2920,
    0.3271,
    0,
    float("nan"),
    "C",
    "batch_tokens",
    "DeepSeek LLM, arXiv:2401.02954, Sec. 3.1, Eq. 1",
)
DEEPSEEK_LR = PowerLaw(
    "lr_opt(C)",
    0.3118,
    -0.1250,
    0,
    float("nan"),
    "C",
    "lr",
    "DeepSeek LLM, arXiv:2401.02954, Sec. 3.1, Eq. 1",
)
_DEEPSEEK_RANGE = (1e17, 3e20)


def threshold_warnings(flops: float, what: str = "training") -> list[str]:
    return [
        f"{what} compute {flops:.3g} FLOPs crosses {t:.0e}: {why}"
        for t, why in REPORTING_THRESHOLDS
        if flops > t
    ]


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class HparamAdvice:
    batch_tokens: float
    lr: float
    batch_sequences: int | None
    source: str
    notes: list[str] = field(default_factory=list)


def recommend_hparams(
    flops: float, seq_len: int | None = None, laws: dict[str, PowerLaw] | None = None
) -> HparamAdvice:
    """Batch size (tokens) and peak LR for a training compute, from `laws` (your sweep's
    {'lr': ..., 'batch_tokens': ...}) where present, else DeepSeek LLM's fit."""
    laws = laws or {}
    blaw, llaw = laws.get("batch_tokens", DEEPSEEK_BATCH), laws.get("lr", DEEPSEEK_LR)
    notes = []
    for law, default in ((blaw, DEEPSEEK_BATCH), (llaw, DEEPSEEK_LR)):
        if law is default and not (_DEEPSEEK_RANGE[0] / 10 <= flops <= _DEEPSEEK_RANGE[1] * 1e3):
            notes.append(
                f"{law.name}: C = {flops:.2g} is far outside the fitted range "
                f"({_DEEPSEEK_RANGE[0]:.0e}-{_DEEPSEEK_RANGE[1]:.0e} FLOPs); extrapolated"
            )
    bt = float(blaw(flops))
    sources = sorted({blaw.source, llaw.source})
    return HparamAdvice(
        batch_tokens=bt,
        lr=float(llaw(flops)),
        batch_sequences=max(1, round(bt / seq_len)) if seq_len else None,
        source="; ".join(sources),
        notes=notes,
    )


# ----------------------------------------------------------------------------- plans
@dataclass
class Allocation:
    label: str
    n_params: float
    tokens: float
    train_flops: float
    loss: float  # predicted by the law
    cost: CostEstimate
    inference_flops: float = 0.0

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.n_params

    @property
    def lifetime_flops(self) -> float:
        return self.train_flops + self.inference_flops

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cost"] = self.cost.to_dict()
        d.update(tokens_per_param=self.tokens_per_param, lifetime_flops=self.lifetime_flops)
        return d


@dataclass
class Plan:
    budget_flops: float
    law: ParametricLaw
    optimal: Allocation
    rule_of_thumb: Allocation
    inference_aware: Allocation | None
    hparams: HparamAdvice
    inference_tokens: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "budget_flops": self.budget_flops,
            "law": self.law.to_dict(),
            "optimal": self.optimal.to_dict(),
            "rule_of_thumb": self.rule_of_thumb.to_dict(),
            "inference_aware": self.inference_aware and self.inference_aware.to_dict(),
            "inference_tokens": self.inference_tokens,
            "hparams": asdict(self.hparams),
            "warnings": self.warnings,
        }


def budget_to_flops(
    *,
    flops: float | None = None,
    gpu_hours: float | None = None,
    money: float | None = None,
    accelerator: str = "H100-SXM",
    mfu: float = DEFAULT_MFU,
    price_per_hour: float | None = None,
    dtype: str = "auto",
) -> float:
    """Training FLOPs a budget buys: FLOPs as given, or GPU-hours (or money / price) x
    3600 x peak x MFU."""
    given = [x is not None for x in (flops, gpu_hours, money)]
    if sum(given) != 1:
        raise ConfigError("give exactly one budget: FLOPs, GPU-hours or money")
    if flops is not None:
        return _pos("flops", flops)
    acc = get_accelerator(accelerator)
    if not (0 < mfu <= 1):
        raise ConfigError(f"mfu must be in (0, 1], got {mfu!r}")
    if money is not None:
        price = price_per_hour if price_per_hour is not None else acc.price_per_hour
        if price is None:
            raise ConfigError(f"no catalogue price for {acc.name}; pass a price per GPU-hour (--price)")
        gpu_hours = _pos("money", money) / _pos("price_per_hour", price)
    assert gpu_hours is not None  # exactly one budget was given, and not flops or money
    return _pos("gpu_hours", gpu_hours) * 3600.0 * peak_flops(acc, dtype) * mfu


def flops_for_loss(law: ParametricLaw, target_loss: float) -> float:
    """The smallest compute whose compute-optimal model reaches `target_loss` under `law`."""
    if not target_loss > law.E:
        raise ConfigError(
            f"target loss {target_loss} is not above the law's irreducible loss "
            f"E = {law.E:.4g}; no finite budget reaches it"
        )
    from scipy.optimize import brentq

    f = lambda lc: law.optimal_loss(10.0**lc) - target_loss  # noqa: E731
    lo, hi = 0.0, 60.0
    if f(lo) < 0:
        return 10.0**lo
    if f(hi) > 0:
        raise ConfigError(f"target loss {target_loss} needs more than 1e60 FLOPs under this law")
    return 10.0 ** brentq(f, lo, hi, xtol=1e-10)


def inference_aware_allocation(
    law: ParametricLaw, target_loss: float, inference_tokens: float
) -> tuple[float, float]:
    """(N, D) reaching `target_loss` at minimal 6ND + 2N D_inf (Sardana et al. 2024)."""
    from scipy.optimize import minimize_scalar

    gap = target_loss - law.E
    if gap <= 0:
        raise ConfigError(f"target loss {target_loss} is not above E = {law.E:.4g}")
    n_min = (law.A / gap) ** (1.0 / law.alpha)  # infinite data needed below this size

    def log_tokens(u: float) -> float:  # ln D(N) on the iso-loss curve, u = ln N
        rest = gap - law.A * math.exp(-law.alpha * u)
        return (math.log(law.B) - math.log(max(rest, 1e-300))) / law.beta

    def lifetime(u: float) -> float:  # ln(6 N D + 2 N D_inf), in logs to avoid overflow
        lt = log_tokens(u)
        if inference_tokens > 0:
            return u + float(np.logaddexp(math.log(6.0) + lt, math.log(2.0 * inference_tokens)))
        return u + math.log(6.0) + lt

    n_ref = law.optimal(flops_for_loss(law, target_loss))[0]
    lo, hi = math.log(n_min) + 1e-9, math.log(max(n_ref, n_min * 1.001)) + 1e-9
    res = minimize_scalar(
        lifetime, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10, "maxiter": 500}
    )
    return math.exp(res.x), math.exp(log_tokens(res.x))


def make_plan(
    budget_flops: float | None = None,
    *,
    gpu_hours: float | None = None,
    money: float | None = None,
    target_loss: float | None = None,
    law: ParametricLaw | str | None = None,
    accelerator: str = "H100-SXM",
    n_gpus: int = 8,
    mfu: float = DEFAULT_MFU,
    price_per_hour: float | None = None,
    dtype: str = "auto",
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM,
    inference_tokens: float = 0.0,
    seq_len: int | None = None,
    hparam_laws: dict[str, PowerLaw] | None = None,
    pue: float = DEFAULT_PUE,
    carbon_intensity: float = DEFAULT_CARBON_INTENSITY,
) -> Plan:
    """Plan a run for a budget (FLOPs, GPU-hours, money) or a target loss. See module doc."""
    law_spec = law
    law = load_law(law) if law is not None else DEFAULT_PLAN_LAW
    given = sum(x is not None for x in (budget_flops, gpu_hours, money, target_loss))
    if given != 1:
        raise ConfigError("give exactly one of: a FLOPs budget, GPU-hours, money, a target loss")
    if target_loss is not None:
        budget = flops_for_loss(law, target_loss)
    else:
        budget = budget_to_flops(
            flops=budget_flops,
            gpu_hours=gpu_hours,
            money=money,
            accelerator=accelerator,
            mfu=mfu,
            price_per_hour=price_per_hour,
            dtype=dtype,
        )
    _pos("tokens_per_param", tokens_per_param)
    if inference_tokens < 0 or not math.isfinite(inference_tokens):
        raise ConfigError(f"inference_tokens must be >= 0, got {inference_tokens!r}")

    def cost(flops: float) -> CostEstimate:
        return estimate_cost(
            flops,
            accelerator=accelerator,
            n_gpus=n_gpus,
            mfu=mfu,
            dtype=dtype,
            price_per_hour=price_per_hour,
            pue=pue,
            carbon_intensity=carbon_intensity,
        )

    def alloc(label: str, n: float, d: float) -> Allocation:
        c = 6.0 * n * d
        return Allocation(label, n, d, c, law.loss(n, d), cost(c), 2.0 * n * inference_tokens)

    n_opt, d_opt = law.optimal(budget)
    optimal = alloc(f"compute-optimal ({law.name})", n_opt, d_opt)
    n_rule = math.sqrt(budget / (6.0 * tokens_per_param))
    rule = alloc(f"{tokens_per_param:g} tokens/parameter", n_rule, tokens_per_param * n_rule)
    inf_alloc = None
    if inference_tokens > 0:
        n_inf, d_inf = inference_aware_allocation(law, optimal.loss, inference_tokens)
        inf_alloc = alloc(f"inference-aware ({inference_tokens:.3g} inference tokens)", n_inf, d_inf)
    warnings: list[str] = []
    for a in (optimal, rule, inf_alloc):
        if a is not None:
            for w in threshold_warnings(a.train_flops, f"{a.label}: training"):
                if w not in warnings:
                    warnings.append(w)
    if isinstance(law_spec, (str, Path)) and str(law_spec).strip().lower() not in PUBLISHED_LAWS:
        warnings.extend(fit_caveats(law_spec, budget))
    if law.name == CHINCHILLA.name:
        warnings.append(
            "law: Chinchilla's published fit (MassiveText data, its tokenizer); "
            "losses on your data differ; fit your own with `lmforge scaling fit`"
        )
    hp = recommend_hparams(budget, seq_len, hparam_laws)
    warnings.extend(hp.notes)
    return Plan(budget, law, optimal, rule, inf_alloc, hp, float(inference_tokens), warnings)


def fit_caveats(fit_json: str | Path, budget: float) -> list[str]:
    """What a plan from your own fit should say about it: the fit's own warnings (e.g. a
    parameter its bootstrap could not pin down) and how far `budget` lies beyond its runs."""
    data = load_fit_json(fit_json)
    out = [f"your fit: {w}" for w in (data.get("parametric") or {}).get("warnings", [])]
    compute = [float(r["compute"]) for r in data.get("runs", []) if r.get("compute")]
    if compute and not (min(compute) <= budget <= max(compute)):
        far = budget / max(compute) if budget > max(compute) else min(compute) / budget
        ci = (data.get("parametric") or {}).get("ci95", {})
        spread = ", ".join(f"{k} in [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" for k in ("alpha", "beta") if k in ci)
        out.append(
            f"your fit: C = {budget:.3g} is {math.log10(far):.1f} decade(s) "
            f"{'beyond' if budget > max(compute) else 'below'} its runs (C = "
            f"{min(compute):.3g} to {max(compute):.3g}); the prediction is an extrapolation"
            + (f" (bootstrap 95%: {spread})" if spread else "")
        )
    return out


def _pos(name: str, v: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
    return x
