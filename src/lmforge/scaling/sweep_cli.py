"""`lmforge scaling sweep`: its arguments and its command (the work is in sweep.py)."""

from __future__ import annotations

import argparse

from lmforge.config import split_config_args
from lmforge.errors import ConfigError, LMForgeError
from lmforge.scaling.sweep import run_sweep
from lmforge.scaling.sweep_plan import SPEC_KEYS, SweepSpec, _split_list


def cmd_sweep(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.args)
    spec = SweepSpec.from_yaml(args.spec) if args.spec else SweepSpec()
    if args.sizes is not None:
        spec.sizes = _split_list(args.sizes)
    if args.tokens is not None:
        spec.tokens = _split_list(args.tokens)
        if args.spec and args.isoflops is None:
            spec.isoflops = []
    if args.isoflops is not None:
        spec.isoflops = _split_list(args.isoflops)
        if args.spec and args.tokens is None:
            spec.tokens = []
    for k in ("head_dim", "lr_width_exp", "warmup_fraction"):
        if getattr(args, k) is not None:
            setattr(spec, k, getattr(args, k))
    if args.bootstrap < 0 or args.jobs < 1:
        raise ConfigError("--bootstrap must be >= 0 and --jobs >= 1")
    res = run_sweep(
        config,
        overrides,
        spec,
        args.out,
        fit=not args.no_fit,
        plots=not args.no_plots,
        bootstrap=args.bootstrap,
        seed=args.seed,
        dry_run=args.dry_run,
        jobs=args.jobs,
    )
    if args.dry_run:
        print("dry run: nothing trained")
        return 0
    print(
        f"sweep: {len(res.points)} runs in {res.out}; table {res.runs_csv}; "
        f"wall time {res.wall_seconds / 60:.1f} min (training {sum(p.seconds or 0 for p in res.points if p.status == 'ran') / 60:.1f} min)"
    )
    if res.fit_error:
        raise LMForgeError(f"the runs are in {res.runs_csv}, but the fit failed: {res.fit_error}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `sweep` to the `lmforge scaling` sub-commands (called by scaling/cli.py)."""
    s = sub.add_parser(
        "sweep",
        help="train a grid of small models (sizes x tokens or IsoFLOP budgets), then fit",
        description="Train one model per (size, budget) point with the real `pretrain` stage on "
        "the config's data and tokenizer (run once, shared), collect the final val "
        "losses into OUT/runs.csv and fit scaling laws into OUT (fit.json, plots), as "
        "`scaling fit` does. Completed points are skipped: re-run to resume.",
        epilog="examples:\n"
        "  lmforge scaling sweep tiny pretrain.batch_size=8 tokenizer.vocab_size=1024 "
        "run.root=sweeps/base \\\n      --sizes 32x2,64x2,96x3,128x4,192x4 "
        "--tokens 256K,512K,1M,2M --jobs 2 --out sweeps/grid\n"
        "  lmforge scaling sweep tiny pretrain.batch_size=8 --sizes 64x2,96x3,128x4,192x4 "
        "--isoflops 1e13,3e13,1e14 --out sweeps/iso\n"
        "  lmforge scaling sweep --spec sweep.yaml --out sweeps/x --dry-run\n"
        "Details: docs/scaling.md (Sweeps).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="pipeline YAML (or shipped name, default 'tiny') and dotted overrides; its "
        "run directory (run.root/run.name) holds the shared data and tokenizer",
    )
    s.add_argument(
        "--sizes",
        metavar="DxL,...",
        help="model shapes d_model x n_layers (heads = d_model / head_dim), or DxLxH",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tokens", metavar="D,...", help="token budgets per size (grid), e.g. 250K,500K,1M")
    g.add_argument(
        "--isoflops",
        metavar="C,...",
        help="compute budgets in FLOPs (C = 6ND); each size trains D = C / 6N tokens",
    )
    s.add_argument(
        "--spec",
        metavar="YAML",
        help=f"sweep spec file with keys {', '.join(SPEC_KEYS)} "
        "(sizes may be mappings of ModelConfig fields); flags override it",
    )
    s.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="sweep directory: one run directory per point, runs.csv, fit.json, plots",
    )
    s.add_argument("--head-dim", type=int, help="head width for DxL shapes (default: the config's)")
    s.add_argument(
        "--lr-width-exp",
        type=float,
        help="peak LR = pretrain.lr x (config d_model / d_model)^EXP (default 0.5; 1 = muP-style "
        "1/width; 0 = one LR for all)",
    )
    s.add_argument(
        "--warmup-fraction",
        type=float,
        help="warmup per size = min(pretrain.warmup_steps, FRACTION x the size's longest run, "
        "half its shortest run) (default 0.1)",
    )
    s.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="K",
        help="bootstrap resamples for the fit's intervals (default: %(default)s)",
    )
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    s.add_argument("--no-fit", action="store_true", help="train and collect runs.csv only")
    s.add_argument("--no-plots", action="store_true", help="fit without writing PNG plots")
    s.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="K",
        help="train K points at once in child processes, each with cpu_count/K torch "
        "threads (default: %(default)s; on a CPU, --jobs 2 with 1 thread each is "
        "usually faster for tiny models)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    s.set_defaults(func=cmd_sweep)
    return s
