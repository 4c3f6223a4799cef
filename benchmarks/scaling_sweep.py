"""The CPU scaling sweep: 20 tiny Llama-style models trained by the real `pretrain` stage on the
built-in corpus, then the scaling-law fits.

    python benchmarks/scaling_sweep.py [--out DIR] [--fresh] [-- extra `scaling sweep` args]

Runs `lmforge scaling sweep` in a child process and prints a markdown report: machine, command,
date, wall and CPU time (with the load average: on a shared machine wall time depends on what
else runs), the run table, the fitted law with bootstrap 95% intervals, the IsoFLOP and Kaplan
results from `fit.json`, and the plot files with their sizes.

The default grid is 5 sizes (d_model x n_layers, head_dim 32, MHA) x 4 token budgets, 20 runs,
on the built-in corpus with its own 1,024-token BPE vocabulary (trained once in --base-root;
the default pipeline's runs/tiny is left alone). Sizes x tokens rather than IsoFLOP because at
the compute a 2-core CPU affords in minutes (~1e11-1e13 FLOPs) the compute-optimal models are
50K-300K parameters (by this sweep's own fit) trained on 1-6M tokens, i.e. 2-10 epochs of the
608K-token corpus: bracketing the minima would need sizes below 32x2 trained for many epochs,
where repetition, not the law, shapes the loss. Vocabulary 1,024 rather
than the pipeline's 4,096: at 4,096 the two smallest sizes are 80% and 71% embedding table, the
64x2 model ended worse than the 32x2 at every budget and the parametric fit was degenerate (see
RESULTS.md, "Scaling: the CPU sweep"). Peak LR = the tiny config's 3e-3 at d_model 192 x
(192 / d_model)^0.5 (the sweep's default width rule), WSD schedule with one warmup per size,
batch 8 x 256 tokens. Re-running with the same --out resumes (completed points are skipped).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = "32x2,64x2,96x3,128x4,192x4"
TOKENS = "256K,512K,1M,2M"
OVERRIDES = ["pretrain.batch_size=8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default="/tmp/lmforge-sweep-bench", help="sweep directory (default: %(default)s)"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="delete --out first (else completed points are reused)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="points trained at once (default: %(default)s)")
    ap.add_argument(
        "--vocab",
        type=int,
        default=1024,
        help="tokenizer vocabulary (default: %(default)s); any value but the default "
        "pipeline's 4096 trains its own data + tokenizer in --base-root, leaving "
        "runs/tiny alone",
    )
    ap.add_argument(
        "--base-root",
        default="/tmp/lmforge-sweep-base",
        help="run root of the shared data/tokenizer when --vocab is not 4096",
    )
    ap.add_argument("extra", nargs="*", help="more `lmforge scaling sweep` arguments / overrides")
    a = ap.parse_args()
    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    vocab = [] if a.vocab == 4096 else [f"tokenizer.vocab_size={a.vocab}", f"run.root={a.base_root}"]
    cmd = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "scaling",
        "sweep",
        "tiny",
        *OVERRIDES,
        *vocab,
        "--sizes",
        SIZES,
        "--tokens",
        TOKENS,
        "--jobs",
        str(a.jobs),
        "--out",
        str(out),
        *a.extra,
    ]
    load0 = os.getloadavg()
    t0 = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1 = os.getloadavg()
    if not (out / "runs.csv").is_file():
        sys.exit(f"sweep failed (exit {rc}); see {out.parent / (out.name + '.log')}")
    report(cmd, out, wall, ru.ru_utime + ru.ru_stime, load0, load1)  # also when only the fit failed


def report(cmd, out: Path, wall: float, cpu: float, load0, load1) -> None:
    runs = list(csv.DictReader((out / "runs.csv").open()))
    sweep = json.loads((out / "sweep.json").read_text())
    fit = json.loads((out / "fit.json").read_text()) if sweep.get("fit") else {}
    print(
        f"machine: {os.cpu_count()}-core {platform.machine()} CPU, python {platform.python_version()}, "
        f"torch {_torch_version()}"
    )
    print(f"command: {' '.join(['python -m lmforge.cli', *cmd[3:]])}")
    print(f"date: {time.strftime('%Y-%m-%d')}")
    tok = json.loads((out / runs[0]["name"] / "tokenizer" / "manifest.json").read_text())["metrics"]
    print(
        f"corpus: built-in (default pipeline's data + tokenizer from {sweep['base_run']}), vocab "
        f"{tok['vocab_size']:,}, {tok['train_tokens']:,} train / {tok['val_tokens']:,} val tokens"
    )
    trained = [p for p in sweep["points"] if p["status"] == "ran"]
    print(
        f"\nwall time {wall / 60:.1f} min for {len(trained)} trained of {len(runs)} points "
        f"(the sweep's own clock: {sweep['wall_seconds'] / 60:.1f} min; sum of per-point training "
        f"time {sweep['train_seconds'] / 60:.1f} min); CPU time of all processes {cpu / 60:.1f} min; "
        f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end, on {os.cpu_count()} cores\n"
    )
    print(
        "| point | N | N non-emb | D | steps | peak LR | val loss | train s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in runs:
        print(
            f"| {r['name']} | {int(r['params']):,} | {int(r['non_embedding_params']):,} | {int(r['tokens']):,} | "
            f"{r['steps']} | {float(r['peak_lr']):.3g} | {float(r['val_loss']):.4f} | {float(r['train_seconds']):.0f} |"
        )
    print("\n" + monotonicity(runs))
    if not fit:
        print(f"\nfit failed: {sweep.get('fit_error')}")
        return
    p = fit["parametric"]
    law, ci = p["law"], p["ci95"]
    print(
        f"\nApproach 3, L = E + A/N^alpha + B/D^beta ({p['n_runs']} runs, {p['n_bootstrap_ok']}/"
        f"{p['n_bootstrap']} bootstrap fits, RMS log residual {p['rmse_log']:.3g}):\n"
    )
    print("| parameter | estimate | 95% CI |\n|---|---:|---|")
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        print(f"| {k} | {law[k]:.4g} | [{lo:.4g}, {hi:.4g}] |")
    iso = fit.get("isoflop", {})
    print(
        "\nApproach 2 (IsoFLOP): "
        + (
            iso["skipped"]
            if "skipped" in iso
            else f"N_opt = {iso['n_opt']['coef']:.3g} C^{iso['n_opt']['exponent']:.3f}"
        )
    )
    k = fit.get("kaplan", {})
    for name, v in k.get("laws", {}).items():
        print(
            f"Kaplan L({name}) = ({v['kaplan_scale']:.3g} / {name})^{v['kaplan_alpha']:.4f}  R^2 {v['r2']:.3f}"
        )
    for name, why in k.get("skipped", {}).items():
        print(f"Kaplan L({name}): skipped, {why}")
    if fit.get("warnings"):
        print("\nfit warnings: " + "; ".join(fit["warnings"]))
    print(
        "\nplots: " + ", ".join(f"{q} ({Path(q).stat().st_size / 1024:.0f} KB)" for q in fit.get("plots", []))
    )


def monotonicity(runs: list[dict]) -> str:
    """Whether loss falls with N at every D and with D at every N: the precondition of a law."""
    loss = {(int(r["params"]), int(r["tokens"])): float(r["val_loss"]) for r in runs}
    ns, ds = sorted({n for n, _ in loss}), sorted({d for _, d in loss})
    bad = [
        f"N {a:,} -> {b:,} at D {d:,}"
        for d in ds
        for a, b in zip(ns, ns[1:])
        if (a, d) in loss and (b, d) in loss and loss[b, d] >= loss[a, d]
    ]
    bad += [
        f"D {a:,} -> {b:,} at N {n:,}"
        for n in ns
        for a, b in zip(ds, ds[1:])
        if (n, a) in loss and (n, b) in loss and loss[n, b] >= loss[n, a]
    ]
    return (
        "loss falls with N at every D and with D at every N"
        if not bad
        else "loss does NOT fall at: " + "; ".join(bad)
    )


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
