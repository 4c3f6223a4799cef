"""Scaling laws, compute-optimal planning, and cost/energy/CO2 estimates.

    flops.py   FLOPs per token (6N and exact with attention), MFU
    laws.py    run tables (CSV/JSONL/JSON/run dirs) and fits: Chinchilla approaches 2 and 3,
               Kaplan single-variable laws, LR/batch laws from a sweep
    plan.py    budget -> compute-optimal N, D, loss, time, cost; inference-aware; LR/batch
    cost.py    accelerator catalogue (cited) and GPU-hours / cost / kWh / tCO2e
    plots.py   PNG plots (matplotlib, imported lazily)
    cli.py     `lmforge scaling flops|fit|plan|cost`
    sweep.py   (to come with the training engine) runs a grid of N x D and feeds `fit`

Only light modules are imported here; scipy and matplotlib load when a fit or plot needs them.
"""

from lmforge.scaling.cost import (
    CATALOGUE,
    Accelerator,
    CostEstimate,
    device_peak_flops,
    estimate_cost,
    get_accelerator,
    match_device_name,
    peak_flops,
)
from lmforge.scaling.flops import (
    FlopsPerToken,
    flops_per_token,
    flops_per_token_from_shape,
    mfu,
    parse_quantity,
    training_flops,
    training_flops_for_config,
)
from lmforge.scaling.laws import (
    BESIROGLU2024,
    CHINCHILLA,
    FitError,
    ParametricLaw,
    PowerLaw,
    RunTable,
    fit_hparam_laws,
    fit_isoflop,
    fit_kaplan,
    fit_parametric,
    load_law,
    load_runs,
)
from lmforge.scaling.plan import Plan, make_plan, recommend_hparams

__all__ = [
    "CATALOGUE",
    "Accelerator",
    "CostEstimate",
    "device_peak_flops",
    "estimate_cost",
    "get_accelerator",
    "match_device_name",
    "peak_flops",
    "FlopsPerToken",
    "flops_per_token",
    "flops_per_token_from_shape",
    "mfu",
    "parse_quantity",
    "training_flops",
    "training_flops_for_config",
    "BESIROGLU2024",
    "CHINCHILLA",
    "FitError",
    "ParametricLaw",
    "PowerLaw",
    "RunTable",
    "fit_hparam_laws",
    "fit_isoflop",
    "fit_kaplan",
    "fit_parametric",
    "load_law",
    "load_runs",
    "Plan",
    "make_plan",
    "recommend_hparams",
]
