"""Scaling plots: log-axis labels that do not collide, the IsoFLOP plot's budgets off the data."""

from __future__ import annotations

import numpy as np

from lmforge.scaling import laws as L
from lmforge.scaling import plots as P


def minor_labels(lo: float, hi: float) -> list[str]:
    fig, (ax,) = P._figure(1)
    ax.plot([lo, hi], [1, 2])
    P._log(ax)
    fig.canvas.draw()
    return [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]


def test_minor_log_labels_only_on_short_axes():
    assert minor_labels(1e8, 2e9) and all(t[0] in "25" for t in minor_labels(1e8, 2e9))
    assert minor_labels(1e18, 1e22) == []  # 4 decades: only the 10^k labels


def test_isoflop_plot_has_a_colour_bar_not_a_legend(tmp_path, monkeypatch):
    law = L.BESIROGLU2024
    n, d = [], []
    for c in np.geomspace(6e18, 3e21, 6):
        for x in np.geomspace(law.optimal(c)[0] / 4, law.optimal(c)[0] * 4, 5):
            n.append(x)
            d.append(c / (6 * x))
    n, d = np.array(n), np.array(d)
    table = L.RunTable.from_arrays(n, d, law.loss(n, d), budget=6 * n * d)
    figures = []
    real = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: (figures.append(fig), real(fig, path))[1])
    path = P.plot_isoflops(table, L.fit_isoflop(table), tmp_path / "iso.png")
    assert path.stat().st_size > 10_000
    profiles = figures[0].axes[0]
    assert profiles.get_legend() is None and len(figures[0].axes) == 3  # profiles, power laws, colour bar
