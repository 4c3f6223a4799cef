"""`lmforge rag index`: read documents, chunk, embed, store; incremental by content hash.

Inputs are what the data stage reads: .txt / .jsonl / .json / .parquet through
`lmforge.data.readers.iter_documents` (a JSONL line is one document, `--text-field` picks the
field), and .html / .htm pages, whose main text is extracted with trafilatura. Each document
is keyed by its source: the file's canonical path (absolute, symlinks resolved, so indexing a
folder as `/abs/docs` and again as `.` finds the same documents), with `#n` for the n-th record
of a JSONL/JSON/Parquet file. A document whose text hash is unchanged is skipped, a changed one
is replaced, and `--prune` deletes documents from files under the given inputs that are no
longer there (a document still stored under a path as typed by an older index is replaced by
its canonical key). A `.txt` file that is not UTF-8 text (NUL bytes, invalid UTF-8) is refused with
its reason rather than indexed as garbage: named on its own it is an error, inside a folder it
is skipped and listed under `skipped`.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...data.readers import SUPPORTED_EXTENSIONS, iter_documents
from ...errors import DataError
from .chunk import chunk_text
from .embed import RagError
from .store import VectorStore

HTML_EXT = (".html", ".htm", ".xhtml")


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0
    skipped: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "chunks_written": self.chunks,
            "skipped": self.skipped,
            **({"refused": self.refused} if self.refused else {}),
        }

    def skip(self, reason: str, source: str | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if source is not None:
            self.refused.append({"source": source, "reason": reason})


def _html_text(path: Path) -> str:
    try:
        import trafilatura
    except ImportError:
        raise RagError("indexing HTML needs trafilatura (pip install trafilatura)") from None
    raw = path.read_bytes()
    text = trafilatura.extract(
        raw.decode("utf-8", errors="replace"), include_comments=False, include_tables=True, favor_recall=True
    )
    return text or ""


def binary_reason(path: Path, probe: int = 1 << 16) -> str | None:
    """Why `path` is not text (NUL bytes, or not UTF-8), or None when it decodes as UTF-8 text."""
    raw = path.read_bytes()
    if b"\x00" in raw[:probe]:
        return "binary file (contains NUL bytes), not text"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (invalid byte at offset {e.start})"
    return None


def _files_of(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if p.is_file():
        return [p]
    files = [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
    if not files:
        raise DataError(f"{spec}: no such file or folder, and no file matches it as a glob")
    return files


def iter_inputs(
    specs: Iterable[str], text_field: str = "text", report: IndexReport | None = None
) -> Iterator[tuple[str, str]]:
    """(source, text) for every document under `specs` (files, folders, globs), keyed by canonical
    path. Files of other types inside a folder are skipped; a file named explicitly must be of a
    supported type. Binary `.txt` files are skipped with their reason in `report` (an error when
    named explicitly)."""
    for spec in specs:
        explicit = Path(spec).is_file()
        for f in _files_of(spec):
            suffix, source = f.suffix.lower(), str(f.resolve())
            if suffix in HTML_EXT:
                yield source, _html_text(f)
            elif suffix == ".txt":
                why = binary_reason(f)
                if why is None:
                    yield source, "\n\n".join(d.text for d in iter_documents(str(f), text_field=text_field))
                elif explicit:
                    raise DataError(f"{f}: {why}; index text files only (convert it to UTF-8 text first)")
                elif report is not None:
                    report.skip(why, source)
            elif suffix in SUPPORTED_EXTENSIONS:  # one document per record, keyed by its position
                for n, d in enumerate(iter_documents(str(f), text_field=text_field)):
                    yield f"{source}#{n}", d.text
            elif explicit:
                raise DataError(
                    f"{f}: unsupported file type {suffix!r}; index .txt, .jsonl, .json, .parquet "
                    f"or .html files"
                )


def canonical_source(source: str) -> str:
    """How a source is keyed: the canonical path of its file, then `#n` for a record."""
    path, sep, rec = source.partition("#")
    return os.path.realpath(path) + sep + rec


def build_index(
    folder: str | Path,
    inputs: list[str],
    *,
    embedder,
    max_words: int = 120,
    overlap: int = 20,
    text_field: str = "text",
    prune: bool = False,
    progress=None,
) -> tuple[IndexReport, dict]:
    store = VectorStore(folder, create=True, embedder_name=embedder.name, dim=embedder.dim)
    report = IndexReport()
    seen = set()
    try:
        for source, text in iter_inputs(inputs, text_field, report):
            seen.add(source)
            if not text.strip():
                report.skip("empty")
                continue
            sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
            old = store.document_sha(source)
            if old == sha:
                report.unchanged += 1
                continue
            chunks = chunk_text(text, max_words, overlap)
            vectors = embedder.embed(chunks)
            report.chunks += store.add_document(source, sha, chunks, vectors)
            if old is None:
                report.added += 1
            else:
                report.updated += 1
            if progress:
                progress(source, len(chunks))
        for source in store.sources():  # keys of an index built before sources were canonical
            if source not in seen and canonical_source(source) in seen:
                store.delete_document(source)
                report.deleted += 1
        if prune:
            roots = [os.path.realpath(s) for s in inputs]
            for source in store.sources():
                path = os.path.realpath(source.split("#", 1)[0])
                under = any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
                if under and source not in seen:
                    store.delete_document(source)
                    report.deleted += 1
        return report, store.stats()
    finally:
        store.close()
