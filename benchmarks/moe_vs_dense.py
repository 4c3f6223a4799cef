"""Dense SwiGLU vs Mixture-of-Experts (E=8, top-2) at equal *active* parameters, trained by the
real pipeline on the built-in corpus; prints both validation curves and the final losses.

The MoE model's experts are half as wide as the dense MLP, so a token passes through two
half-width experts: the same matmul work per token as the dense model, four times the FFN
parameters in total. Optional variants: `dense-muon` (the dense model with Muon on its hidden
matrices; needs the trainer's `optimizer` field) and `moe-8x2-muon`.

    python benchmarks/moe_vs_dense.py [--root /tmp/lmforge-moe] [--steps 300] [--variants dense,moe-8x2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMON = [
    "pretrain.model.d_model=128",
    "pretrain.model.n_layers=4",
    "pretrain.model.n_heads=4",
    "pretrain.model.n_kv_heads=2",
    "pretrain.model.d_ff=384",
    "pretrain.seq_len=128",
    "pretrain.batch_size=16",
    "pretrain.eval_tokens=32768",
    "run.device=cpu",
]
MOE = ["pretrain.model.n_experts=8", "pretrain.model.experts_top_k=2", "pretrain.model.moe_d_ff=192"]
VARIANTS = {
    "dense": [],
    "moe-8x2": MOE,
    "dense-muon": ["pretrain.optimizer=muon"],
    "moe-8x2-muon": [*MOE, "pretrain.optimizer=muon"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lmforge-moe")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--evals", type=int, default=6, help="evaluations along the run (curve points)")
    ap.add_argument("--variants", default="dense,moe-8x2", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="run.threads (1 is fastest on a small shared CPU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "extra", nargs="*", help="more dotted overrides for every variant (e.g. pretrain.muon_lr=0.01)"
    )
    a = ap.parse_args()
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    root = Path(a.root)
    base = [
        f"run.root={root}",
        f"pretrain.max_steps={a.steps}",
        f"pretrain.eval_every={max(a.steps // a.evals, 1)}",
        f"pretrain.checkpoint_every={a.steps}",
        f"pretrain.log_every={max(a.steps // 30, 1)}",
        f"run.threads={a.threads}",
        *COMMON,
        *a.extra,
    ]
    py = [sys.executable, "-m", "lmforge.cli"]
    subprocess.run(
        [*py, "run", "--only", "data,tokenizer", "run.name=shared", *base],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    from lmforge.model.hf import from_hf_config, read_hf_config

    results = {}
    for name in names:
        if (root / name).exists():
            shutil.rmtree(root / name)
        shutil.copytree(root / "shared", root / name, ignore=shutil.ignore_patterns("pretrain"))
        t0 = time.time()
        subprocess.run(
            [*py, "pretrain", f"run.name={name}", *base, *VARIANTS[name]],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.time() - t0
        rows = [json.loads(l) for l in open(root / name / "pretrain" / "metrics.jsonl")]
        m = json.loads((root / name / "pretrain" / "manifest.json").read_text())["metrics"]
        cfg = from_hf_config(read_hf_config(root / name / "pretrain" / "model"))
        results[name] = {
            "val_curve": [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r],
            "train_curve": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r],
            "wall": wall,
            "params": m["params"],
            "active_params": cfg.param_count(active=True),
            "val_loss": m["val_loss"],
            "val_bpb": m.get("val_bpb"),
            "tokens": m["tokens"],
            "dropped": [r["moe_dropped_frac"] for r in rows if "moe_dropped_frac" in r][-1:],
            "load_max": [r["moe_load_max"] for r in rows if "moe_load_max" in r][-1:],
        }

    print("| model | total params | active params | final val loss | val bpb | train tokens | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params']:,} | {r['active_params']:,} | {r['val_loss']:.4f} | "
            f"{r['val_bpb']:.4f} | {r['tokens']:,} | {r['wall']:.0f} |"
        )
    print("\nvalidation curves (step: loss)")
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{s}: {l:.3f}" for s, l in r["val_curve"]))
    print("\ntraining loss (step: loss)")
    for name, r in results.items():
        print(
            f"{name}: "
            + ", ".join(f"{s}: {l:.3f}" for s, l in r["train_curve"][:: max(len(r["train_curve"]) // 10, 1)])
        )
    for name, r in results.items():
        if r["load_max"]:
            print(
                f"{name}: last logged busiest-expert load {r['load_max'][0]:.2f}x an even share, "
                f"dropped {r['dropped'][0]:.3f}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
