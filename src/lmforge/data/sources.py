"""Inputs of the data stage: which files exist, how they group into tasks, how each is read.

`readers.py` (shared by every stage) reads .txt/.jsonl/.json/.parquet, "builtin" and "hf:";
this module adds the web formats the data stage needs -- folders of ``.html`` pages, Common
Crawl ``.warc(.gz)`` (HTML responses) and ``.wet`` (already extracted text, the "conversion"
records), and compressed ``.jsonl/.txt`` (``.gz``, ``.zst``) -- and splits the inputs into
*tasks*: groups of consecutive files of about `task_bytes`, so a process pool or a cluster can
work on them independently and a killed run redoes only unfinished tasks. A file larger than a
task is cut into byte-range tasks at record boundaries where its format allows (`ranges.py`).
The built-in corpus is cut into `parts` contiguous slices. Task order is input order, so concatenating task outputs
gives the same documents in the same order whatever the number of workers.

Bad input is counted in the task's `ReadStats` under a reason (binary file, truncated gzip or
WARC record, non-HTML response, undecodable bytes replaced...), never raised, except what the
user must fix first: a path that does not exist or matches nothing (DataError).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data import readers
from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.ranges import iter_jsonl_range, jsonl_document, plan_ranges, range_kind
from lmforge.data.readers import Document, ReadStats, decode_utf8
from lmforge.errors import DataError

HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".html.gz", ".htm.gz")
WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".wat", ".wat.gz", ".arc", ".arc.gz")
COMPRESSED_SUFFIXES = (
    ".jsonl.gz",
    ".jsonl.zst",
    ".jsonl.zstd",
    ".json.gz",
    ".txt.gz",
    ".txt.zst",
    ".txt.zstd",
)
NATIVE_SUFFIXES = tuple(readers.SUPPORTED_EXTENSIONS)
ALL_SUFFIXES = HTML_SUFFIXES + WARC_SUFFIXES + COMPRESSED_SUFFIXES + NATIVE_SUFFIXES
MAX_MESSAGE = 200


def file_kind(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    for kind, suffixes in (
        ("warc", WARC_SUFFIXES),
        ("html", HTML_SUFFIXES),
        ("compressed", COMPRESSED_SUFFIXES),
        ("native", NATIVE_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


@dataclass
class Task:
    """One unit of parallel work: some files, or one slice of a non-file source."""

    index: int
    kind: str  # "files" | "range" | "builtin" | "hf"
    items: list[str]  # file paths (one for "range"), or the spec
    part: int = 0
    parts: int = 1
    bytes: int = 0
    fingerprint: list = field(default_factory=list)  # (path, size, mtime) of its files
    span: list[int] = field(default_factory=list)  # "range": [start, end, first record number]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**d)

    @property
    def name(self) -> str:
        return f"task-{self.index:05d}"


# ----------------------------------------------------------------------------- planning
def resolve_inputs(specs: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """[(kind, target)] in input order, plus files that were skipped as unsupported."""
    out: list[tuple[str, str]] = []
    skipped: list[str] = []
    for spec in specs:
        s = os.fspath(spec)
        if s == "builtin":
            out.append(("builtin", s))
            continue
        if s.startswith("hf:"):
            out.append(("hf", s))
            continue
        p = Path(s).expanduser()
        if p.is_file():
            if file_kind(p) is None:
                raise DataError(f"{p}: unsupported file type; supported: {', '.join(ALL_SUFFIXES)}")
            out.append(("file", str(p)))
            continue
        if p.is_dir():
            candidates = _walk(p)
        elif any(ch in s for ch in "*?["):
            candidates = []
            for m in sorted(glob.glob(os.path.expanduser(s), recursive=True)):
                candidates.extend(_walk(Path(m)) if Path(m).is_dir() else [Path(m)])
        else:
            raise DataError(
                f"{s}: no such file or directory; check the path (relative paths are relative "
                f"to {os.getcwd()}), or use 'builtin' for the built-in corpus"
            )
        found = [c for c in candidates if c.is_file() and file_kind(c) is not None]
        skipped += [str(c) for c in candidates if c.is_file() and file_kind(c) is None]
        if not found:
            raise DataError(f"{s}: matches no supported file; supported: {', '.join(ALL_SUFFIXES)}")
        out.extend(("file", str(f)) for f in found)
    return out, skipped


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return sorted(found)


def plan_tasks(
    specs: list[str], workers: int = 1, task_bytes: int = 64 << 20
) -> tuple[list[Task], list[str]]:
    """Group the inputs into tasks (see module docstring); returns (tasks, skipped files)."""
    sources, skipped = resolve_inputs(specs)
    tasks: list[Task] = []
    files = [t for k, t in sources if k == "file"]
    total = sum(os.path.getsize(f) for f in files)
    # at least ~2 tasks per worker when the input allows, never more than task_bytes per task
    target = max(1, min(task_bytes, -(-total // max(1, 2 * workers))))
    group: list[str] = []
    group_bytes = 0

    def flush():
        nonlocal group, group_bytes
        if group:
            fp = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in group]
            tasks.append(Task(len(tasks), "files", group, bytes=group_bytes, fingerprint=fp))
            group, group_bytes = [], 0

    for kind, target_item in sources:
        if kind != "file":
            flush()
            parts = max(1, workers) if kind == "builtin" else 1
            for part in range(parts):
                tasks.append(Task(len(tasks), kind, [target_item], part=part, parts=parts))
            continue
        size = os.path.getsize(target_item)
        if size > target and range_kind(target_item) is not None:
            flush()
            fp = [(target_item, size, int(os.path.getmtime(target_item)))]
            for start, end, first in plan_ranges(target_item, target):
                tasks.append(
                    Task(
                        len(tasks),
                        "range",
                        [target_item],
                        bytes=end - start,
                        fingerprint=fp,
                        span=[start, end, first],
                    )
                )
            continue
        if group and group_bytes + size > target:
            flush()
        group.append(target_item)
        group_bytes += size
    flush()
    return tasks, skipped


# ----------------------------------------------------------------------------- reading
@dataclass
class SourceStats(ReadStats):
    """`ReadStats` plus informational counts that are not document drops (skipped WARC records)."""

    info: dict[str, int] = field(default_factory=dict)


def iter_task_documents(
    task: Task,
    text_field: str,
    stats: SourceStats,
    max_html_bytes: int = 5_000_000,
) -> Iterator[Document]:
    """The documents of one task, each with ``meta["id"]``; problems are counted in `stats`."""
    if task.kind == "builtin":
        yield from _iter_builtin_slice(task.part, task.parts, stats)
        return
    if task.kind == "hf":
        yield from _with_ids(readers.iter_documents(task.items[0], text_field, stats))
        return
    if task.kind == "range":
        rpath, (start, end, first) = Path(task.items[0]), task.span
        if range_kind(rpath) == "jsonl":
            yield from iter_jsonl_range(rpath, text_field, stats, start, end, first)
        else:
            yield from _iter_warc(rpath, stats, max_html_bytes, start, end, first)
        return
    for path in task.items:
        kind = file_kind(path)
        try:
            if kind == "native":
                yield from _with_ids(readers.iter_documents(path, text_field, stats))
            elif kind == "html":
                yield from _iter_html_file(Path(path), stats, max_html_bytes)
            elif kind == "warc":
                yield from _iter_warc(Path(path), stats, max_html_bytes)
            elif kind == "compressed":
                yield from _iter_compressed(Path(path), text_field, stats)
        except DataError as e:  # e.g. a parquet file without the text column: count, go on
            stats.files += 1
            stats.drop("unreadable_file", path, str(e)[:MAX_MESSAGE])


def _with_ids(docs: Iterator[Document]) -> Iterator[Document]:
    for doc in docs:
        doc.meta.setdefault("id", doc.meta.get("location") or doc.source)
        yield doc


def _iter_builtin_slice(part: int, parts: int, stats: ReadStats) -> Iterator[Document]:
    docs = harvest_builtin_corpus()
    lo, hi = part * len(docs) // parts, (part + 1) * len(docs) // parts
    stats.files += 1 if part == 0 else 0
    for doc in docs[lo:hi]:
        stats.records_read += 1
        if not doc.text.strip():
            stats.drop("empty", doc.source, "empty or whitespace-only text")
            continue
        stats.records_kept += 1
        doc.meta.setdefault("id", doc.source)
        yield doc


def _is_binary(data: bytes) -> bool:
    head = data[:8192]
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")):
        return False  # UTF-16/8 byte-order marks
    return b"\x00" in head


def _decode_html(data: bytes) -> str:
    from trafilatura.utils import decode_file

    return decode_file(data)


def _iter_html_file(path: Path, stats: ReadStats, max_bytes: int) -> Iterator[Document]:
    stats.files += 1
    stats.records_read += 1
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        stats.drop("unreadable_file", str(path), f"{type(e).__name__}: {e}"[:MAX_MESSAGE])
        return
    if not data.strip():
        stats.drop("empty", str(path), "empty file")
        return
    if _is_binary(data):
        stats.drop("binary", str(path), "NUL bytes in the first 8 KB: not an HTML page")
        return
    if len(data) > max_bytes:
        stats.drop("html_too_large", str(path), f"{len(data):,} bytes > extract.max_html_bytes")
        return
    stats.records_kept += 1
    yield Document(_decode_html(data), str(path), {"id": str(path), "format": "html"})


def _iter_warc(
    path: Path, stats: SourceStats, max_bytes: int, start: int = 0, end: int | None = None, first: int = 1
) -> Iterator[Document]:
    """HTML responses and WET conversion records; other record types are counted, not read.

    With `start`/`end`, the records starting in that byte range (`first` numbers the first one).
    Every record counted as read ends as kept or as exactly one drop; damage found between
    records (a corrupt tail, garbage) is one more record read and dropped, so the funnel balances.
    """
    from warcio.archiveiterator import ArchiveIterator

    stats.files += 1 if start == 0 else 0
    try:
        fh = open(path, "rb")
    except OSError as e:
        stats.records_read += 1
        stats.drop("unreadable_file", str(path), f"{type(e).__name__}: {e}"[:MAX_MESSAGE])
        return
    n = first - 1
    is_arc = path.name.lower().endswith((".arc", ".arc.gz"))
    settled_before = stats.records_kept + sum(stats.dropped.values())
    read_before = stats.records_read
    with fh:
        stop = os.fstat(fh.fileno()).st_size if end is None else end
        fh.seek(start)
        try:
            it = ArchiveIterator(fh, arc2warc=True)
            for record in it:
                # it.offset: where this record starts (absolute once one record was read)
                if end is not None and n >= first and it.offset >= end:
                    stop = end
                    break
                n += 1
                rtype = record.rec_type
                url = record.rec_headers.get_header("WARC-Target-URI")
                where = f"{path}#{n}"
                if rtype not in ("response", "conversion", "resource"):
                    key = f"warc_{rtype}_records_skipped"
                    stats.info[key] = stats.info.get(key, 0) + 1
                    continue
                stats.records_read += 1
                meta = {
                    # ARC records get a random WARC-Record-ID when converted: use the position
                    "id": (not is_arc and record.rec_headers.get_header("WARC-Record-ID")) or where,
                    "url": url,
                    "date": record.rec_headers.get_header("WARC-Date"),
                    "location": where,
                }
                if rtype != "conversion":  # decide from the headers before reading the payload
                    ctype = ""
                    if record.http_headers is not None:
                        status = record.http_headers.get_statuscode()
                        if status and not status.startswith("2"):
                            stats.drop(f"http_status_{status[0]}xx", where, f"{url}: HTTP {status}")
                            continue
                        ctype = (record.http_headers.get_header("Content-Type") or "").lower()
                    ctype = (
                        ctype or (record.rec_headers.get_header("WARC-Identified-Payload-Type") or "").lower()
                    )
                    if ctype and "html" not in ctype:
                        stats.drop("non_html_response", where, f"{url}: {ctype[:60]}")
                        continue
                payload = record.content_stream().read(max_bytes + 1)
                if len(payload) > max_bytes:
                    stats.drop("too_large", where, f"{url}: more than {max_bytes:,} bytes")
                    continue
                if getattr(record.raw_stream, "limit", 0):
                    stats.drop("truncated_record", where, f"{url}: record ends early (truncated file)")
                    continue
                if rtype == "conversion":
                    text, bad = decode_utf8(payload)
                    stats.replaced_bytes += bad
                    meta["format"] = "text"
                else:
                    if _is_binary(payload):
                        stats.drop("binary", where, f"{url}: binary payload")
                        continue
                    text = _decode_html(payload)
                    meta["format"] = "html"
                if not text.strip():
                    stats.drop("empty", where, f"{url}: empty payload")
                    continue
                stats.records_kept += 1
                yield Document(text, str(path), meta)
            if n >= first and it.offset < stop:  # warcio ends quietly on a cut gzip member
                stats.records_read += 1
                stats.drop(
                    "truncated_record", f"{path}#{n + 1}", f"{stop - it.offset:,} bytes after the last record"
                )
        except Exception as e:  # truncated gzip member, garbage, not a WARC at all
            settled = stats.records_kept + sum(stats.dropped.values()) - settled_before
            if stats.records_read - read_before <= settled:  # damage between records: one more read
                stats.records_read += 1
            stats.drop("corrupt_warc", f"{path}#{n + 1}", f"{type(e).__name__}: {e}"[:MAX_MESSAGE])


def _open_compressed(path: Path):
    name = path.name.lower()
    raw = open(path, "rb")
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def _iter_compressed(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import zstandard

    stats.files += 1
    name = path.name.lower()
    is_txt = ".txt." in name
    lineno = 0
    try:
        with _open_compressed(path) as f:
            if is_txt:
                data = f.read()
                stats.records_read += 1
                whole, bad = decode_utf8(data)
                stats.replaced_bytes += bad
                if not whole.strip():
                    stats.drop("empty", str(path), "empty text")
                    return
                stats.records_kept += 1
                yield Document(whole, str(path), {"id": str(path)})
                return
            for raw in f:
                lineno += 1
                doc = jsonl_document(raw, path, lineno, text_field, stats)
                if doc is not None:
                    yield doc
    except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
        stats.drop("truncated_compressed", f"{path}:{lineno + 1}", f"{type(e).__name__}: {e}"[:MAX_MESSAGE])
