"""Plain-text output of the scaling commands (`scaling` CLI and `scaling sweep`): human-sized
numbers, rich tables with a plain fallback, notes, JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt_count(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def fmt_num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


def fmt_money(x: float | None) -> str:
    return "- (no price: pass --price)" if x is None else f"${x:,.0f}"


def fmt_duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:,.1f} h"
    if hours < 24 * 365:
        return f"{hours / 24:,.1f} days"
    return f"{hours / (24 * 365):,.2f} years"


def print_table(title: str, rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print(f"== {title}")
        if header:
            print("  " + " | ".join(header))
        for r in rows:
            print("  " + " | ".join(r))
        return
    t = Table(title=title, show_header=header is not None, title_justify="left")
    names = header or ("",) * max(len(r) for r in rows)
    for i, h in enumerate(names):
        t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console(highlight=False, soft_wrap=False).print(t)


def print_notes(title: str, notes: list[str]) -> None:
    if notes:
        print(f"{title}:")
        for n in dict.fromkeys(notes):  # dedupe, keep order
            print(f"  - {n}")


def json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=json_default))
