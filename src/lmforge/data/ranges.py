"""Byte-range tasks: one large input file read by several workers.

A 40 MB JSONL file given to ``workers: 2`` used to be one task, so one worker did all of it.
`plan_ranges` cuts a file larger than the task size into contiguous byte ranges that start at a
record boundary: a line start for JSONL, a record start for uncompressed WARC/ARC/WET (found by
walking the record headers with warcio, which skips the payloads). Each range also carries the
number of the first record it holds, so document ids (``file:line``, ``file#record``) are the same
whichever way the file was cut, and the stage output does not depend on the number of workers.

What is not split, and why: a ``.txt`` file is one document; compressed files (``.gz``, ``.zst``)
cannot be entered in the middle without an index; a JSON array is one value; Parquet is read
whole by pyarrow. Those stay one task per file.

Reading a range: the records whose first byte lies in ``[start, end)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.readers import Document, ReadStats, decode_utf8, loads_json, record_text

CHUNK = 8 << 20


def range_kind(path: str | os.PathLike) -> str | None:
    """ "jsonl" or "warc" when the file can be cut into byte ranges, else None."""
    name = Path(path).name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith((".warc", ".arc", ".wet", ".wat")):
        return "warc"
    return None


def plan_ranges(path: str, target: int) -> list[tuple[int, int, int]]:
    """[(start, end, first_record_number)] covering the file, each about `target` bytes."""
    size = os.path.getsize(path)
    if size <= target or range_kind(path) is None:
        return [(0, size, 1)]
    starts = _jsonl_starts(path, target, size) if range_kind(path) == "jsonl" else _warc_starts(path, target)
    ends = [s for s, _ in starts[1:]] + [size]
    return [(s, e, n) for (s, n), e in zip(starts, ends) if e > s]


def _jsonl_starts(path: str, target: int, size: int) -> list[tuple[int, int]]:
    """Line starts near every multiple of `target`, with their 1-based line numbers."""
    starts = [(0, 1)]
    lines_before, counted_to = 0, 0
    with open(path, "rb") as f:
        want = target
        while want < size:
            f.seek(want - 1)
            f.readline()  # to the end of the line holding byte want-1: the next line starts here
            cut = f.tell()
            if cut >= size:
                break
            f.seek(counted_to)
            left = cut - counted_to
            while left:
                block = f.read(min(CHUNK, left))
                lines_before += block.count(b"\n")
                left -= len(block)
            counted_to = cut
            starts.append((cut, lines_before + 1))
            want = cut + target
    return starts


def _warc_starts(path: str, target: int) -> list[tuple[int, int]]:
    """Record starts near every multiple of `target`, with the record's 1-based number."""
    from warcio.archiveiterator import ArchiveIterator

    starts = [(0, 1)]
    want = target
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh, arc2warc=True)
        try:
            for n, _record in enumerate(it, start=1):
                offset = it.get_record_offset()
                if offset >= want and n > 1:
                    starts.append((offset, n))
                    want = offset + target
        except Exception:  # a corrupt tail: the last range reads it and counts the damage
            pass
    return starts


def jsonl_document(raw: bytes, path: Path, lineno: int, text_field: str, stats: ReadStats) -> Document | None:
    """One line of a JSONL file as a document (id `path:line`), or None, counted in `stats`:
    blank lines are skipped, bad JSON and empty text dropped with their reason."""
    line, bad = decode_utf8(raw)
    stats.replaced_bytes += bad
    if not line.strip():
        return None
    where = f"{path}:{lineno}"
    stats.records_read += 1
    rec, err = loads_json(line)
    if err is not None:
        stats.drop("bad_json", where, err)
        return None
    text = record_text(rec, text_field, where, stats)
    if text is None:
        return None
    if not text.strip():
        stats.drop("empty", where, "empty or whitespace-only text")
        return None
    meta = {k: v for k, v in rec.items() if k != text_field}
    meta["location"] = where
    meta.setdefault("id", where)
    stats.records_kept += 1
    return Document(text, str(path), meta)


def iter_jsonl_range(
    path: Path, text_field: str, stats: ReadStats, start: int, end: int, first_line: int
) -> Iterator[Document]:
    """The documents of the JSON lines starting in ``[start, end)``; ids as for the whole file."""
    if start == 0:
        stats.files += 1
    with open(path, "rb") as f:
        f.seek(start)
        pos, lineno = start, first_line - 1
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            doc = jsonl_document(raw, path, lineno, text_field, stats)
            if doc is not None:
                yield doc
