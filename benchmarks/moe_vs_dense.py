"""Dense SwiGLU vs Mixture-of-Experts (E=8, top-2) at equal *active* parameters, trained by the
real pipeline on the built-in corpus; prints both validation curves and the final losses.

The MoE model's experts are half as wide as the dense MLP, so a token passes through two
half-width experts: the same matmul work per token as the dense model, four times the FFN
parameters in total.

    python benchmarks/moe_vs_dense.py [--root /tmp/lmforge-moe] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["pretrain.model.d_model=128", "pretrain.model.n_layers=4", "pretrain.model.n_heads=4",
          "pretrain.model.n_kv_heads=2", "pretrain.model.d_ff=384", "pretrain.seq_len=128",
          "pretrain.batch_size=16", "pretrain.eval_tokens=32768", "run.device=cpu"]
VARIANTS = {
    "dense": [],
    "moe-8x2": ["pretrain.model.n_experts=8", "pretrain.model.experts_top_k=2", "pretrain.model.moe_d_ff=192"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lmforge-moe")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    root = Path(a.root)
    base = [f"run.root={root}", f"pretrain.max_steps={a.steps}", f"pretrain.eval_every={max(a.steps // 6, 1)}",
            f"pretrain.checkpoint_every={a.steps}", *COMMON]
    py = [sys.executable, "-m", "lmforge.cli"]
    subprocess.run([*py, "run", "--only", "data,tokenizer", "run.name=shared", *base], check=True,
                   stdout=subprocess.DEVNULL)
    results = {}
    for name, extra in VARIANTS.items():
        if (root / name).exists():
            shutil.rmtree(root / name)
        shutil.copytree(root / "shared", root / name, ignore=shutil.ignore_patterns("pretrain"))
        t0 = time.time()
        subprocess.run([*py, "pretrain", f"run.name={name}", *base, *extra], check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        rows = [json.loads(l) for l in open(root / name / "pretrain" / "metrics.jsonl")]
        curve = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        m = json.loads((root / name / "pretrain" / "manifest.json").read_text())["metrics"]
        results[name] = {"curve": curve, "wall": wall, "params": m["params"], "val_loss": m["val_loss"],
                         "dropped": [r.get("moe_dropped_frac") for r in rows if "moe_dropped_frac" in r][-1:]}
    from lmforge.model.config import ModelConfig

    print("| model | total params | active params | final val loss | wall s |\n|---|---:|---:|---:|---:|")
    for name, extra in VARIANTS.items():
        kw = {k.split(".")[-1]: v for k, v in (e.split("=") for e in COMMON + extra) if k.startswith("pretrain.model.")}
        cfg = ModelConfig(vocab_size=4096, **{k: int(v) for k, v in kw.items()})
        r = results[name]
        print(f"| {name} | {r['params']:,} | {cfg.param_count(active=True):,} | {r['val_loss']:.4f} | {r['wall']:.0f} |")
    print("\nvalidation curves (step: loss)")
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{s}: {l:.3f}" for s, l in r["curve"]))


if __name__ == "__main__":
    main()
