"""What a tracker costs per metrics line: `metrics.jsonl` alone vs. + TensorBoard / W&B / MLflow.

Writes `--lines` pretraining-like metric lines (12 scalars each) through the engine's
`MetricsWriter` inside `track_stage`, once per tracker, in a temporary run directory, and reports
milliseconds per line (the training loop pays this every `log_every` steps) plus the time to open
and close the tracker run. CPU only; nothing leaves the machine (W&B offline, MLflow file store).

    python benchmarks/tracking_overhead.py --lines 500 --out tracking.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.config import RunSettings, missing_trackers
from lmforge.train.config import TrainConfig
from lmforge.train.tracking import MetricsWriter, track_stage


def line(step: int) -> dict:
    return {
        "step": step,
        "loss": 5.0 / (1 + step * 1e-3),
        "lr": 3e-3,
        "tokens": step * 4096,
        "tokens_per_s": 81234.5,
        "elapsed_s": step * 0.1,
        "grad_norm": 0.7,
        "tflops": 1.2,
        "mfu": 0.31,
        "eval/loss": 5.1,
        "eval/ppl": 160.0,
        "eval/bpb": 1.9,
        "eval/tokens": 1024,
    }


def measure(tracker: str | None, lines: int, root: Path) -> dict:
    run = RunSettings(
        name=f"bench-{tracker or 'jsonl'}", root=str(root), trackers=[tracker] if tracker else []
    )
    stage_dir = run.dir / "pretrain"
    stage_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with track_stage(run, "pretrain", TrainConfig(), stage_dir, log=lambda m: None) as tracking:
        t1 = time.perf_counter()
        writer = MetricsWriter(stage_dir / "metrics.jsonl")
        for s in range(1, lines + 1):
            writer.write(line(s))
        t2 = time.perf_counter()
        if tracking is not None:
            tracking.summary = {"val_loss": 5.1}
    t3 = time.perf_counter()
    return {
        "tracker": tracker or "jsonl only",
        "ms_per_line": round((t2 - t1) / lines * 1e3, 3),
        "open_s": round(t1 - t0, 3),
        "close_s": round(t3 - t2, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tracker in [None, "tensorboard", "wandb", "mlflow"]:
            if tracker and missing_trackers([tracker]):
                print(f"{tracker}: not installed, skipped")
                continue
            rows.append(measure(tracker, a.lines, Path(tmp)))
            print(json.dumps(rows[-1]))
    if a.out:
        Path(a.out).write_text(json.dumps({"lines": a.lines, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
