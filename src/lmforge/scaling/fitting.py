"""`lmforge scaling fit`: fit every law the runs allow, flag outlier runs, write fit.json + plots.

Approach 3 (parametric, bootstrap intervals), approach 2 (IsoFLOP minima) when the runs form
compute groups, Kaplan's single-variable laws, and LR / batch laws when the runs searched them.
Outliers (outliers.py) are reported with what dropping them changes; ``--drop-outliers`` fits
without them. Kaplan fits with a low R^2 (runs not on a grid) carry a warning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.runs import atomic_write_json
from lmforge.scaling import laws
from lmforge.scaling.fmt import fmt_count, fmt_sci, print_json, print_notes, print_table
from lmforge.scaling.outliers import DEFAULT_K, describe_change, find_outliers, without


def fit_all(table: laws.RunTable, args: argparse.Namespace) -> dict[str, Any]:
    """The fits (objects) and the report (JSON-ready) for a run table and the fit options."""
    param = laws.fit_parametric(table, n_bootstrap=args.bootstrap, seed=args.seed, n_starts=args.n_starts)
    warnings = list(table.warnings)
    out = find_outliers(table, param.law, args.outlier_k)
    outliers: dict[str, Any] = {**out.to_dict(), "dropped": False}
    if out.index:
        names = ", ".join(r.name or f"N={r.n:.3g} D={r.d:.3g}" for r in out.runs[:6])
        names += f" (+{len(out.runs) - 6} more)" if len(out.runs) > 6 else ""
        reduced = without(table, out.index)
        if args.drop_outliers:
            refit = laws.fit_parametric(
                reduced, n_bootstrap=args.bootstrap, seed=args.seed, n_starts=args.n_starts
            )
        else:
            refit = laws.fit_parametric(reduced, n_bootstrap=0, seed=args.seed, n_starts=args.n_starts)
        change = describe_change(param.law, refit.law)
        outliers.update(change=change, law_without=refit.law.to_dict())
        head = (
            f"{len(out.index)} outlier run(s), log-residual beyond {out.k:g} robust sigma "
            f"({out.threshold:.3g}) of the median {out.median:+.3g}: {names}"
        )
        if args.drop_outliers:
            warnings.append(f"{head}; dropped (--drop-outliers), which changed {change}")
            table, param, outliers["dropped"] = reduced, refit, True
        else:
            warnings.append(f"{head}; dropping them changes {change}; rerun with --drop-outliers to do so")
    warnings += param.warnings
    iso = None
    try:
        iso = laws.fit_isoflop(table, rel_tol=args.group_tol)
        iso_report: dict = iso.to_dict()
    except laws.FitError as e:
        iso_report = {"skipped": str(e)}
    kaplan = laws.fit_kaplan(table)
    warnings += kaplan.warnings
    hp = laws.fit_hparam_laws(table, rel_tol=args.group_tol)
    report: dict[str, Any] = {
        "inputs": [str(p) for p in args.inputs],
        "n_runs": len(table),
        "runs": [
            {
                "name": r.name,
                "params": r.n,
                "tokens": r.d,
                "loss": r.loss,
                "compute": r.compute,
                "source": r.source,
            }
            for r in table.runs
        ],
        "warnings": warnings,
        "parametric": param.to_dict(),
        "outliers": outliers,
        "isoflop": iso_report,
        "kaplan": kaplan.to_dict(),
    }
    if hp:
        report["hparams"] = {k: v.to_dict() for k, v in hp.items()}
    return {"report": report, "table": table, "param": param, "iso": iso, "kaplan": kaplan, "hp": hp}


def cmd_fit(args: argparse.Namespace) -> int:
    if args.bootstrap < 0 or args.n_starts < 1 or not args.group_tol > 0 or not args.outlier_k > 0:
        raise ConfigError("--bootstrap must be >= 0, --n-starts >= 1, --group-tol > 0 and --outlier-k > 0")
    fits = fit_all(laws.load_runs(args.inputs, drop_invalid=args.drop_invalid), args)
    report, table, iso, kaplan = fits["report"], fits["table"], fits["iso"], fits["kaplan"]
    out_dir = Path(args.out)
    plots: list[str] = []
    if not args.no_plots:
        from lmforge.scaling import plots as P

        plots.append(str(P.plot_parametric(table, fits["param"].law, out_dir / "loss_vs_n_d.png")))
        if iso is not None:
            plots.append(str(P.plot_isoflops(table, iso, out_dir / "isoflops.png")))
        plots.append(str(P.plot_kaplan(table, kaplan, out_dir / "kaplan.png")))
    report["plots"] = plots
    atomic_write_json(out_dir / "fit.json", report)
    if args.json:
        print_json(report)
        return 0
    print_fit(fits)
    print(f"wrote {out_dir / 'fit.json'}" + (f" and {len(plots)} plot(s)" if plots else ""))
    return 0


def print_fit(fits: dict[str, Any]) -> None:
    report, param, iso, kaplan = fits["report"], fits["param"], fits["iso"], fits["kaplan"]
    law, ci = param.law, param.ci95
    rows = []
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        v = getattr(law, k)
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        rows.append((k, f"{v:.4g}", f"[{lo:.4g}, {hi:.4g}]" if k in ci else "-"))
    print_table(
        f"Approach 3: L = E + A/N^alpha + B/D^beta  ({report['n_runs']} runs, "
        f"{param.n_bootstrap_ok}/{param.n_bootstrap} bootstrap fits, "
        f"RMS log residual {param.rmse_log:.3g}; N_opt ~ C^a, D_opt ~ C^b)",
        rows,
        ("parameter", "estimate", "95% CI"),
    )
    if iso is not None:
        print_table(
            "Approach 2: IsoFLOP minima",
            [
                (
                    fmt_sci(g.compute),
                    fmt_count(g.n_opt),
                    fmt_count(g.d_opt),
                    f"{g.loss_opt:.4g}" if g.loss_opt else "-",
                    "yes" if g.used else g.note,
                )
                for g in iso.groups
            ],
            ("C", "N_opt", "D_opt", "loss", "used"),
        )
        print(
            f"N_opt = {iso.n_opt.coef:.3g} C^{iso.n_opt.exponent:.3f}   "
            f"D_opt = {iso.d_opt.coef:.3g} C^{iso.d_opt.exponent:.3f}"
        )
    else:
        print(f"Approach 2 skipped: {report['isoflop']['skipped']}")
    krows = [
        (f"L({k})", f"({v.kaplan_scale:.3g} / {k})^{-v.exponent:.4f}", f"{v.r2:.3f}")
        for k, v in kaplan.laws.items()
    ]
    krows += [(f"L({k})", f"skipped: {why}", "-") for k, why in kaplan.skipped.items()]
    print_table("Kaplan single-variable laws", krows, ("law", "fit", "R^2"))
    for k, v in fits["hp"].items():
        print(f"{k}_opt = {v.coef:.3g} C^{v.exponent:.4f} ({v.source})")
    print_notes("warnings", report["warnings"])


def add_fit_parser(sub: argparse._SubParsersAction, epilog: str) -> None:
    fi = sub.add_parser(
        "fit",
        help="fit scaling laws to a table of runs; writes fit.json + plots",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3, "
        "Huber delta 1e-3 in log space, L-BFGS from a grid, bootstrap "
        "95% intervals), IsoFLOP minima (approach 2) and Kaplan "
        "single-variable laws. Inputs: CSV/TSV/JSONL/JSON with columns "
        "params, tokens, loss (optional flops, budget, lr, batch_tokens, "
        "name) or lmforge run directories (<run>/pretrain/manifest.json; "
        "a directory of runs works too).",
        epilog=epilog,
    )
    fi.add_argument("inputs", nargs="+", help="run tables and/or run directories")
    fi.add_argument("--out", required=True, metavar="DIR", help="where fit.json and the PNGs go")
    fi.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="K",
        help="bootstrap resamples for the intervals (default: %(default)s; 0 = none)",
    )
    fi.add_argument(
        "--n-starts",
        type=int,
        default=16,
        metavar="K",
        help="L-BFGS starts: the best K points of Chinchilla's grid (default: %(default)s)",
    )
    fi.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    fi.add_argument(
        "--group-tol",
        type=float,
        default=0.25,
        help="IsoFLOP grouping: runs within a factor 1+TOL of compute form one budget, "
        "unless the table has a budget column (default: %(default)s)",
    )
    fi.add_argument(
        "--drop-invalid",
        action="store_true",
        help="skip rows with missing, NaN or non-positive values (listed as warnings) instead of stopping",
    )
    fi.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    fi.add_argument("--json", action="store_true", help="print fit.json to stdout too")
    fi.add_argument(
        "--outlier-k",
        type=float,
        default=DEFAULT_K,
        metavar="K",
        help="a run is an outlier when its log-residual is more than K robust standard deviations "
        "(1.4826 x MAD) from the median (default: %(default)s)",
    )
    fi.add_argument(
        "--drop-outliers",
        action="store_true",
        help="fit without the outlier runs (they are always reported, with what dropping them changes)",
    )
    fi.set_defaults(func=cmd_fit)
