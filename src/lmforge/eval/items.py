"""What every task reader shares: reading records from JSONL / JSON arrays / CSV, checking an
item's fields, and the one policy for malformed items -- raise a `DataError` naming the file,
line and field (``on_error="raise"``), or skip and count the item by reason (``"skip"``).

Kept apart from the readers of each format (`readers.py`, `specs.py`) so that they share one
definition of "a bad item" and one error message shape.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from ..data.readers import loads_json
from ..errors import DataError
from .tasks import Doc, Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Problems:
    """Raise on the first malformed item, or count it and go on."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.counts: Counter = Counter()

    def __call__(self, where: str, reason: str, detail: str) -> None:
        if self.on_error == "raise":
            raise DataError(
                f"{where}: {detail} [{reason}]; fix the item, or evaluate with on_error=skip "
                f"to skip and count such items"
            )
        self.counts[reason] += 1


class BadItem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def need(rec: dict, key: str, where_key: str | None = None) -> Any:
    if not isinstance(rec, dict) or key not in rec or rec[key] is None:
        raise BadItem("missing_" + (where_key or key), f"field {where_key or key!r} is missing")
    return rec[key]


def check_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise BadItem("no_choices", "the item has no choices")
    out = []
    for j, c in enumerate(choices):
        if not isinstance(c, (str, int, float)) or not str(c).strip():
            raise BadItem("empty_choice", f"choice {j} is empty")
        out.append(str(c))
    return out


def check_index(gold: Any, n: int) -> int:
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise BadItem("bad_answer", f"answer {gold!r} is not an index")
    if not 0 <= gold < n:
        raise BadItem("answer_out_of_range", f"answer index {gold} is out of range for {n} choices")
    return gold


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def iter_records(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(where, record) from JSONL, a JSON array or a CSV with a header."""
    text = read_text(path)
    name = path.name.lower()
    if name.endswith(".csv") or name.endswith(".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ",")
        for row in reader:
            yield f"{path}:{reader.line_num}", dict(row)
        return
    if name.endswith(".json") and text.lstrip().startswith("["):
        items, err = loads_json(text)
        if err is not None:
            raise DataError(f"{path}: {err}")
        for i, rec in enumerate(items):
            yield f"{path}[{i}]", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec, err = loads_json(line)
        if err is not None:
            problems(f"{path}:{n}", "invalid_json", err)
            continue
        if not isinstance(rec, dict):
            problems(f"{path}:{n}", "not_an_object", "each line must be a JSON object")
            continue
        yield f"{path}:{n}", rec


def read_items(
    path: Path, problems: Problems, build: Callable[[dict, str], Doc | None], shapes: str | None = None
) -> list[Doc]:
    """The items `build` makes of each record. `shapes` (the record shapes the reader accepts) is
    added to the error of an item that lacks a field, so the user sees what was expected."""
    docs = []
    for where, rec in iter_records(path, problems):
        try:
            doc = build(rec, where)
        except BadItem as b:
            missing = b.reason.startswith("missing_") or b.reason == "no_choices"
            problems(where, b.reason, f"{b.detail}. {shapes}" if shapes and missing else b.detail)
            continue
        if doc is not None:
            if not doc.id:
                doc.id = where.rsplit("/", 1)[-1]
            docs.append(doc)
    if not docs:
        raise DataError(
            f"{path}: no usable items" + (f" (skipped: {dict(problems.counts)})" if problems.counts else "")
        )
    return docs


def make_task(
    name: str,
    kind: Literal["multiple_choice", "generate"],
    docs: list[Doc],
    problems: Problems,
    source: Path,
    **kw,
) -> Task:
    t = Task(name=name, kind=kind, docs=docs, source=str(source), **kw)
    t.skipped = Counter(problems.counts)
    return t
