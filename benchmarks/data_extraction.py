"""Extraction quality: main text vs boilerplate on annotated real web pages.

Each page of the annotation file lists snippets that MUST appear in the extracted main text
("with") and snippets that must NOT (menus, related links, footers: "without"). We report the
share of "with" snippets found and of "without" snippets absent, for the extraction step as the
data stage runs it (trafilatura through `HtmlExtract`, reading pages with the stage's own HTML
reader) at each `favor` setting, next to a naive baseline (all text of <body> via lxml).

    python benchmarks/data_extraction.py [--pages DIR --annotations FILE]

Defaults point at the shared test data (/work/shared/data/html).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.data.sources import SourceStats, Task, iter_task_documents  # noqa: E402
from lmforge.data.steps.extract import HtmlExtract  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_common import machine  # noqa: E402


def naive_text(html: str) -> str:
    import lxml.html

    try:
        root = lxml.html.fromstring(html)
    except Exception:
        return ""
    for bad in root.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    body = root.find("body")
    return " ".join((body if body is not None else root).text_content().split())


def score(texts: dict[str, str], anns: list[dict]) -> tuple[float, float, int, int]:
    w = wf = wo = woa = 0
    for a in anns:
        t = texts.get(a["file"], "")
        for s in a.get("with", []):
            w += 1
            wf += s in t
        for s in a.get("without", []):
            wo += 1
            woa += s not in t
    return wf / max(w, 1), woa / max(wo, 1), w, wo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", default="/work/shared/data/html/pages")
    ap.add_argument("--annotations", default="/work/shared/data/html/annotations.jsonl")
    args = ap.parse_args()
    anns = [json.loads(line) for line in Path(args.annotations).read_text().splitlines() if line.strip()]
    files = [str(Path(args.pages) / a["file"]) for a in anns]
    raw = {
        Path(d.source).name: d for d in iter_task_documents(Task(0, "files", files), "text", SourceStats())
    }
    print(f"# extraction benchmark: {len(anns)} pages; {machine()}")
    first = next(iter(raw.values()))
    list(HtmlExtract()([type(first)(first.text, first.source, dict(first.meta))]))  # imports, caches
    print(f"command: python benchmarks/data_extraction.py --pages {args.pages}")
    print()
    print("| extractor | 'with' found | 'without' absent | pages/s (wall) | pages per CPU-second |")
    print("|---|---|---|---|---|")
    rows = []
    for favor in ("precision", "balanced", "recall"):
        step = HtmlExtract(favor=favor)
        t0, c0 = time.perf_counter(), time.process_time()
        docs = [type(d)(d.text, d.source, dict(d.meta)) for d in raw.values()]
        out = {Path(d.source).name: d.text for d in step(docs)}
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        wf, woa, nw, nwo = score(out, anns)
        rows.append(
            (
                f"trafilatura favor={favor}" + (" (default)" if favor == "precision" else ""),
                wf,
                woa,
                len(anns) / dt,
                len(anns) / cpu,
            )
        )
    t0, c0 = time.perf_counter(), time.process_time()
    naive = {name: naive_text(d.text) for name, d in raw.items()}
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    wf, woa, nw, nwo = score(naive, anns)
    rows.append(("baseline: all <body> text (lxml)", wf, woa, len(anns) / dt, len(anns) / cpu))
    for name, wf, woa, pps, ppc in rows:
        print(f"| {name} | {wf:.3f} | {woa:.3f} | {pps:.1f} | {ppc:.1f} |")
    print()
    print(f"({nw} 'with' and {nwo} 'without' snippets over {len(anns)} pages)")


if __name__ == "__main__":
    main()
