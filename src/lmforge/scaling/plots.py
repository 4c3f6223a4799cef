"""Plots of scaling fits (PNG). matplotlib is imported here only, and lazily, with the Agg
canvas (no display, no global pyplot state), so the rest of the package runs without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.runs import atomic_path
from lmforge.scaling.laws import IsoFlopFit, KaplanFit, ParametricLaw, RunTable, kaplan_frontier


def _figure(ncols: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LMForgeError(
            "plots need matplotlib: pip install 'lmforge[plot]' (or pass --no-plots)"
        ) from None
    fig = Figure(figsize=(5.2 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _log(ax, which: str = "x") -> None:
    """Log scale on `which` ("x", "y" or "xy"). Minor ticks are labelled at 2 and 5 ("2e5") only
    when the axis spans at most two decades (matplotlib labels every minor tick of a short axis
    and they overlap; on a longer axis they crowd the 10^k labels); a log loss axis (a fraction
    of a decade) gets plain numbers ("4", "5") instead."""
    from matplotlib.ticker import FuncFormatter

    def minor_for(axis):
        def minor(x, _pos):
            lo, hi = sorted(axis.get_view_interval())
            if lo <= 0 or np.log10(hi / lo) > 2.0:
                return ""
            e = int(np.floor(np.log10(x) + 1e-9))
            m = round(x / 10.0**e)
            return f"{m}e{e}" if m in (2, 5) else ""

        return minor

    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        (ax.set_xscale if name == "x" else ax.set_yscale)("log")
        if name == "y":
            plain = FuncFormatter(lambda x, _pos: f"{x:g}")
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        else:
            axis.set_minor_formatter(FuncFormatter(minor_for(axis)))


def _levels(values: np.ndarray, k: int = 4) -> np.ndarray:
    u = np.unique(values)
    if len(u) <= k:
        return u
    return u[np.linspace(0, len(u) - 1, k).round().astype(int)]


def plot_parametric(table: RunTable, law: ParametricLaw, path: str | Path) -> Path:
    """Loss vs N (colour: D) and loss vs D (colour: N), log x, with the fitted surface as
    curves at a few fixed D (resp. N)."""
    fig, (ax_n, ax_d) = _figure(2)
    n, d, loss = table.n, table.d, table.loss
    for ax, x, other, xl, ol in ((ax_n, n, d, "N (parameters)", "D"), (ax_d, d, n, "D (tokens)", "N")):
        sc = ax.scatter(x, loss, c=np.log10(other), cmap="viridis", s=18, zorder=3)
        grid = np.logspace(np.log10(x.min()) - 0.2, np.log10(x.max()) + 0.2, 200)
        cmap = sc.cmap
        lo, hi = np.log10(other.min()), np.log10(other.max())
        for lv in _levels(other):
            colour = cmap((np.log10(lv) - lo) / (hi - lo) if hi > lo else 0.5)
            y = law.loss(grid, lv) if ol == "D" else law.loss(lv, grid)
            ax.plot(grid, y, color=colour, lw=1.2, label=f"{ol}={lv:.2g}")
        ax.axhline(law.E, color="grey", ls=":", lw=1, label=f"E={law.E:.3g}")
        _log(ax)
        ax.set_xlabel(xl)
        ax.set_ylabel("final loss")
        ax.legend(fontsize=7)
        fig.colorbar(sc, ax=ax, label=f"log10 {ol}")
    fig.suptitle(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g}")
    return _save(fig, path)


def plot_isoflops(table: RunTable, iso: IsoFlopFit, path: str | Path) -> Path:
    """Left: loss vs N per compute budget with its parabola and minimum. Right: N_opt(C) and
    D_opt(C) on log-log axes with the fitted power laws."""
    fig, (ax, ax2) = _figure(2)
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    cs = np.log10([g.compute for g in iso.groups])
    span = (cs.max() - cs.min()) or 1.0
    for g, lc in zip(iso.groups, cs):
        colour = cmap(0.85 * (lc - cs.min()) / span)
        ax.scatter(g.n, g.loss, color=colour, s=16, zorder=3)
        if g.parabola is not None:
            x = np.linspace(np.log(min(g.n)), np.log(max(g.n)), 100)
            ax.plot(np.exp(x), np.polyval(g.parabola, x), color=colour, lw=1, ls="-" if g.used else "--")
        if g.used:
            ax.scatter([g.n_opt], [g.loss_opt], marker="*", s=110, color=colour, edgecolor="k", zorder=4)
    _log(ax)
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (dashed: minimum not bracketed)")
    # budgets as a colour bar beside the axes, not a legend over the profiles
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = ScalarMappable(norm=Normalize(cs.min(), cs.min() + span / 0.85), cmap=cmap)
    fig.colorbar(bar, ax=ax, label="log10 C (FLOPs) of the budget")
    used = [g for g in iso.groups if g.used]
    c = np.array([g.compute for g in used])
    grid = np.logspace(np.log10(c.min()) - 0.5, np.log10(c.max()) + 0.5, 50)
    ax2.scatter(c, [g.n_opt for g in used], color="C0", zorder=3)
    ax2.plot(
        grid, iso.n_opt(grid), color="C0", label=f"N_opt = {iso.n_opt.coef:.3g} C^{iso.n_opt.exponent:.3f}"
    )
    ax2.scatter(c, [g.d_opt for g in used], color="C1", zorder=3)
    ax2.plot(
        grid, iso.d_opt(grid), color="C1", label=f"D_opt = {iso.d_opt.coef:.3g} C^{iso.d_opt.exponent:.3f}"
    )
    _log(ax2, "xy")
    ax2.yaxis.set_major_formatter(ax2.xaxis.get_major_formatter())  # 10^k, like the x axis
    ax2.yaxis.set_minor_formatter(ax2.xaxis.get_minor_formatter())
    ax2.set_xlabel("C (FLOPs)")
    ax2.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_kaplan(table: RunTable, kaplan: KaplanFit, path: str | Path) -> Path:
    """Loss vs N, D and C (log-log): all runs, the frontier used, and the fitted power law."""
    fig, axes = _figure(3)
    for ax, (key, x, label) in zip(
        axes,
        (("N", table.n, "N (parameters)"), ("D", table.d, "D (tokens)"), ("C", table.compute, "C (FLOPs)")),
    ):
        ax.scatter(x, table.loss, s=10, color="0.6", label="runs")
        fx, fy = kaplan_frontier(table, key)
        ax.scatter(
            fx,
            fy,
            s=22,
            color="C0",
            zorder=3,
            label="frontier (fitted)" if key == "C" else f"best run per {key} (fitted)",
        )
        law = kaplan.laws.get(key)
        if law is not None:
            grid = np.logspace(np.log10(x.min()), np.log10(x.max()), 100)
            ax.plot(
                grid, law(grid), color="C3", label=f"L = ({law.kaplan_scale:.3g}/{key})^{-law.exponent:.3f}"
            )
        else:
            ax.set_title(f"L({key}): {kaplan.skipped.get(key, 'not fitted')}", fontsize=8)
        _log(ax, "xy")
        ax.set_xlabel(label)
        ax.set_ylabel("final loss")
        ax.legend(fontsize=7)
    return _save(fig, path)
