"""Readers: turn whatever text the user points at into a stream of `Document`s.

Every data stage starts here, so this file owns two promises. First, *one spec language*: a
file, a folder (all supported files under it, recursively, in sorted order), a glob, a list of
those, ``"builtin"`` (the offline corpus harvested from the Python install, see builtin.py),
``"hf:NAME[:SPLIT]"`` / ``"hf:NAME:CONFIG:SPLIT"`` (Hugging Face hub, online only) or a folder
written by ``datasets.Dataset.save_to_disk``. Second, *bad records never crash a run and never
vanish silently*: a malformed JSON line, a missing or non-string text field, or an empty text is
a counted drop in `ReadStats` with up to five ``file:line: message`` examples per reason, and
undecodable bytes are replaced (U+FFFD) and counted rather than fatal. What *is* fatal is what
the user must fix before anything useful can happen: a path that does not exist, a spec that
matches no supported file, a parquet file without the text column. Those raise `DataError`
naming the path and the fix, and they raise when `iter_documents` is called (the spec is
resolved eagerly), not an hour later when the generator first reaches the bad input.

Documents are produced lazily (generators all the way down, as in datatrove) so a folder of
parquet files larger than memory streams through, one row group at a time.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.document import Document
from lmforge.errors import DataError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
MAX_EXAMPLES = 5  # examples kept per drop reason


@dataclass
class ReadStats:
    """What a read saw: counts, drops by reason with examples, replaced bytes, files opened."""

    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    replaced_bytes: int = 0
    files: int = 0

    def drop(self, reason: str, where: str, message: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {message}")


def format_read_stats(stats: ReadStats) -> str:
    """A short human summary: one line of totals, then one line per drop reason."""
    n_dropped = sum(stats.dropped.values())
    line = (
        f"read {stats.records_read:,} records from {stats.files:,} files, "
        f"kept {stats.records_kept:,}, dropped {n_dropped:,}"
    )
    if stats.replaced_bytes:
        line += f", replaced {stats.replaced_bytes:,} undecodable bytes"
    lines = [line]
    for reason in sorted(stats.dropped):
        first = stats.examples.get(reason, [])
        lines.append(f"  {reason}: {stats.dropped[reason]:,}" + (f" (e.g. {first[0]})" if first else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- decoding
_replaced = threading.local()


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError), "registered for decoding only"
    _replaced.n = getattr(_replaced, "n", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error("lmforge.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences with U+FFFD; return (text, bytes replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    _replaced.n = 0
    text = data.decode("utf-8", errors="lmforge.count_replace")
    return text, _replaced.n


def loads_json(text: str | bytes) -> tuple[Any, str | None]:
    """`json.loads`, with every way a record can fail to parse turned into a message:
    (value, None) or (None, "malformed JSON (...)"). Besides syntax errors, json.loads raises
    RecursionError on deeply nested input ("[" * 5000) and a plain ValueError on an integer
    literal over Python's 4300-digit limit; one hostile line must not crash a whole read."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"
    except ValueError as e:
        return None, f"malformed JSON ({e})"


# ----------------------------------------------------------------------------- spec resolution
def iter_documents(
    spec: str | os.PathLike | Iterable[str | os.PathLike],
    text_field: str = "text",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Stream the documents `spec` names (see module docstring); drops are counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    sources = resolve_spec(spec)  # eager: a bad path fails now, not on first next()
    return _iter_sources(sources, text_field, stats)


def resolve_spec(spec: Any) -> list[tuple[str, str]]:
    """Expand a spec into ``(kind, target)`` pairs; kind is builtin/hf/hf_disk/file."""
    if isinstance(spec, (list, tuple)):
        out: list[tuple[str, str]] = []
        for item in spec:
            out.extend(resolve_spec(item))
        if not out:
            raise DataError("empty list of data sources; give at least one path, 'builtin' or 'hf:NAME'")
        return out
    s = os.fspath(spec)
    if s == "builtin":
        return [("builtin", s)]
    if s.startswith("hf:"):
        return [("hf", s[3:])]
    path = Path(s).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"{path}: unsupported file type '{path.suffix}'; "
                f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        return [("file", str(path))]
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            return [("hf_disk", str(path))]
        return _files_or_error(_files_under(path), s)
    if any(ch in s for ch in "*?["):
        files: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(s), recursive=True)):
            p = Path(match)
            files.extend(_files_under(p) if p.is_dir() else [p] if _supported(p) else [])
        return _files_or_error(files, s)
    raise DataError(
        f"{s}: no such file or directory; check the path (relative paths are relative "
        f"to {os.getcwd()}), or use 'builtin' for the built-in corpus or 'hf:NAME' for a "
        f"Hugging Face dataset"
    )


def _supported(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS and not p.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if _supported(p))
    return sorted(found)


def _files_or_error(files: list[Path], spec: str) -> list[tuple[str, str]]:
    if not files:
        raise DataError(
            f"{spec}: matches no supported file; supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return [("file", str(f)) for f in files]


def _is_saved_hf_dataset(folder: Path) -> bool:
    return (
        (folder / "dataset_info.json").is_file()
        or (folder / "state.json").is_file()
        or (folder / "dataset_dict.json").is_file()
    )


# ----------------------------------------------------------------------------- iteration
def _iter_sources(sources: list[tuple[str, str]], text_field: str, stats: ReadStats) -> Iterator[Document]:
    for kind, target in sources:
        if kind == "builtin":
            yield from _iter_builtin(stats)
        elif kind == "hf":
            yield from _iter_records(_hf_records(target), f"hf:{target}", text_field, stats)
        elif kind == "hf_disk":
            yield from _iter_records(_hf_disk_records(target), target, text_field, stats)
        else:
            yield from _iter_file(Path(target), text_field, stats)


def _iter_file(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    stats.files += 1
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _iter_txt(path, stats)
    elif suffix == ".parquet":
        yield from _iter_records(_parquet_records(path, text_field), str(path), text_field, stats)
    else:
        yield from _iter_records(_json_records(path, stats), str(path), text_field, stats)


def _keep(doc: Document, where: str, stats: ReadStats) -> Document | None:
    if not doc.text.strip():
        stats.drop("empty", where, "empty or whitespace-only text")
        return None
    stats.records_kept += 1
    return doc


def _iter_txt(path: Path, stats: ReadStats) -> Iterator[Document]:
    text, bad = decode_utf8(_read_bytes(path))
    stats.replaced_bytes += bad
    stats.records_read += 1
    doc = _keep(Document(text, str(path), {}), str(path), stats)
    if doc is not None:
        yield doc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check permissions") from e


# A record source yields (location, record-or-error); location is "file:line" style, and an
# error is a (reason, message) pair for records that could not even be parsed.
Record = tuple[str, "dict | tuple[str, str]"]


def record_text(rec: Any, text_field: str, where: str, stats: ReadStats) -> str | None:
    """The text field of a JSON/Parquet record, or None after counting why the record is dropped."""
    if not isinstance(rec, dict):
        stats.drop("not_object", where, f"expected a JSON object, got {type(rec).__name__}")
        return None
    text = rec.get(text_field)
    if text is None:
        stats.drop(
            "missing_field", where, f"no '{text_field}' field (has: {', '.join(map(str, rec)) or 'none'})"
        )
        return None
    if not isinstance(text, str):
        stats.drop("non_string_field", where, f"'{text_field}' is {type(text).__name__}, not a string")
        return None
    return text


def _iter_records(
    records: Iterator[Record], source: str, text_field: str, stats: ReadStats
) -> Iterator[Document]:
    for where, rec in records:
        stats.records_read += 1
        if isinstance(rec, tuple):
            stats.drop(rec[0], where, rec[1])
            continue
        text = record_text(rec, text_field, where, stats)
        if text is None:
            continue
        meta = {k: v for k, v in rec.items() if k != text_field}
        meta["location"] = where
        doc = _keep(Document(text, source, meta), where, stats)
        if doc is not None:
            yield doc


def _json_records(path: Path, stats: ReadStats) -> Iterator[Record]:
    """JSON lines; a .json file whose first character is '[' is read as one JSON array."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):
            yield from _json_array_records(path, f.read(), stats)
            return
        for lineno, raw in enumerate(f, start=1):
            line, bad = decode_utf8(raw)
            stats.replaced_bytes += bad
            if not line.strip():
                continue
            rec, err = loads_json(line)
            yield f"{path}:{lineno}", (rec if err is None else ("bad_json", err))


def _json_array_records(path: Path, data: bytes, stats: ReadStats) -> Iterator[Record]:
    text, bad = decode_utf8(data)
    stats.replaced_bytes += bad
    items, err = loads_json(text)
    if err is not None:
        raise DataError(
            f"{path}: {err.replace('malformed JSON', 'malformed JSON array', 1)}; fix the file or "
            f"convert it to JSON lines (one object per line) so bad records are skipped"
        )
    for i, item in enumerate(items):
        yield f"{path}:item {i}", item


def _parquet_records(path: Path, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no column '{text_field}'; it has columns {columns}; pass the right text_field"
        )
    row = 0
    for group in range(pf.num_row_groups):
        try:
            values = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        except pa.ArrowException as e:
            raise DataError(f"{path}: row group {group} is unreadable ({e})") from e
        for value in values:
            where = f"{path}:row {row}"
            yield (
                where,
                ({text_field: value} if value is not None else ("missing_field", f"'{text_field}' is null")),
            )
            row += 1


def _iter_builtin(stats: ReadStats) -> Iterator[Document]:
    for doc in harvest_builtin_corpus():
        stats.records_read += 1
        kept = _keep(doc, doc.source, stats)
        if kept is not None:
            yield kept


# ----------------------------------------------------------------------------- Hugging Face
def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{what}: reading Hugging Face datasets needs the 'datasets' package; "
            f"install it with `pip install datasets` (or `pip install lmforge[hf]`)"
        ) from e
    return datasets


def _hf_records(target: str) -> Iterator[Record]:
    """hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, streamed (downloads lazily, online only)."""
    datasets = _import_datasets(f"hf:{target}")
    parts = target.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"hf:{target}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) == 3 else None),
        (parts[-1] if len(parts) > 1 else "train"),
    )
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, auth, unknown name: all user-fixable
        raise DataError(
            f"hf:{target}: could not load the dataset ({type(e).__name__}: {e}); "
            f"check the name and split and that you are online"
        ) from e
    for i, rec in enumerate(ds):
        yield f"hf:{target}:row {i}", rec


def _hf_disk_records(folder: str) -> Iterator[Record]:
    datasets = _import_datasets(folder)
    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:
        raise DataError(
            f"{folder}: looks like a saved Hugging Face dataset but cannot be loaded "
            f"({type(e).__name__}: {e})"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" not in ds and len(splits) != 1:
            raise DataError(
                f"{folder}: a dataset dict with splits {splits} and no 'train'; "
                f"point at one split's folder instead"
            )
        ds = ds["train" if "train" in ds else splits[0]]
    for i, rec in enumerate(ds):
        yield f"{folder}:row {i}", rec
