#!/usr/bin/env python
"""Cost of verified artifacts: recording a stage's files, a first (hashing) read, a fast-path read.

    python benchmarks/artifact_verify.py --mb 256 --files 4 --out /tmp/verify.json

Writes `--files` random files of `--mb` MB in total into a scratch stage folder, records them
as the pipeline does when a stage completes, then times `verify_stage` three ways: right after
recording (racily clean: every file hashed, the result cached), again (served by the cache),
and after the files are made older than the recording (served by the manifest's size + mtime).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.artifacts import CACHE_FILE, record_artifacts, verify_stage
from lmforge.runs import StageRecord


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="total size of the stage's files")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge-verify-"))
    try:
        stage = root / "pretrain"
        stage.mkdir(parents=True)
        for i in range(a.files):
            (stage / f"model-{i}.bin").write_bytes(os.urandom(a.mb * (1 << 20) // a.files))
        for p in stage.glob("model-*.bin"):
            os.utime(p)  # all just written, as at the end of a stage
        t0 = time.perf_counter()
        rec = StageRecord(stage, "pretrain", {}, fingerprint="x")
        rec.complete(record_artifacts(stage))
        t_record = time.perf_counter() - t0
        t0 = time.perf_counter()
        hashed_first = verify_stage(stage)
        t_first = time.perf_counter() - t0
        (stage / CACHE_FILE).unlink(missing_ok=True)
        past = time.time() - 3600
        for p in stage.glob("model-*.bin"):
            os.utime(p, (past, past))
        rec.complete(record_artifacts(stage))  # re-record with old mtimes: the steady state
        t0 = time.perf_counter()
        hashed_fast = verify_stage(stage)
        t_fast = time.perf_counter() - t0
        res = {
            "mb": a.mb,
            "files": a.files,
            "record_s": round(t_record, 4),
            "record_mb_per_s": round(a.mb / t_record, 1),
            "first_read_s": round(t_first, 4),
            "first_read_hashed_files": hashed_first,
            "fast_path_s": round(t_fast, 6),
            "fast_path_hashed_files": hashed_fast,
        }
        print(json.dumps(res, indent=2))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
