"""Scaling-law fits from a table of runs (N parameters, D tokens, final loss).

Three estimators, as in Hoffmann et al. 2022 ("Chinchilla", arXiv:2203.15556) and Kaplan et
al. 2020 (arXiv:2001.08361):

* **Approach 3, parametric**: L(N, D) = E + A/N^alpha + B/D^beta. Parametrised as
  log L = LSE(a - alpha log N, b - beta log D, e) with A, B, E = exp(a, b, e), we minimise the
  *sum* of Huber losses (delta = 1e-3) of log-space residuals with L-BFGS-B, started from the
  paper's grid (alpha, beta in {0, .5, .., 2}, e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}).
  To stay fast the whole grid is *evaluated* and L-BFGS runs from its `n_starts` best points.
  The objective is divided by delta so its gradient is O(1): Besiroglu et al. 2024
  (arXiv:2404.10102) traced Chinchilla's implausible estimates to an optimiser that stopped
  early on a badly scaled loss. Confidence intervals: bootstrap over runs (percentile, 95%),
  each resample warm-started from the point estimate.
* **Approach 2, IsoFLOP**: runs grouped by compute C = 6ND; per group a parabola of loss vs
  ln N, its minimum N_opt(C); then power laws N_opt = k C^a and D_opt = C / (6 N_opt).
* **Kaplan single-variable laws** L(X) = (X_c / X)^alpha_X for X = N, D (the best run per
  value of X) and C (the compute-efficient frontier).

Bad input is refused with a message that says what is missing: fewer runs than parameters,
too few distinct N or D values, non-positive or NaN values (file and line named), a fit that
does not converge or ends on a bound.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError, LMForgeError
from lmforge.scaling.empirical import (  # noqa: F401  (re-exported: the laws' public names)
    IsoFlopFit,
    IsoFlopGroup,
    KaplanFit,
    PowerLaw,
    fit_hparam_laws,
    fit_isoflop,
    fit_kaplan,
    fit_power_law,
    group_by_compute,
    kaplan_frontier,
)
from lmforge.scaling.runtable import FitError, Run, RunTable, load_runs  # noqa: F401

HUBER_DELTA = 1e-3


# ============================================================================ laws
@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens, L in nats)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "fit"
    source: str = ""

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        out = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return float(out) if out.ndim == 0 else out

    @property
    def a(self) -> float:
        """Exponent of N_opt(C) = G (C/6)^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt(C) = G^-1 (C/6)^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal(self, flops: float) -> tuple[float, float]:
        """Compute-optimal (N, D) under C = 6ND (Hoffmann et al. 2022, App. D.2)."""
        n = self.G * (flops / 6.0) ** self.a
        return n, flops / 6.0 / n

    def optimal_loss(self, flops: float) -> float:
        return self.loss(*self.optimal(flops))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(a=self.a, b=self.b, G=self.G)
        return d

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> ParametricLaw:
        try:
            return cls(
                E=float(d["E"]),
                A=float(d["A"]),
                B=float(d["B"]),
                alpha=float(d["alpha"]),
                beta=float(d["beta"]),
                name=name or d.get("name", "fit"),
                source=d.get("source", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"law needs numeric E, A, B, alpha, beta ({e})") from None


CHINCHILLA = ParametricLaw(
    1.69,
    406.4,
    410.7,
    0.34,
    0.28,
    "chinchilla",
    "Hoffmann et al. 2022, Training Compute-Optimal LLMs, arXiv:2203.15556, Sec. 3.3 "
    "(approach 3; MassiveText, total parameters)",
)
BESIROGLU2024 = ParametricLaw(
    1.8172,
    482.01,
    2085.43,
    0.3478,
    0.3658,
    "besiroglu2024",
    "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt, arXiv:2404.10102 "
    "(refit of approach 3 on data read from Chinchilla's plots)",
)
PUBLISHED_LAWS = {law.name: law for law in (CHINCHILLA, BESIROGLU2024)}


def load_law(spec: str | Path | ParametricLaw | None = None) -> ParametricLaw:
    """A published law by name ('chinchilla', 'besiroglu2024') or the law in a fit.json."""
    if spec is None:
        return CHINCHILLA
    if isinstance(spec, ParametricLaw):
        return spec
    key = str(spec).strip().lower()
    if key in PUBLISHED_LAWS:
        return PUBLISHED_LAWS[key]
    data = load_fit_json(spec)
    law = (data.get("parametric") or {}).get("law")
    if not law:
        raise ConfigError(
            f"{spec}: has no parametric law (the fit was skipped: "
            f"{(data.get('parametric') or {}).get('skipped', 'unknown reason')})"
        )
    return ParametricLaw.from_dict(law, name=f"fit:{Path(str(spec)).name}")


def load_fit_json(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "fit.json"
    if not p.is_file():
        raise ConfigError(
            f"{path}: not a known law ({', '.join(PUBLISHED_LAWS)}) and no such "
            "fit.json (make one with `lmforge scaling fit ... --out DIR`)"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None


# ============================================================================ approach 3
def _lse_terms(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray):
    """Per-run terms of log L_hat = LSE(t1, t2, t3) for parameter rows theta (k, 5)."""
    a, b, e, al, be = (theta[:, i : i + 1] for i in range(5))
    t1 = a - al * logn[None, :]
    t2 = b - be * logd[None, :]
    t3 = np.broadcast_to(e, t1.shape)
    m = np.maximum(np.maximum(t1, t2), t3)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = w1 + w2 + w3
    return m + np.log(s), w1 / s, w2 / s, w3 / s


def _huber_scaled(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber(r) / delta: quadratic within delta, linear outside; gradient is clip(r/delta)."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta)


def _objective(theta, logn, logd, logl, delta):
    pred, w1, w2, w3 = _lse_terms(theta[None, :], logn, logd)
    r = pred[0] - logl
    g = np.clip(r / delta, -1.0, 1.0)
    grad = np.array(
        [
            np.sum(g * w1[0]),
            np.sum(g * w2[0]),
            np.sum(g * w3[0]),
            -np.sum(g * w1[0] * logn),
            -np.sum(g * w2[0] * logd),
        ]
    )
    return float(np.sum(_huber_scaled(r, delta))), grad


def _grid() -> np.ndarray:
    """Chinchilla's initialisation grid (Hoffmann et al. 2022, App. D.2): a, b, e, alpha, beta."""
    ab = np.arange(0, 30, 5.0)
    e = np.arange(-1, 1.01, 0.5)
    ex = np.arange(0, 2.01, 0.5)
    g = np.meshgrid(ab, ab, e, ex, ex, indexing="ij")
    return np.stack([x.ravel() for x in g], axis=1)


_NAMES = ("E", "A", "B", "alpha", "beta")


def _natural(theta: np.ndarray) -> dict[str, float]:
    a, b, e, al, be = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": al, "beta": be}


@dataclass
class ParametricFit:
    law: ParametricLaw
    ci95: dict[str, tuple[float, float]]  # bootstrap percentile intervals (also a, b)
    se: dict[str, float]
    n_runs: int
    n_bootstrap: int
    n_bootstrap_ok: int
    objective: float  # sum of Huber(delta) / delta at the optimum
    rmse_log: float  # RMS of log-space residuals
    huber_delta: float = HUBER_DELTA
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "law": self.law.to_dict(),
            "ci95": {k: list(v) for k, v in self.ci95.items()},
            "se": self.se,
            "n_runs": self.n_runs,
            "n_bootstrap": self.n_bootstrap,
            "n_bootstrap_ok": self.n_bootstrap_ok,
            "objective": self.objective,
            "rmse_log": self.rmse_log,
            "huber_delta": self.huber_delta,
            "warnings": self.warnings,
        }


_BOUNDS_EXP = (0.0, 5.0)  # alpha, beta; a, b, e are bounded in fit_parametric


def _check_spread(n: np.ndarray, d: np.ndarray, need: int = 3) -> None:
    for arr, label in ((n, "N (parameters)"), (d, "D (tokens)")):
        k = len(np.unique(arr))
        if k < need:
            raise FitError(
                f"the runs use only {k} distinct value(s) of {label}; the parametric "
                f"law needs at least {need} to separate its terms. Add runs at more "
                f"{label.split()[0]} values"
            )


def _minimize(theta0, args, bounds, maxiter=2000):
    from scipy.optimize import minimize

    return minimize(
        _objective,
        theta0,
        args=args,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-9},
    )


def _check_identified(theta: np.ndarray, bounds: list, table: RunTable) -> None:
    """Refuse a law that ends on a bound or whose N or D term explains nothing."""
    labels = ("a = ln A", "b = ln B", "e = ln E", "alpha", "beta")
    for i, (lo, hi) in enumerate(bounds):
        if not (lo + 5e-3 < theta[i] < hi - 5e-3):
            if i == 2:
                raise FitError(
                    f"the parametric fit is degenerate: the irreducible loss E = "
                    f"{math.exp(theta[i]):.3g} hit its bound; the runs show no loss "
                    "floor. Runs at larger N and D are needed to locate E"
                )
            var = "N" if i in (0, 3) else "D"
            raise FitError(
                f"the parametric fit is degenerate: {labels[i]} = {theta[i]:.3g} hit its "
                f"bound [{lo:g}, {hi:g}], so the runs do not pin down how loss depends on "
                f"{var}. Either loss barely depends on {var} here, or the sweep spans too "
                f"narrow a range; check the runs and widen the sweep"
            )
    nat = _natural(theta)
    resid = _lse_terms(theta[None, :], np.log(table.n), np.log(table.d))[0][0] - np.log(table.loss)
    noise = max(1e-4, float(np.sqrt(np.mean(resid**2))) * float(table.loss.mean()))
    for term, x, what in (
        (nat["A"] / table.n ** nat["alpha"], "N", "model sizes"),
        (nat["B"] / table.d ** nat["beta"], "D", "token counts"),
    ):
        if float(term.max() - term.min()) < noise:
            raise FitError(
                f"the fitted law says loss does not change with {x} across these runs "
                f"(the {x} term varies by {float(term.max() - term.min()):.2g} nats, "
                f"less than the noise {noise:.2g}); the fit cannot give a compute-optimal "
                f"{x}. Add runs over a wider range of {what}"
            )


def _one_blas_thread():
    """scipy's L-BFGS-B calls BLAS on 5-vectors; a multi-threaded OpenBLAS then spends 10-100x
    the useful time waking threads, worst on a busy machine. Pin it to one thread if
    threadpoolctl is installed (it usually is, next to scipy/joblib). The limit only reaches
    libraries already loaded, so import scipy.optimize first."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_parametric(
    table: RunTable, *, n_bootstrap: int = 200, seed: int = 0, n_starts: int = 16, delta: float = HUBER_DELTA
) -> ParametricFit:
    """Chinchilla approach 3 with bootstrap confidence intervals (see module docstring)."""
    try:
        import scipy.optimize  # noqa: F401  (loaded before the thread limit so that it applies)
    except ImportError:
        raise LMForgeError(
            "fitting needs scipy: pip install 'lmforge[plot]' (or pip install scipy)"
        ) from None
    with _one_blas_thread():
        return _fit_parametric(table, n_bootstrap, seed, n_starts, delta)


def _bootstrap(
    theta: np.ndarray,
    table: RunTable,
    bounds: list,
    n_bootstrap: int,
    seed: int,
    delta: float,
    warnings: list[str],
) -> tuple[dict[str, tuple[float, float]], dict[str, float], int]:
    """Percentile intervals and standard errors from resampled runs, each fit warm-started at
    the point estimate; warnings when resamples end on a bound or too few are usable."""
    n_runs = len(table)
    logn, logd, logl = np.log(table.n), np.log(table.d), np.log(table.loss)
    rng = np.random.default_rng(seed)
    samples, skipped = [], 0
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n_runs, n_runs)
        if len(np.unique(table.n[idx])) < 3 or len(np.unique(table.d[idx])) < 3:
            skipped += 1
            continue
        r = _minimize(theta, (logn[idx], logd[idx], logl[idx], delta), bounds, maxiter=500)
        if np.all(np.isfinite(r.x)):
            samples.append(r.x)
    ci: dict[str, tuple[float, float]] = {}
    se: dict[str, float] = {}
    if samples:
        s = np.array(samples)
        nat_s = {
            "E": np.exp(s[:, 2]),
            "A": np.exp(s[:, 0]),
            "B": np.exp(s[:, 1]),
            "alpha": s[:, 3],
            "beta": s[:, 4],
        }
        nat_s["a"] = nat_s["beta"] / (nat_s["alpha"] + nat_s["beta"])
        nat_s["b"] = 1.0 - nat_s["a"]
        for k, v in nat_s.items():
            lo, hi = np.percentile(v, [2.5, 97.5])
            ci[k] = (float(lo), float(hi))
            se[k] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        # A resample that ends on a bound means the interval is cut by the box, not by the data.
        for i, k in enumerate(("A", "B", "E", "alpha", "beta")):
            lo, hi = bounds[i]
            hit = int(np.sum((s[:, i] <= lo + 5e-3) | (s[:, i] >= hi - 5e-3)))
            if hit > 0.025 * len(s):
                warnings.append(
                    f"bootstrap: {k} ended on its bound in {hit} of {len(s)} resamples, "
                    f"so its 95% interval is open on that side: the runs do not pin "
                    f"{k} down"
                    + (" (the loss floor); predictions far beyond the runs are uncertain" if k == "E" else "")
                )
    if n_bootstrap and len(samples) < max(10, n_bootstrap // 2):
        warnings.append(
            f"bootstrap: only {len(samples)} of {n_bootstrap} resamples usable "
            f"({skipped} had < 3 distinct N or D); intervals are unreliable"
        )
    return ci, se, len(samples)


def _fit_parametric(
    table: RunTable, n_bootstrap: int, seed: int, n_starts: int, delta: float
) -> ParametricFit:
    n_runs = len(table)
    if n_runs <= len(_NAMES):
        raise FitError(
            f"the parametric law L = E + A/N^alpha + B/D^beta has {len(_NAMES)} "
            f"parameters and needs more runs than that; got {n_runs}. Add runs "
            "(ideally 3+ model sizes x 3+ token counts)"
        )
    logn, logd, logl = np.log(table.n), np.log(table.d), np.log(table.loss)
    _check_spread(table.n, table.d)
    bounds = [
        (-5.0, 60.0),
        (-5.0, 60.0),
        (-10.0, float(np.log(table.loss.max())) + 1.0),
        _BOUNDS_EXP,
        _BOUNDS_EXP,
    ]
    args = (logn, logd, logl, delta)

    grid = _grid()
    grid[:, 2] = np.minimum(grid[:, 2], bounds[2][1])
    pred = _lse_terms(grid, logn, logd)[0]
    scores = _huber_scaled(pred - logl[None, :], delta).sum(axis=1)
    starts = grid[np.argsort(scores, kind="stable")[: max(1, n_starts)]]
    results = [_minimize(s, args, bounds) for s in starts]
    results = [r for r in results if np.all(np.isfinite(r.x)) and np.isfinite(r.fun)]
    if not results:
        raise FitError("the parametric fit did not converge from any start (non-finite objective)")
    best = min(results, key=lambda r: r.fun)
    if not best.success:  # polish once; L-BFGS-B may stop on a line search near a Huber kink
        again = _minimize(best.x, args, bounds)
        if again.fun <= best.fun + 1e-12:
            best = again
    grad_norm = float(np.max(np.abs(_objective(best.x, *args)[1])))
    if not best.success and grad_norm > 1e-3 * n_runs:
        raise FitError(
            f"the parametric fit did not converge: L-BFGS-B stopped with "
            f"'{best.message}' (gradient {grad_norm:.2g}). The runs may not follow "
            "L = E + A/N^alpha + B/D^beta; check for outliers or add runs"
        )
    theta = best.x
    _check_identified(theta, bounds, table)
    nat = _natural(theta)
    law = ParametricLaw(**nat, name="fit", source=f"fitted on {n_runs} runs (approach 3)")
    resid = _lse_terms(theta[None, :], logn, logd)[0][0] - logl
    warnings: list[str] = []
    if n_runs < 3 * len(_NAMES):
        warnings.append(f"only {n_runs} runs for {len(_NAMES)} parameters: intervals will be wide")
    if nat["E"] >= float(table.loss.min()):
        warnings.append("fitted E is not below the lowest observed loss")

    ci, se, n_ok = _bootstrap(theta, table, bounds, n_bootstrap, seed, delta, warnings)
    return ParametricFit(
        law=law,
        ci95=ci,
        se=se,
        n_runs=n_runs,
        n_bootstrap=n_bootstrap,
        n_bootstrap_ok=n_ok,
        objective=float(best.fun),
        rmse_log=float(np.sqrt(np.mean(resid**2))),
        huber_delta=delta,
        warnings=warnings,
    )
