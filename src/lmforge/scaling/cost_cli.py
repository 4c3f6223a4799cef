"""`lmforge scaling cost`: GPU-hours, wall time, cost, energy and CO2 of one run or of a mixed
fleet (``--part`` per GPU type or run, each with its own GPU-hours or FLOPs and power)."""

from __future__ import annotations

import argparse

from lmforge.errors import ConfigError
from lmforge.scaling import cost as cost_mod
from lmforge.scaling import fleet as fleet_mod
from lmforge.scaling.flops import training_flops
from lmforge.scaling.fmt import (
    fmt_duration,
    fmt_money,
    fmt_num,
    fmt_sci,
    print_json,
    print_notes,
    print_table,
)


def cmd_cost(args: argparse.Namespace) -> int:
    if args.list_gpus:
        rows = cost_mod.catalogue_rows()
        if args.json:
            print_json(rows)
            return 0
        print_table(
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
        print_notes(
            "sources",
            [
                f"{r['name']}: {r['source']}" + (f"; price: {r['price_source']}" if r["price_source"] else "")
                for r in rows
            ],
        )
        return 0
    if args.part:
        if any(x is not None for x in (args.flops, args.params, args.tokens, args.gpu_hours)):
            raise ConfigError(
                "--part gives each part's hours or flops: drop --flops/--params/--tokens/--gpu-hours"
            )
        return cmd_fleet(args)
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
        print_json({**est.to_dict(), "warnings": warnings})
        return 0
    rate = f"{est.effective_flops_per_gpu / 1e12:.1f} TFLOP/s per GPU" + (
        f" (MFU {est.mfu:.0%} of peak)" if est.mfu else " (given)"
    )
    implied = " (implied by GPU-hours x rate)" if args.gpu_hours is not None else ""
    table = [
        (f"training FLOPs{implied}", fmt_sci(est.flops)),
        ("accelerator", est.accelerator),
        ("effective rate", rate),
        ("GPU-hours", f"{fmt_num(est.gpu_hours)} ({est.gpu_years:,.3g} GPU-years)"),
        (f"wall time on {est.n_gpus} GPU(s)", fmt_duration(est.wall_hours)),
        ("price / GPU-hour", "-" if est.price_per_hour is None else f"${est.price_per_hour:.2f}"),
        ("cost", fmt_money(est.cost_usd)),
        ("power / GPU, PUE", f"{est.power_watts:g} W, {est.pue:g}"),
        ("energy", f"{fmt_num(est.kwh)} kWh"),
        ("carbon intensity", f"{est.carbon_intensity:g} kgCO2e/kWh"),
        ("emissions", f"{est.tco2e:,.2f} tCO2e" if est.tco2e >= 1 else f"{est.tco2e:.2g} tCO2e"),
    ]
    print_table("Cost, energy and CO2", table)
    print_notes("notes", warnings + est.notes)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    """`scaling cost --part ... --part ...`: a mixed fleet, each part costed with its own figures."""
    fleet = fleet_mod.estimate_fleet(
        [fleet_mod.parse_fleet_part(spec) for spec in args.part],
        accelerator=args.gpu,
        mfu=args.mfu,
        dtype=args.dtype,
        price_per_hour=args.price,
        pue=args.pue,
        carbon_intensity=args.carbon_intensity,
    )
    if args.json:
        print_json(fleet.to_dict())
        return 0
    rows = [
        (
            name,
            e.accelerator,
            fmt_num(e.gpu_hours),
            f"{e.power_watts:g}",
            fmt_sci(e.flops),
            fmt_num(e.kwh / 1000),
            f"{e.tco2e:,.2f}",
            fmt_money(e.cost_usd),
        )
        for name, e in fleet.parts
    ]
    t = fleet.totals
    rows.append(
        (
            "total",
            "",
            fmt_num(t["gpu_hours"]),
            "",
            fmt_sci(t["flops"]),
            fmt_num(t["kwh"] / 1000),
            f"{t['tco2e']:,.2f}",
            fmt_money(t["cost_usd"]),
        )
    )
    print_table(
        f"Mixed fleet: {len(fleet.parts)} part(s), PUE {args.pue:g}, {args.carbon_intensity:g} kgCO2e/kWh",
        rows,
        ("part", "GPU", "GPU-hours", "W / GPU", "FLOPs", "MWh", "tCO2e", "cost"),
    )
    print_notes("notes", [n for _, e in fleet.parts for n in e.notes])
    return 0


def add_hw_arguments(p: argparse.ArgumentParser, n_gpus_default: int = 1) -> None:
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


def add_cost_parser(sub: argparse._SubParsersAction, epilog: str, quantity) -> None:
    c = sub.add_parser(
        "cost",
        help="GPU-hours, wall time, cost, energy and CO2 of a run",
        description="GPU-hours = FLOPs / (peak x MFU); energy = GPU-hours x power x PUE; "
        "CO2 = energy x carbon intensity.",
        epilog=epilog,
    )
    c.add_argument("--list-gpus", action="store_true", help="print the accelerator catalogue")
    c.add_argument("--flops", type=quantity, help="training FLOPs")
    c.add_argument("--params", type=quantity, metavar="N", help="with --tokens: C = 6ND")
    c.add_argument("--tokens", type=quantity, metavar="D", help="with --params: C = 6ND")
    c.add_argument("--gpu-hours", type=quantity, help="known GPU-hours instead of FLOPs")
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
    c.add_argument(
        "--part",
        action="append",
        metavar="KEY=VALUE,...",
        help="one part of a mixed fleet (repeat): gpu=NAME, hours=H or flops=C, watts=W, n=GPUS, "
        "mfu=F, price=USD, name=LABEL; unset keys take the flags' values "
        "(e.g. --part name=34B,gpu=A100-SXM,hours=1038336,watts=350)",
    )
    add_hw_arguments(c)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_cost)
