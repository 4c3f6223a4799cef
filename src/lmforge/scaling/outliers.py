"""Outlier runs of a parametric fit: residuals far beyond the median absolute deviation.

A few bad runs (a diverged run, a mislabelled size, a misread point of a digitised plot) pull a
five-parameter fit a long way: on the Chinchilla paper's 245 digitised runs, 5 runs the published
replication (Besiroglu et al. 2024) drops move B from ~2,000 to ~12,800. The rule is the robust
z-score: log-residual r = log L_obs - log L_fit, centre m = median(r), scale s = 1.4826 MAD(r)
(the standard deviation for Gaussian residuals), and a run is an outlier when |r - m| > k s
(k = 5 by default; far beyond the spread of the other runs, not merely the worst of them).
`scaling fit` reports them, refits without them to say what that changes, and drops them with
``--drop-outliers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmforge.scaling.runtable import Run, RunTable

MAD_TO_SIGMA = 1.4826
DEFAULT_K = 5.0


@dataclass
class Outliers:
    """Runs whose log-residual lies more than `k` robust standard deviations from the median."""

    index: list[int]
    residuals: np.ndarray  # log L_obs - log L_fit, every run
    median: float
    scale: float  # 1.4826 * MAD
    k: float
    runs: list[Run] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return self.k * self.scale

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "median_log_residual": self.median,
            "robust_sigma": self.scale,
            "runs": [
                {
                    "name": r.name,
                    "params": r.n,
                    "tokens": r.d,
                    "loss": r.loss,
                    "source": r.source,
                    "log_residual": float(self.residuals[i]),
                }
                for i, r in zip(self.index, self.runs)
            ],
        }


def find_outliers(table: RunTable, law, k: float = DEFAULT_K) -> Outliers:
    """The runs of `table` whose residual under `law` (anything with ``loss(n, d)``) is far out."""
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    resid = np.log(table.loss) - np.log(np.asarray(law.loss(table.n, table.d), dtype=float))
    med = float(np.median(resid))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(resid - med)))
    if scale <= 0:  # more than half the runs fit exactly: use the smallest non-zero deviation
        dev = np.abs(resid - med)
        scale = float(dev[dev > 0].min()) if (dev > 0).any() else 0.0
    far = np.flatnonzero(np.abs(resid - med) > k * scale) if scale > 0 else np.zeros(0, int)
    far = far[np.argsort(-np.abs(resid[far] - med), kind="stable")]
    return Outliers([int(i) for i in far], resid, med, scale, k, [table.runs[int(i)] for i in far])


def without(table: RunTable, index: list[int]) -> RunTable:
    """A copy of `table` without the runs at `index`."""
    drop = set(index)
    return RunTable(
        [r for i, r in enumerate(table.runs) if i not in drop], list(table.warnings), list(table.sources)
    )


def describe_change(before, after, names=("E", "A", "B", "alpha", "beta", "a")) -> str:
    """'B 12,846 -> 2,085 (-84%), beta 0.45 -> 0.37 ...' for the parameters that moved > 1%."""
    parts = []
    for k in names:
        x, y = float(getattr(before, k)), float(getattr(after, k))
        if x and abs(y - x) / abs(x) > 0.01:
            parts.append(f"{k} {x:.4g} -> {y:.4g} ({(y - x) / abs(x):+.0%})")
    return ", ".join(parts) or "no parameter moves by more than 1%"
