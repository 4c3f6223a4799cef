"""`lmforge scaling flops|fit|plan|cost`: argparse wiring and one-screen summaries.

The main CLI calls `add_parser(subparsers)` and then `args.func(args)`; every handler returns
an exit status and raises `LMForgeError` for anything the user can fix. `--json` prints the
machine-readable result instead of tables.

`scaling sweep` arrives with the training engine: when `lmforge/scaling/sweep.py` exists, its
`add_parser(sub)` is called here. A sweep writes one run directory per (N, D) point whose
`pretrain/manifest.json` has `metrics.params`, `metrics.tokens`, `metrics.val_loss` (and
optionally `metrics.flops`, `metrics.budget` for its IsoFLOP group, `metrics.lr`,
`metrics.batch_tokens`); `scaling fit <sweep dir>` reads them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.runs import atomic_write_json
from lmforge.scaling import cost as cost_mod
from lmforge.scaling.flops import flops_per_token, flops_per_token_from_shape, parse_quantity, training_flops

_EPILOG_SOURCES = "Formulas and sources: docs/scaling.md."


# ----------------------------------------------------------------------------- formatting
def _count(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


def _money(x: float | None) -> str:
    return "- (no price: pass --price)" if x is None else f"${x:,.0f}"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:,.1f} h"
    if hours < 24 * 365:
        return f"{hours / 24:,.1f} days"
    return f"{hours / (24 * 365):,.2f} years"


def _print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print(f"== {title}")
        if header:
            print("  " + " | ".join(header))
        for r in rows:
            print("  " + " | ".join(r))
        return
    t = Table(title=title, show_header=header is not None, title_justify="left")
    names = header or ("",) * max(len(r) for r in rows)
    for i, h in enumerate(names):
        t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console(highlight=False, soft_wrap=False).print(t)


def _print_notes(title: str, notes: list[str]) -> None:
    if notes:
        print(f"{title}:")
        for n in dict.fromkeys(notes):  # dedupe, keep order
            print(f"  - {n}")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _quantity(text: str) -> float:
    try:
        return parse_quantity(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------- flops
def _load_model_config(path: str):
    from pydantic import ValidationError

    from lmforge.model.config import ModelConfig

    p = Path(path)
    if not p.is_file():
        if p.suffix or "/" in path:
            raise ConfigError(f"{path}: no such model config file")
        return _pipeline_model_config(path)  # a shipped pipeline name, e.g. `tiny`
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / JSONDecodeError
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("pretrain"), dict):
        return _pipeline_model_config(path)  # a pipeline config: the model `pretrain` builds
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a stage config with a `model:` section
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of ModelConfig fields")
    try:
        return ModelConfig(**data)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'model'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{path}: invalid model config: {errs}") from None


def _pipeline_model_config(path: str):
    """The model a pipeline config's `pretrain` stage trains (with the configured vocabulary)."""
    from lmforge.pipeline import load_config

    cfg = load_config(path)
    return cfg.pretrain.shape_for(cfg.tokenizer.vocab_size)


def cmd_flops(args: argparse.Namespace) -> int:
    if args.config and args.params:
        raise ConfigError("give a model config file or --params, not both")
    if args.config:
        cfg = _load_model_config(args.config)
        f = flops_per_token(cfg, args.seq_len)
        source = f"{args.config} (exact count incl. attention)"
    elif args.params:
        f = flops_per_token_from_shape(args.params, args.n_layers, args.d_model, args.seq_len)
        source = (
            "--params with --n-layers/--d-model (6N + attention)"
            if args.n_layers
            else "--params (6N only; give a config or --n-layers/--d-model/--seq-len for attention)"
        )
    else:
        raise ConfigError("give a model config file (YAML/JSON of ModelConfig fields) or --params N")
    if args.gpu and not args.tokens:
        raise ConfigError("--gpu estimates the run's time and needs --tokens")
    out: dict[str, Any] = {"per_token": f.to_dict(), "source": source}
    if args.tokens:
        out["tokens"] = args.tokens
        out["train_flops"] = f.training * args.tokens
        out["train_flops_6n"] = training_flops(f.n_params, args.tokens)
        out["tokens_per_param"] = args.tokens / f.n_params
        if args.gpu:
            est = cost_mod.estimate_cost(
                out["train_flops"], accelerator=args.gpu, n_gpus=args.n_gpus, mfu=args.mfu
            )
            out["time"] = {
                "accelerator": est.accelerator,
                "n_gpus": est.n_gpus,
                "mfu": est.mfu,
                "gpu_hours": est.gpu_hours,
                "wall_hours": est.wall_hours,
            }
    if args.json:
        _print_json(out)
        return 0
    rows = [
        ("parameters (total)", _count(f.n_params)),
        ("parameters (non-embedding)", _count(f.n_non_embedding)),
        ("sequence length", str(f.seq_len) if f.seq_len else "-"),
        ("forward FLOPs / token", _sci(f.forward)),
        ("backward FLOPs / token", _sci(f.backward)),
        ("training FLOPs / token", _sci(f.training)),
        ("  attention share", f"{100 * f.attention_fraction:.1f}%"),
        ("6N / token", _sci(f.approx_6n)),
        ("exact / 6N", f"{f.training / f.approx_6n:.3f}"),
    ]
    if args.tokens:
        rows += [
            ("tokens", _count(args.tokens)),
            ("tokens / parameter", f"{out['tokens_per_param']:.1f}"),
            ("training FLOPs (exact)", _sci(out["train_flops"])),
            ("training FLOPs (6ND)", _sci(out["train_flops_6n"])),
        ]
        if "time" in out:
            t = out["time"]
            rows += [
                (f"GPU-hours ({t['accelerator']}, MFU {t['mfu']:.0%})", f"{t['gpu_hours']:,.1f}"),
                (f"wall time on {t['n_gpus']} GPU(s)", _duration(t["wall_hours"])),
            ]
    _print_table(f"FLOPs: {source}", rows)
    return 0


# ----------------------------------------------------------------------------- fit
def cmd_fit(args: argparse.Namespace) -> int:
    from lmforge.scaling import laws

    if args.bootstrap < 0 or args.n_starts < 1 or not args.group_tol > 0:
        raise ConfigError("--bootstrap must be >= 0, --n-starts >= 1 and --group-tol > 0")
    table = laws.load_runs(args.inputs, drop_invalid=args.drop_invalid)
    out_dir = Path(args.out)
    param = laws.fit_parametric(table, n_bootstrap=args.bootstrap, seed=args.seed, n_starts=args.n_starts)
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
        "warnings": list(table.warnings),
        "parametric": param.to_dict(),
    }
    report["warnings"] += param.warnings
    iso = None
    try:
        iso = laws.fit_isoflop(table, rel_tol=args.group_tol)
        report["isoflop"] = iso.to_dict()
    except laws.FitError as e:
        report["isoflop"] = {"skipped": str(e)}
    kaplan = laws.fit_kaplan(table)
    report["kaplan"] = kaplan.to_dict()
    hp = laws.fit_hparam_laws(table, rel_tol=args.group_tol)
    if hp:
        report["hparams"] = {k: v.to_dict() for k, v in hp.items()}
    plots: list[str] = []
    if not args.no_plots:
        from lmforge.scaling import plots as P

        plots.append(str(P.plot_parametric(table, param.law, out_dir / "loss_vs_n_d.png")))
        if iso is not None:
            plots.append(str(P.plot_isoflops(table, iso, out_dir / "isoflops.png")))
        plots.append(str(P.plot_kaplan(table, kaplan, out_dir / "kaplan.png")))
    report["plots"] = plots
    atomic_write_json(out_dir / "fit.json", report)
    if args.json:
        _print_json(report)
        return 0
    law, ci = param.law, param.ci95
    rows = []
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        v = getattr(law, k)
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        rows.append((k, f"{v:.4g}", f"[{lo:.4g}, {hi:.4g}]" if k in ci else "-"))
    _print_table(
        f"Approach 3: L = E + A/N^alpha + B/D^beta  ({len(table)} runs, "
        f"{param.n_bootstrap_ok}/{param.n_bootstrap} bootstrap fits, "
        f"RMS log residual {param.rmse_log:.3g}; N_opt ~ C^a, D_opt ~ C^b)",
        rows,
        ("parameter", "estimate", "95% CI"),
    )
    if iso is not None:
        _print_table(
            "Approach 2: IsoFLOP minima",
            [
                (
                    _sci(g.compute),
                    _count(g.n_opt),
                    _count(g.d_opt),
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
    _print_table("Kaplan single-variable laws", krows, ("law", "fit", "R^2"))
    for k, v in hp.items():
        print(f"{k}_opt = {v.coef:.3g} C^{v.exponent:.4f} ({v.source})")
    _print_notes("warnings", report["warnings"])
    print(f"wrote {out_dir / 'fit.json'}" + (f" and {len(plots)} plot(s)" if plots else ""))
    return 0


# ----------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from lmforge.scaling import laws
    from lmforge.scaling.plan import make_plan

    hparam_laws = None
    if args.law.lower() not in laws.PUBLISHED_LAWS:
        data = laws.load_fit_json(args.law)
        if data.get("hparams"):
            hparam_laws = {k: laws.PowerLaw.from_dict(v) for k, v in data["hparams"].items()}
    p = make_plan(
        args.flops,
        gpu_hours=args.gpu_hours,
        money=args.budget_usd,
        target_loss=args.target_loss,
        law=args.law,
        accelerator=args.gpu,
        n_gpus=args.n_gpus,
        mfu=args.mfu,
        price_per_hour=args.price,
        tokens_per_param=args.tokens_per_param,
        inference_tokens=args.inference_tokens,
        seq_len=args.seq_len,
        hparam_laws=hparam_laws,
        pue=args.pue,
        carbon_intensity=args.carbon_intensity,
    )
    if args.json:
        _print_json(p.to_dict())
        return 0
    allocs = [a for a in (p.optimal, p.rule_of_thumb, p.inference_aware) if a is not None]
    rows = [
        ("N (parameters)", *[_count(a.n_params) for a in allocs]),
        ("D (tokens)", *[_count(a.tokens) for a in allocs]),
        ("tokens / parameter", *[f"{a.tokens_per_param:.1f}" for a in allocs]),
        ("training FLOPs", *[_sci(a.train_flops) for a in allocs]),
        ("predicted loss", *[f"{a.loss:.4f}" for a in allocs]),
        ("GPU-hours", *[_num(a.cost.gpu_hours) for a in allocs]),
        (f"wall time on {args.n_gpus} GPU(s)", *[_duration(a.cost.wall_hours) for a in allocs]),
        ("cost", *[_money(a.cost.cost_usd) for a in allocs]),
        ("energy (MWh)", *[_num(a.cost.kwh / 1000) for a in allocs]),
        ("tCO2e", *[_num(a.cost.tco2e) for a in allocs]),
    ]
    if p.inference_tokens:
        rows += [
            ("inference FLOPs", *[_sci(a.inference_flops) for a in allocs]),
            ("lifetime FLOPs", *[_sci(a.lifetime_flops) for a in allocs]),
        ]
    c = p.optimal.cost
    mfu_txt = f"MFU {c.mfu:.0%}" if c.mfu else "given FLOP/s"
    _print_table(
        f"Plan for {p.budget_flops:.3g} FLOPs on {c.accelerator} ({mfu_txt}), law: {p.law.name}",
        rows,
        ("", *[a.label for a in allocs]),
    )
    hp = p.hparams
    seqs = f" ({hp.batch_sequences} sequences of {args.seq_len})" if hp.batch_sequences else ""
    print(f"recommended batch: {_count(hp.batch_tokens)} tokens{seqs}, peak LR {hp.lr:.3g}  [{hp.source}]")
    _print_notes("notes", p.warnings + c.notes)
    return 0


# ----------------------------------------------------------------------------- cost
def cmd_cost(args: argparse.Namespace) -> int:
    if args.list_gpus:
        rows = cost_mod.catalogue_rows()
        if args.json:
            _print_json(rows)
            return 0
        _print_table(
            "Accelerator catalogue (dense peak per GPU)",
            [
                (
                    r["name"],
                    f"{r['bf16_tflops']:g}" if r["bf16_tflops"] else "-",
                    f"{r['fp16_tflops']:g}",
                    f"{r['tdp_watts']:g}",
                    f"{r['price_per_hour']:.2f}" if r["price_per_hour"] else "-",
                )
                for r in rows
            ],
            ("name", "bf16 TFLOP/s", "fp16 TFLOP/s", "TDP W", "$/GPU-h"),
        )
        _print_notes(
            "sources",
            [
                f"{r['name']}: {r['source']}" + (f"; price: {r['price_source']}" if r["price_source"] else "")
                for r in rows
            ],
        )
        return 0
    flops = args.flops
    if args.params is not None or args.tokens is not None:
        if args.params is None or args.tokens is None:
            raise ConfigError("--params and --tokens go together (C = 6 N D)")
        if flops is not None:
            raise ConfigError("give --flops or --params/--tokens, not both")
        flops = training_flops(args.params, args.tokens)
    if (flops is None) == (args.gpu_hours is None):
        raise ConfigError("give exactly one of --flops, --params/--tokens, --gpu-hours (or --list-gpus)")
    eff = args.effective_tflops * 1e12 if args.effective_tflops else None
    est = cost_mod.estimate_cost(
        flops,
        gpu_hours=args.gpu_hours,
        accelerator=args.gpu,
        n_gpus=args.n_gpus,
        mfu=args.mfu,
        effective_flops=eff,
        dtype=args.dtype,
        price_per_hour=args.price,
        power_watts=args.power_watts,
        pue=args.pue,
        carbon_intensity=args.carbon_intensity,
    )
    from lmforge.scaling.plan import threshold_warnings

    warnings = threshold_warnings(est.flops)
    if args.json:
        _print_json({**est.to_dict(), "warnings": warnings})
        return 0
    rate = f"{est.effective_flops_per_gpu / 1e12:.1f} TFLOP/s per GPU" + (
        f" (MFU {est.mfu:.0%} of peak)" if est.mfu else " (given)"
    )
    implied = " (implied by GPU-hours x rate)" if args.gpu_hours is not None else ""
    rows = [
        (f"training FLOPs{implied}", _sci(est.flops)),
        ("accelerator", est.accelerator),
        ("effective rate", rate),
        ("GPU-hours", f"{_num(est.gpu_hours)} ({est.gpu_years:,.3g} GPU-years)"),
        (f"wall time on {est.n_gpus} GPU(s)", _duration(est.wall_hours)),
        ("price / GPU-hour", "-" if est.price_per_hour is None else f"${est.price_per_hour:.2f}"),
        ("cost", _money(est.cost_usd)),
        ("power / GPU, PUE", f"{est.power_watts:g} W, {est.pue:g}"),
        ("energy", f"{_num(est.kwh)} kWh"),
        ("carbon intensity", f"{est.carbon_intensity:g} kgCO2e/kWh"),
        ("emissions", f"{est.tco2e:,.2f} tCO2e" if est.tco2e >= 1 else f"{est.tco2e:.2g} tCO2e"),
    ]
    _print_table("Cost, energy and CO2", rows)
    _print_notes("notes", warnings + est.notes)
    return 0


# ----------------------------------------------------------------------------- parser
def _add_hw(p: argparse.ArgumentParser, n_gpus_default: int = 1) -> None:
    g = p.add_argument_group("hardware")
    g.add_argument(
        "--gpu",
        default="H100-SXM",
        metavar="NAME",
        help="accelerator from the catalogue (see `scaling cost --list-gpus`); default: %(default)s",
    )
    g.add_argument(
        "--n-gpus",
        type=int,
        default=n_gpus_default,
        metavar="K",
        help="GPUs working in parallel, for wall time (default: %(default)s)",
    )
    g.add_argument(
        "--mfu",
        type=float,
        default=cost_mod.DEFAULT_MFU,
        help="model FLOPs utilization, fraction of dense peak (default: %(default)s; "
        "PaLM 46%%, Llama 3 38-43%%)",
    )
    g.add_argument(
        "--price",
        type=float,
        metavar="USD",
        help="price per GPU-hour (default: the catalogue's indicative list price)",
    )
    g.add_argument(
        "--pue",
        type=float,
        default=cost_mod.DEFAULT_PUE,
        help="data-centre power usage effectiveness (default: %(default)s, as Meta used)",
    )
    g.add_argument(
        "--carbon-intensity",
        type=float,
        default=cost_mod.DEFAULT_CARBON_INTENSITY,
        metavar="KG_PER_KWH",
        help="grid carbon intensity, kgCO2e/kWh (default: %(default)s, US average as Meta used)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `scaling` with its sub-commands to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "scaling",
        help="FLOPs, scaling-law fits, compute-optimal plans, cost/energy/CO2",
        description="Scaling laws and budgets: count FLOPs, fit laws to your runs, plan a "
        "compute-optimal run, estimate its cost, energy and CO2.",
        epilog=_EPILOG_SOURCES,
    )
    sub = p.add_subparsers(dest="scaling_command", metavar="COMMAND", required=True)
    f = sub.add_parser(
        "flops",
        help="training FLOPs per token (6N and exact with attention)",
        description="FLOPs per token of a model: forward, backward (2x forward), "
        "training (3x forward), the attention share, and the 6N "
        "approximation; with --tokens, the run's total.",
        epilog=_EPILOG_SOURCES,
    )
    f.add_argument(
        "config",
        nargs="?",
        help="model config YAML/JSON (ModelConfig fields, or a "
        "file with a `model:` section), or a pipeline config "
        "(file or shipped name, e.g. tiny): the model its "
        "pretrain stage builds",
    )
    f.add_argument(
        "--params",
        type=_quantity,
        metavar="N",
        help="parameter count instead of a config (e.g. 175B): 6N per token",
    )
    f.add_argument("--n-layers", type=int, help="with --params: depth, adds the attention term")
    f.add_argument("--d-model", type=int, help="with --params: width, adds the attention term")
    f.add_argument(
        "--seq-len", type=int, metavar="T", help="context length (default: the config's max_seq_len)"
    )
    f.add_argument("--tokens", type=_quantity, metavar="D", help="training tokens (e.g. 300B)")
    f.add_argument("--gpu", metavar="NAME", help="with --tokens: also estimate time on this GPU")
    f.add_argument("--n-gpus", type=int, default=1, metavar="K", help="GPUs for the wall time")
    f.add_argument("--mfu", type=float, default=cost_mod.DEFAULT_MFU, help="assumed MFU")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.set_defaults(func=cmd_flops)

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
        epilog=_EPILOG_SOURCES,
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
    fi.set_defaults(func=cmd_fit)

    pl = sub.add_parser(
        "plan",
        help="compute-optimal N and D for a budget, with time and cost",
        description="Split a budget between parameters and tokens by a fitted law "
        "and by the 20 tokens/parameter rule; predicted loss, time, "
        "cost, energy, CO2; recommended batch size and LR; optional "
        "inference-aware plan (Sardana et al. 2024).",
        epilog=_EPILOG_SOURCES,
    )
    b = pl.add_mutually_exclusive_group(required=True)
    b.add_argument("--flops", type=_quantity, help="training budget in FLOPs (e.g. 1e21)")
    b.add_argument("--gpu-hours", type=_quantity, help="budget in GPU-hours of --gpu at --mfu")
    b.add_argument(
        "--budget-usd", type=_quantity, metavar="USD", help="budget in dollars at --price per GPU-hour"
    )
    b.add_argument(
        "--target-loss", type=float, help="the loss to reach; plans the smallest compute-optimal run"
    )
    pl.add_argument(
        "--law",
        default="chinchilla",
        help="chinchilla (Hoffmann 2022), besiroglu2024 (Epoch refit), or a fit.json "
        "/ fit directory from `scaling fit` (default: %(default)s)",
    )
    pl.add_argument(
        "--tokens-per-param",
        type=float,
        default=20.0,
        help="ratio of the rule-of-thumb plan (default: %(default)s)",
    )
    pl.add_argument(
        "--inference-tokens",
        type=_quantity,
        default=0.0,
        metavar="T",
        help="tokens you expect to serve; adds the inference-aware plan (same loss, "
        "lowest training + inference FLOPs)",
    )
    pl.add_argument("--seq-len", type=int, metavar="T", help="to express the recommended batch in sequences")
    _add_hw(pl, n_gpus_default=8)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser(
        "cost",
        help="GPU-hours, wall time, cost, energy and CO2 of a run",
        description="GPU-hours = FLOPs / (peak x MFU); energy = GPU-hours x power x PUE; "
        "CO2 = energy x carbon intensity.",
        epilog=_EPILOG_SOURCES,
    )
    c.add_argument("--list-gpus", action="store_true", help="print the accelerator catalogue")
    c.add_argument("--flops", type=_quantity, help="training FLOPs")
    c.add_argument("--params", type=_quantity, metavar="N", help="with --tokens: C = 6ND")
    c.add_argument("--tokens", type=_quantity, metavar="D", help="with --params: C = 6ND")
    c.add_argument("--gpu-hours", type=_quantity, help="known GPU-hours instead of FLOPs")
    c.add_argument(
        "--effective-tflops",
        type=float,
        metavar="TFLOPS",
        help="achieved TFLOP/s per GPU (overrides peak x --mfu)",
    )
    c.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16"),
        help="which peak to use (auto: bf16, fp16 where there is no bf16)",
    )
    c.add_argument("--power-watts", type=float, metavar="W", help="average power per GPU (default: its TDP)")
    _add_hw(c)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_cost)

    # Extension point: scaling/sweep.py (written with the training engine) defines
    # `add_parser(sub)` adding `sweep`; keep its module import light (torch lazily).
    if importlib.util.find_spec("lmforge.scaling.sweep") is not None:
        importlib.import_module("lmforge.scaling.sweep").add_parser(sub)
    return p
