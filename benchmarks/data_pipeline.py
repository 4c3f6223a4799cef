"""Whole data-stage throughput: MB of input per second for the default step list.

Runs `run_data_stage` end to end (read, extract, sanity, URL filter, language id, Gopher
quality + repetition, C4 and FineWeb (flag mode), word filter, PII, domain labels, exact +
MinHash dedup, quality classifier, mixing, split, shards, reports) on

* the built-in corpus (the default inputs; its harvest from the stdlib sources is timed
  separately and excluded, since it is cached per process),
* the annotated HTML pages + the Common Crawl WARC/WET sample (raw HTML bytes as input),

with 1 and 2 local workers. Each run writes into a fresh temporary folder. Besides wall time we
report CPU time (this process + its workers): on a shared machine wall time depends on the other
tenants, "MB per CPU-second" does not (it is the one-core throughput).

    python benchmarks/data_pipeline.py [--html /work/shared/data/html]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_common import cpu_seconds, machine  # noqa: E402

from lmforge.data.config import DataConfig  # noqa: E402
from lmforge.data.stage import run_data_stage  # noqa: E402


def bench(name: str, cfg: DataConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), cpu_seconds()
        m = run_data_stage(cfg, Path(tmp) / "data", seed=0, log=lambda s: None)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    mb = m["bytes_in"] / 1e6
    print(
        f"| {name} | {cfg.workers} | {mb:.2f} | {m['docs_in']:,} | {m['docs_out']:,} | {dt:.1f} | {cpu:.1f} | "
        f"{mb / dt:.3f} | {mb / cpu:.3f} |"
    )
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--html", default="/work/shared/data/html")
    args = ap.parse_args()
    from lmforge.data.builtin import harvest_builtin_corpus

    t0 = time.perf_counter()
    harvest_builtin_corpus()
    harvest = time.perf_counter() - t0
    print(f"# data pipeline throughput; {machine()}")
    print(f"command: python benchmarks/data_pipeline.py --html {args.html}")
    print(f"(built-in corpus harvest: {harvest:.1f}s, cached, excluded below)")
    print()
    print(
        "| input | workers | input MB | docs in | docs out | wall s | CPU s | MB/s (wall) | MB per CPU-second |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports, language model, sklearn
        warm = Path(tmp) / "warm.jsonl"
        warm.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in harvest_builtin_corpus()[:80]))
        run_data_stage(DataConfig(inputs=[str(warm)]), Path(tmp) / "out", seed=0, log=lambda s: None)
    for workers in (1, 2):
        bench("builtin (default config)", DataConfig(workers=workers))
    html = Path(args.html)
    if html.is_dir():
        for workers in (1, 2):
            bench(
                "HTML pages + WARC/WET (default config)",
                DataConfig(inputs=[str(html / "pages"), str(html / "warc")], workers=workers),
            )


if __name__ == "__main__":
    main()
