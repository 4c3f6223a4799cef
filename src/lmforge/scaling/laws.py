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
import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import ConfigError, DataError, LMForgeError
from lmforge.runs import read_manifest

HUBER_DELTA = 1e-3


class FitError(LMForgeError):
    """A law cannot be fitted from these runs (too few, degenerate, or no convergence)."""


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


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent, fitted by least squares in log-log space."""

    name: str
    coef: float
    exponent: float
    n_points: int
    r2: float
    x: str = "x"
    y: str = "y"
    source: str = ""

    def __call__(self, x):
        out = self.coef * np.asarray(x, dtype=float) ** self.exponent
        return float(out) if out.ndim == 0 else out

    @property
    def kaplan_scale(self) -> float:
        """X_c of the Kaplan form y = (X_c / x)^alpha, alpha = -exponent."""
        return self.coef ** (1.0 / -self.exponent)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.exponent < 0:
            d.update(kaplan_alpha=-self.exponent, kaplan_scale=self.kaplan_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PowerLaw:
        return cls(
            **{k: d[k] for k in ("name", "coef", "exponent", "n_points", "r2", "x", "y", "source") if k in d}
        )


def fit_power_law(x, y, name: str, x_name: str = "x", y_name: str = "y", source: str = "") -> PowerLaw:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 2:
        raise FitError(f"{name}: a power law needs at least 2 distinct {x_name} values")
    lx, ly = np.log(x), np.log(y)
    slope, icpt = np.polyfit(lx, ly, 1)
    resid = ly - (icpt + slope * lx)
    ss = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else 1.0
    return PowerLaw(name, float(math.exp(icpt)), float(slope), len(x), r2, x_name, y_name, source)


# ============================================================================ run tables
@dataclass(frozen=True)
class Run:
    n: float
    d: float
    loss: float
    flops: float | None = None  # measured/declared training FLOPs; default 6ND
    budget: float | None = None  # IsoFLOP group label, if the sweep declares one
    lr: float | None = None
    batch_tokens: float | None = None
    name: str = ""
    source: str = ""

    @property
    def compute(self) -> float:
        return self.flops if self.flops else 6.0 * self.n * self.d


@dataclass
class RunTable:
    runs: list[Run]
    warnings: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def n(self) -> np.ndarray:
        return np.array([r.n for r in self.runs], dtype=float)

    @property
    def d(self) -> np.ndarray:
        return np.array([r.d for r in self.runs], dtype=float)

    @property
    def loss(self) -> np.ndarray:
        return np.array([r.loss for r in self.runs], dtype=float)

    @property
    def compute(self) -> np.ndarray:
        return np.array([r.compute for r in self.runs], dtype=float)

    @classmethod
    def from_arrays(cls, n, d, loss, **columns) -> RunTable:
        """Build (and validate) a table from arrays; extra columns: flops, budget, lr, ..."""
        n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
        if not (len(n) == len(d) == len(loss)):
            raise DataError(f"n, d and loss differ in length ({len(n)}, {len(d)}, {len(loss)})")
        rows = []
        for i in range(len(n)):
            row = {"params": n[i], "tokens": d[i], "loss": loss[i]}
            row.update({k: v[i] for k, v in columns.items()})
            rows.append((row, f"row {i}"))
        return _build_table(rows, ["<arrays>"], drop_invalid=False)


_ALIASES = {
    "n": ("params", "n", "n_params", "num_params", "parameters", "model_params"),
    "d": ("tokens", "d", "n_tokens", "num_tokens", "train_tokens"),
    "loss": ("loss", "val_loss", "final_loss", "eval_loss"),
    "flops": ("flops", "compute", "c", "train_flops"),
    "budget": ("budget", "isoflop", "flops_budget"),
    "lr": ("lr", "learning_rate"),
    "batch_tokens": ("batch_tokens", "batch_size_tokens", "tokens_per_step"),
    "name": ("name", "run", "id"),
}
_REQUIRED = {"n": "N (parameters)", "d": "D (tokens)", "loss": "final loss"}


class _RowError(Exception):
    pass


def _pick(row: dict, field_: str) -> Any:
    low = {str(k).strip().lower(): v for k, v in row.items()}
    for alias in _ALIASES[field_]:
        if alias in low and low[alias] not in (None, ""):
            return low[alias]
    return None


def _number(v: Any, label: str, required: bool) -> float | None:
    if v is None:
        if required:
            raise _RowError(f"{label} is missing")
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _RowError(f"{label} = {v!r} is not a number") from None
    if math.isnan(x):
        raise _RowError(f"{label} is NaN (a diverged or unfinished run?)")
    if math.isinf(x):
        raise _RowError(f"{label} is infinite")
    if x <= 0:
        raise _RowError(f"{label} must be positive, got {x:g}")
    return x


def _row_to_run(row: dict, where: str) -> Run:
    if "_error" in row:  # a run directory whose manifest cannot give a row
        raise _RowError(row["_error"])
    vals = {}
    for f in ("n", "d", "loss", "flops", "budget", "lr", "batch_tokens"):
        vals[f] = _number(_pick(row, f), _REQUIRED.get(f, f), f in _REQUIRED)
    name = _pick(row, "name")
    return Run(name=str(name) if name is not None else "", source=where, **vals)


def _build_table(rows: list[tuple[dict, str]], sources: list[str], drop_invalid: bool) -> RunTable:
    runs, errors = [], []
    for row, where in rows:
        try:
            runs.append(_row_to_run(row, where))
        except _RowError as e:
            errors.append(f"{where}: {e}")
    if errors and not drop_invalid:
        shown = "; ".join(errors[:5]) + (f"; ... and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise DataError(
            f"{len(errors)} invalid run(s): {shown}. Fix or remove them, or pass "
            "--drop-invalid (drop_invalid=True) to skip them"
        )
    warnings = [f"skipped {e}" for e in errors]
    if not runs:
        raise DataError(f"no valid runs in {', '.join(sources)}")
    return RunTable(runs, warnings, list(sources))


def _first_key(obj: Any, keys: tuple[str, ...]) -> Any:
    """First value under any of `keys` in a nested dict (depth-first), else None."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and not isinstance(obj[k], (dict, list)):
                return obj[k]
        for v in obj.values():
            hit = _first_key(v, keys)
            if hit is not None:
                return hit
    return None


def _manifest_row(stage_dir: Path) -> tuple[dict, str]:
    where = str(stage_dir / "manifest.json")
    m = read_manifest(stage_dir)
    if m is None:
        return {"_error": "manifest is missing or unreadable"}, where
    if m.get("status") != "complete":
        return {"_error": f"status is {m.get('status')!r}, not 'complete'"}, where
    metrics, config = m.get("metrics") or {}, m.get("config") or {}
    row = {
        "params": metrics.get("params"),
        "tokens": metrics.get("tokens"),
        "val_loss": metrics.get("val_loss"),
        "flops": metrics.get("flops"),
        "budget": metrics.get("budget"),
        "lr": metrics.get("lr") or _first_key(config, ("lr", "learning_rate")),
        "batch_tokens": metrics.get("batch_tokens") or _first_key(config, ("batch_tokens",)),
        "name": stage_dir.parent.name if stage_dir.name == "pretrain" else stage_dir.name,
    }
    for key, label in (
        ("params", "metrics.params"),
        ("tokens", "metrics.tokens"),
        ("val_loss", "metrics.val_loss"),
    ):
        if row[key] is None:
            return {"_error": f"{label} is missing from the manifest"}, where
    return row, where


def _dir_rows(path: Path) -> list[tuple[dict, str]]:
    if (path / "pretrain" / "manifest.json").is_file():
        return [_manifest_row(path / "pretrain")]
    if (path / "manifest.json").is_file():
        return [_manifest_row(path)]
    found = sorted(p.parent.parent for p in path.glob("*/pretrain/manifest.json"))
    if not found:
        raise DataError(
            f"{path}: no lmforge runs here (expected {path}/pretrain/manifest.json "
            f"or {path}/<run>/pretrain/manifest.json)"
        )
    return [_manifest_row(p / "pretrain") for p in found]


def _file_rows(path: Path) -> list[tuple[dict, str]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheets
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (expected a header row: params,tokens,loss)")
        _check_columns(path, reader.fieldnames)
        return [(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i + 1}: expected a JSON object per line")
                rows.append((obj, f"{path}:{i + 1}"))
        if rows:
            _check_columns(path, set().union(*(r.keys() for r, _ in rows)))
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        items = obj.get("runs") if isinstance(obj, dict) else obj
        if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
            raise DataError(f'{path}: expected a list of run objects (or {{"runs": [...]}})')
        if items:
            _check_columns(path, set().union(*(r.keys() for r in items)))
        return [(r, f"{path}[{i}]") for i, r in enumerate(items)]
    raise DataError(
        f"{path}: unknown table format {suffix!r}; use .csv, .tsv, .jsonl, .json or an lmforge run directory"
    )


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    cols = {str(c).strip().lower() for c in columns}
    for f, label in _REQUIRED.items():
        if not cols & set(_ALIASES[f]):
            raise DataError(
                f"{path}: no column for {label}; expected one of "
                f"{', '.join(_ALIASES[f])}; found {', '.join(sorted(cols)) or 'none'}"
            )


def load_runs(paths: str | Path | Iterable[str | Path], drop_invalid: bool = False) -> RunTable:
    """Read runs from CSV/TSV/JSONL/JSON tables and lmforge run directories.

    Columns (case-insensitive, aliases in `_ALIASES`): params (N), tokens (D), loss; optional
    flops, budget (IsoFLOP group), lr, batch_tokens, name. A run directory contributes the
    `metrics.params / tokens / val_loss` of its `pretrain/manifest.json`; a directory of run
    directories contributes all of them. Invalid rows raise `DataError` naming file and line,
    unless `drop_invalid` (then they are skipped and listed in `table.warnings`).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[tuple[dict, str]] = []
    sources = []
    for p in map(Path, paths):
        if p.is_dir():
            got = _dir_rows(p)
        elif p.is_file():
            got = _file_rows(p)
        else:
            raise DataError(f"{p}: no such file or directory")
        sources.append(str(p))
        rows.extend(got)
    if not rows:
        raise DataError(f"no runs in {', '.join(sources) or 'the given paths'}")
    return _build_table(rows, sources, drop_invalid)


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

    # ---- bootstrap: resample runs, warm-start from the point estimate
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
    return ParametricFit(
        law=law,
        ci95=ci,
        se=se,
        n_runs=n_runs,
        n_bootstrap=n_bootstrap,
        n_bootstrap_ok=len(samples),
        objective=float(best.fun),
        rmse_log=float(np.sqrt(np.mean(resid**2))),
        huber_delta=delta,
        warnings=warnings,
    )


# ============================================================================ approach 2
def group_by_compute(table: RunTable, rel_tol: float = 0.25) -> list[tuple[float, list[int]]]:
    """IsoFLOP groups: by the declared `budget` when every run has one, else runs whose compute
    lies within a factor (1 + rel_tol) of the group's smallest. Returns (C, run indices)."""
    runs = table.runs
    if runs and all(r.budget for r in runs):
        out: dict[float, list[int]] = {}
        for i, r in enumerate(runs):
            out.setdefault(float(r.budget), []).append(i)
        return sorted(out.items())
    c = table.compute
    order = np.argsort(c, kind="stable")
    groups: list[list[int]] = []
    start = None
    for i in order:
        if start is None or c[i] > start * (1.0 + rel_tol):
            groups.append([])
            start = c[i]
        groups[-1].append(int(i))
    return [(float(np.exp(np.mean(np.log(c[g])))), g) for g in groups]


@dataclass
class IsoFlopGroup:
    compute: float
    n: list[float]
    loss: list[float]
    parabola: list[float] | None = None  # loss = p0 (ln N)^2 + p1 ln N + p2
    n_opt: float | None = None
    d_opt: float | None = None
    loss_opt: float | None = None
    used: bool = False
    note: str = ""


@dataclass
class IsoFlopFit:
    groups: list[IsoFlopGroup]
    n_opt: PowerLaw  # N_opt = k C^a
    d_opt: PowerLaw  # D_opt = C / (6 N_opt) = (1 / 6k) C^(1-a)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "groups": [asdict(g) for g in self.groups],
            "n_opt": self.n_opt.to_dict(),
            "d_opt": self.d_opt.to_dict(),
            "warnings": self.warnings,
        }


def fit_isoflop(table: RunTable, rel_tol: float = 0.25) -> IsoFlopFit:
    """Chinchilla approach 2: per-budget parabolas in ln N, then N_opt(C) and D_opt(C)."""
    groups, warnings = [], []
    for comp, idx in group_by_compute(table, rel_tol):
        n, loss = table.n[idx], table.loss[idx]
        g = IsoFlopGroup(comp, n.tolist(), loss.tolist())
        groups.append(g)
        if len(np.unique(n)) < 3:
            g.note = f"only {len(np.unique(n))} model size(s); a parabola needs 3"
            continue
        x = np.log(n)
        p = np.polyfit(x, loss, 2)
        g.parabola = p.tolist()
        if p[0] <= 0:
            g.note = "loss is not convex in ln N here: no minimum"
            continue
        xs = -p[1] / (2 * p[0])
        g.n_opt = float(np.exp(xs))
        g.d_opt = comp / (6.0 * g.n_opt)
        g.loss_opt = float(np.polyval(p, xs))
        if not (x.min() <= xs <= x.max()):
            g.note = (
                f"minimum N={g.n_opt:.3g} lies outside the sampled sizes "
                f"[{n.min():.3g}, {n.max():.3g}]: add {'smaller' if xs < x.min() else 'larger'} models"
            )
            continue
        g.used = True
    used = [g for g in groups if g.used]
    for g in groups:
        if not g.used:
            warnings.append(f"C={g.compute:.3g}: not used ({g.note})")
    if len({g.compute for g in used}) < 2:
        raise FitError(
            f"IsoFLOP analysis needs at least 2 compute budgets with a bracketed loss "
            f"minimum (3+ model sizes each); found {len(used)} of {len(groups)} budget "
            f"group(s)" + (f": {'; '.join(warnings[:3])}" if warnings else "")
        )
    c = np.array([g.compute for g in used])
    nlaw = fit_power_law(
        c, [g.n_opt for g in used], "N_opt(C)", "C", "N_opt", "IsoFLOP minima (Chinchilla approach 2)"
    )
    dlaw = PowerLaw(
        "D_opt(C)",
        1.0 / (6.0 * nlaw.coef),
        1.0 - nlaw.exponent,
        nlaw.n_points,
        nlaw.r2,
        "C",
        "D_opt",
        "D_opt = C / (6 N_opt)",
    )
    return IsoFlopFit(groups, nlaw, dlaw, warnings)


# ============================================================================ Kaplan laws
@dataclass
class KaplanFit:
    laws: dict[str, PowerLaw]  # keys "N", "D", "C"
    skipped: dict[str, str]

    def to_dict(self) -> dict:
        return {"laws": {k: v.to_dict() for k, v in self.laws.items()}, "skipped": self.skipped}


def _frontier(x: np.ndarray, loss: np.ndarray, pareto: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best loss per distinct x; with `pareto`, keep only points better than all cheaper ones."""
    xs = np.unique(x)
    best = np.array([loss[x == v].min() for v in xs])
    if not pareto:
        return xs, best
    keep, cur = [], np.inf
    for i, v in enumerate(best):
        if v < cur:
            keep.append(i)
            cur = v
    return xs[keep], best[keep]


_KAPLAN_AXES = {"N": ("n", False), "D": ("d", False), "C": ("compute", True)}


def kaplan_frontier(table: RunTable, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The points `fit_kaplan` fits for `key` ("N", "D" or "C"): x values and their losses."""
    attr, pareto = _KAPLAN_AXES[key]
    return _frontier(getattr(table, attr), table.loss, pareto)


def fit_kaplan(table: RunTable) -> KaplanFit:
    """L(N), L(D), L(C) = (X_c / X)^alpha_X (Kaplan et al. 2020, Eqs. 1.1-1.3).

    L(N) uses the best run per model size, L(D) the best per token count (stand-ins for
    "trained to convergence"/"large enough model"); L(C) the compute-efficient frontier.
    """
    laws, skipped = {}, {}
    for key in _KAPLAN_AXES:
        xs, ys = kaplan_frontier(table, key)
        if len(xs) < 3:
            skipped[key] = f"needs 3+ distinct {key} values on the frontier, found {len(xs)}"
            continue
        law = fit_power_law(xs, ys, f"L({key})", key, "loss", "Kaplan et al. 2020 form")
        if law.exponent >= 0:
            skipped[key] = f"loss does not fall with {key} (slope {law.exponent:.3g})"
            continue
        laws[key] = law
    return KaplanFit(laws, skipped)


# ============================================================================ LR / batch
def fit_hparam_laws(table: RunTable, rel_tol: float = 0.25) -> dict[str, PowerLaw]:
    """Power laws of the best run's lr and batch_tokens vs compute, from the user's sweep
    (DeepSeek LLM 2024, arXiv:2401.02954, Sec. 3.1, does the same on its grid).
    Empty when the table has no lr / batch_tokens columns, never tries two values for one
    model size at one compute budget, or has fewer than 2 budgets."""
    out = {}
    groups = group_by_compute(table, rel_tol)
    for key in ("lr", "batch_tokens"):
        pts, searched = [], False
        for comp, idx in groups:
            cand = [i for i in idx if getattr(table.runs[i], key)]
            if cand:
                best = min(cand, key=lambda i: table.runs[i].loss)
                pts.append((comp, getattr(table.runs[best], key)))
                tried: dict[float, set] = {}
                for i in cand:
                    tried.setdefault(table.runs[i].n, set()).add(getattr(table.runs[i], key))
                searched |= any(len(v) > 1 for v in tried.values())
        # only a sweep that tried several values for one model at some budget says which is
        # best; values that differ only between sizes (an LR set by a width rule, as
        # `scaling sweep` does) would make the "law" restate that rule
        if searched and len({c for c, _ in pts}) >= 2:
            c, v = zip(*pts)
            out[key] = fit_power_law(
                c, v, f"{key}_opt(C)", "C", key, f"your sweep: best run at each of {len(pts)} compute budgets"
            )
    return out
