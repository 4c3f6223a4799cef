"""How much the Gopher rules' word splitting matters: whitespace words vs datatrove's punctuation
split (NLTK Treebank per sentence), same thresholds, same documents.

Inputs: the built-in corpus (stdlib docstrings, ~1.1k documents) and, when given, a folder of
HTML pages (extracted with trafilatura first). Reports documents kept by gopher_quality and
gopher_repetition under each mode, the drop reasons, and the CPU seconds of each mode.

    python benchmarks/data_gopher_words.py [--html /work/shared/data/html/pages] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_common import machine

from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.config import GopherQualityConfig, GopherRepetitionConfig
from lmforge.data.readers import Document
from lmforge.data.steps import quality, run_steps
from lmforge.data.steps.extract import HtmlExtract


def corpus(html: str | None) -> dict[str, list[str]]:
    out = {"builtin": [d.text for d in harvest_builtin_corpus()]}
    if html:
        pages = [
            Document(p.read_text(errors="replace"), str(p), {"format": "html"})
            for p in sorted(Path(html).glob("*.htm*"))
        ]
        out["html"] = [d.text for d in HtmlExtract()(pages)]
    return out


def run_mode(texts: list[str], words: str) -> dict:
    steps = [
        quality.gopher_quality(GopherQualityConfig(words=words), 0),
        quality.gopher_repetition(GopherRepetitionConfig(words=words), 0),
    ]
    t = time.process_time()
    kept = sum(1 for _ in run_steps((Document(x, "b", {}) for x in texts), steps))
    cpu = time.process_time() - t
    dropped = {f"{s.name}:{r}": v["docs"] for s in steps for r, v in sorted(s.stats.dropped.items())}
    return {"docs": len(texts), "kept": kept, "cpu_s": round(cpu, 3), "dropped": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", default=None, help="a folder of .html pages to add as a second corpus")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    print(machine())
    result = {}
    for name, texts in corpus(args.html).items():
        result[name] = {w: run_mode(texts, w) for w in ("whitespace", "datatrove")}
        ws, dt = result[name]["whitespace"], result[name]["datatrove"]
        print(
            f"{name}: {ws['docs']} docs; kept whitespace {ws['kept']} vs datatrove {dt['kept']} "
            f"({ws['kept'] / max(1, dt['kept']):.2f}x); CPU {ws['cpu_s']}s vs {dt['cpu_s']}s "
            f"({dt['cpu_s'] / max(ws['cpu_s'], 1e-9):.2f}x)"
        )
        print(f"  whitespace drops: {ws['dropped']}\n  datatrove drops:  {dt['dropped']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
