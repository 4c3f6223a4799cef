"""`lmforge scaling flops|fit|plan|cost`: argparse wiring and one-screen summaries.

The main CLI calls `add_parser(subparsers)` and then `args.func(args)`; every handler returns
an exit status and raises `LMForgeError` for anything the user can fix. `--json` prints the
machine-readable result instead of tables.

`scaling fit` lives in fitting.py and `scaling sweep` in sweep.py; both are registered here. A
sweep writes one run directory per (N, D) point whose
`pretrain/manifest.json` has `metrics.params`, `metrics.tokens`, `metrics.val_loss` (and
optionally `metrics.flops`, `metrics.budget` for its IsoFLOP group, `metrics.lr`,
`metrics.batch_tokens`); `scaling fit <sweep dir>` reads them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.scaling import cost as cost_mod
from lmforge.scaling.cost_cli import add_cost_parser, add_hw_arguments
from lmforge.scaling.fitting import add_fit_parser
from lmforge.scaling.flops import flops_per_token, flops_per_token_from_shape, parse_quantity, training_flops
from lmforge.scaling.fmt import (
    fmt_count,
    fmt_duration,
    fmt_money,
    fmt_num,
    fmt_sci,
    print_json,
    print_notes,
    print_table,
)
from lmforge.scaling.sweep_cli import add_parser as add_sweep_parser

_EPILOG_SOURCES = "Formulas and sources: docs/scaling.md."


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
        print_json(out)
        return 0
    rows = [
        ("parameters (total)", fmt_count(f.n_params)),
        ("parameters (non-embedding)", fmt_count(f.n_non_embedding)),
        ("sequence length", str(f.seq_len) if f.seq_len else "-"),
        ("forward FLOPs / token", fmt_sci(f.forward)),
        ("backward FLOPs / token", fmt_sci(f.backward)),
        ("training FLOPs / token", fmt_sci(f.training)),
        ("  attention share", f"{100 * f.attention_fraction:.1f}%"),
        ("6N / token", fmt_sci(f.approx_6n)),
        ("exact / 6N", f"{f.training / f.approx_6n:.3f}"),
    ]
    if args.tokens:
        rows += [
            ("tokens", fmt_count(args.tokens)),
            ("tokens / parameter", f"{out['tokens_per_param']:.1f}"),
            ("training FLOPs (exact)", fmt_sci(out["train_flops"])),
            ("training FLOPs (6ND)", fmt_sci(out["train_flops_6n"])),
        ]
        if "time" in out:
            t = out["time"]
            rows += [
                (f"GPU-hours ({t['accelerator']}, MFU {t['mfu']:.0%})", f"{t['gpu_hours']:,.1f}"),
                (f"wall time on {t['n_gpus']} GPU(s)", fmt_duration(t["wall_hours"])),
            ]
    print_table(f"FLOPs: {source}", rows)
    return 0


# ----------------------------------------------------------------------------- fit
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
        print_json(p.to_dict())
        return 0
    allocs = [a for a in (p.optimal, p.rule_of_thumb, p.inference_aware) if a is not None]
    rows = [
        ("N (parameters)", *[fmt_count(a.n_params) for a in allocs]),
        ("D (tokens)", *[fmt_count(a.tokens) for a in allocs]),
        ("tokens / parameter", *[f"{a.tokens_per_param:.1f}" for a in allocs]),
        ("training FLOPs", *[fmt_sci(a.train_flops) for a in allocs]),
        ("predicted loss", *[f"{a.loss:.4f}" for a in allocs]),
        ("GPU-hours", *[fmt_num(a.cost.gpu_hours) for a in allocs]),
        (f"wall time on {args.n_gpus} GPU(s)", *[fmt_duration(a.cost.wall_hours) for a in allocs]),
        ("cost", *[fmt_money(a.cost.cost_usd) for a in allocs]),
        ("energy (MWh)", *[fmt_num(a.cost.kwh / 1000) for a in allocs]),
        ("tCO2e", *[fmt_num(a.cost.tco2e) for a in allocs]),
    ]
    if p.inference_tokens:
        rows += [
            ("inference FLOPs", *[fmt_sci(a.inference_flops) for a in allocs]),
            ("lifetime FLOPs", *[fmt_sci(a.lifetime_flops) for a in allocs]),
        ]
    c = p.optimal.cost
    mfu_txt = f"MFU {c.mfu:.0%}" if c.mfu else "given FLOP/s"
    print_table(
        f"Plan for {p.budget_flops:.3g} FLOPs on {c.accelerator} ({mfu_txt}), law: {p.law.name}",
        rows,
        ("", *[a.label for a in allocs]),
    )
    hp = p.hparams
    seqs = f" ({hp.batch_sequences} sequences of {args.seq_len})" if hp.batch_sequences else ""
    print(f"recommended batch: {fmt_count(hp.batch_tokens)} tokens{seqs}, peak LR {hp.lr:.3g}  [{hp.source}]")
    print_notes("notes", p.warnings + c.notes)
    return 0


# ----------------------------------------------------------------------------- parser
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
    _add_flops_parser(sub)
    add_fit_parser(sub, _EPILOG_SOURCES)
    _add_plan_parser(sub)
    add_cost_parser(sub, _EPILOG_SOURCES, _quantity)
    add_sweep_parser(sub)
    return p


def _add_flops_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
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
        default="besiroglu2024",
        help="besiroglu2024 (Epoch's refit of Chinchilla's runs; reproduces the paper's Table 3 "
        "within 15%% up to 1T parameters), chinchilla (Hoffmann 2022's rounded approach-3 law), "
        "or a fit.json / fit directory from `scaling fit` (default: %(default)s)",
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
    add_hw_arguments(pl, n_gpus_default=8)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=cmd_plan)
