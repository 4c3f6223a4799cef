#!/usr/bin/env python
"""The fuzz tests, long: every `tests/**/test_fuzz_*.py` target with its example budget multiplied.

    python benchmarks/fuzz_long.py --scale 50            # ~50x the normal suite's examples
    python benchmarks/fuzz_long.py --scale 20 -k readers # one file

The normal suite runs each hypothesis target with a small fixed budget (derandomised, under a
minute for all); this script sets ``LMFORGE_FUZZ_SCALE`` so each target draws `scale` times as
many *fresh random* examples, runs pytest with ``--hypothesis-show-statistics`` and prints, per
target, the examples tried (passing / failing / invalid) and the time. A failure prints
hypothesis' minimal failing example; add it to the test as an ``@example`` once fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^(tests/\S+::\S+):\s*$")
# "60 passing, 0 failing, and 7 invalid test cases" (hypothesis >= 6.1xx) or the older
# "60 passing examples, 0 failing examples, 7 invalid examples"
COUNTS = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,(?: and)? (\d+) invalid")


def parse_statistics(output: str) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        m = HEADER.match(line.strip())
        if m:
            current = stats.setdefault(m.group(1), {"passing": 0, "failing": 0, "invalid": 0})
            continue
        m = COUNTS.search(line)
        if m and current is not None:
            current["passing"] += int(m.group(1))
            current["failing"] += int(m.group(2))
            current["invalid"] += int(m.group(3))
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=50, help="multiplier of each target's example budget")
    ap.add_argument("-k", default=None, help="pytest -k expression (select targets)")
    ap.add_argument("--out", default=None, help="write the per-target counts as JSON here")
    args = ap.parse_args(argv)
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_fuzz_*.py"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:warnings",
        "-p",
        "no:cacheprovider",
        "--hypothesis-show-statistics",
        *files,
    ] + (["-k", args.k] if args.k else [])
    env = {**os.environ, "LMFORGE_FUZZ_SCALE": str(args.scale)}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    stats = parse_statistics(proc.stdout)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    print("| target | passing | failing | invalid |\n|---|---|---|---|")
    for name, c in sorted(stats.items()):
        print(
            f"| {name.split('::', 1)[1]} ({Path(name.split('::')[0]).stem.removeprefix('test_fuzz_')}) | "
            f"{c['passing']} | {c['failing']} | {c['invalid']} |"
        )
    total = sum(c["passing"] + c["failing"] for c in stats.values())
    print(
        f"\nscale {args.scale:g}: {total} examples over {len(stats)} targets in {wall:.0f} s; "
        f"{'no failures' if proc.returncode == 0 else 'FAILED: ' + ', '.join(failed)}"
    )
    if proc.returncode != 0:  # the failures with their minimal examples, not the statistics
        out = proc.stdout
        start = out.find("= FAILURES =")
        end = out.find("= Hypothesis Statistics =")
        print(out[start : end if end > start else None][-20000:] if start >= 0 else out[-8000:])
        print(proc.stderr[-2000:], file=sys.stderr)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"scale": args.scale, "seconds": round(wall, 1), "targets": stats, "failed": failed}, indent=2
            )
        )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
