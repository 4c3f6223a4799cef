"""Empirical laws from a run table: power laws y = k x^p (IsoFLOP approach 2, Kaplan et al.
2020's single-variable laws, LR / batch size vs compute). See laws.py for the parametric law."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lmforge.scaling.runtable import FitError, RunTable

KAPLAN_MIN_R2 = 0.9  # below this a Kaplan L(X) fit is reported with a warning


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


# ============================================================================ approach 2
def group_by_compute(table: RunTable, rel_tol: float = 0.25) -> list[tuple[float, list[int]]]:
    """IsoFLOP groups: by the declared `budget` when every run has one, else runs whose compute
    lies within a factor (1 + rel_tol) of the group's smallest. Returns (C, run indices)."""
    runs = table.runs
    if runs and all(r.budget for r in runs):
        out: dict[float, list[int]] = {}
        for i, r in enumerate(runs):
            assert r.budget is not None
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
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "laws": {k: v.to_dict() for k, v in self.laws.items()},
            "skipped": self.skipped,
            "warnings": self.warnings,
        }


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
    laws, skipped, warnings = {}, {}, []
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
        if key in ("N", "D") and law.r2 < KAPLAN_MIN_R2:
            warnings.append(
                f"Kaplan L({key}): R^2 {law.r2:.2f} on {law.n_points} frontier points: the runs are not "
                f"on a grid (each {key} needs a run that is not limited by the other variable), so "
                f"this law is not a scaling law of {key}; use the parametric fit"
            )
    return KaplanFit(laws, skipped, warnings)


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
