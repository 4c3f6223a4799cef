"""Time the default pipeline (`lmforge run`) from an empty run directory and report its model's
validation bits-per-byte next to the unigram baseline on the same split.

    python benchmarks/default_pipeline.py [--root /tmp/lmforge-bench] [extra KEY=VALUE overrides]

Prints a markdown table (stage, seconds, key metrics) and the total wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="run root (default: a fresh temp dir)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="lmforge-bench-"))
    if (root / "tiny").exists():
        shutil.rmtree(root / "tiny")
    cmd = [sys.executable, "-m", "lmforge.cli", "run", f"run.root={root}", *a.overrides]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    run = root / "tiny"
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    print(f"command: {' '.join(cmd[1:])}\n")
    print("| stage | seconds | metrics |\n|---|---:|---|")
    manifests = sorted(run.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    for path in manifests:
        stage = path.parent.name
        m = json.loads(path.read_text())
        keep = {k: v for k, v in m["metrics"].items() if isinstance(v, (int, float))}
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(keep.items())[:8]
        )
        print(f"| {stage} | {m['seconds']:.1f} | {shown} |")
    ev = json.loads((run / "eval" / "results.json").read_text())
    print(f"\ntotal wall time: {wall:.0f} s")
    print(
        f"val bits-per-byte: model {ev['bpb']:.3f}, unigram baseline {ev['unigram_bpb']:.3f} "
        f"(ratio {ev['bpb'] / ev['unigram_bpb']:.2f}) on {ev['tokens']:,} val tokens"
    )


if __name__ == "__main__":
    main()
