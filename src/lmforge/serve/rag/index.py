"""`lmforge rag index`: read documents, chunk, embed, store; incremental by content hash.

Inputs are what the data stage reads: .txt / .jsonl / .json / .parquet through
`lmforge.data.readers.iter_documents` (a JSONL line is one document, `--text-field` picks the
field), and .html / .htm pages, whose main text is extracted with trafilatura. Each document
is keyed by its source (`file` for whole files, `file:line` for JSONL records); a document whose
text hash is unchanged is skipped, a changed one is replaced, and `--prune` deletes documents
from files under the given inputs that are no longer there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    def as_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "chunks_written": self.chunks,
            "skipped": self.skipped,
        }


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


def iter_inputs(specs: Iterable[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(source, text) for every document under `specs` (files, folders, globs). Files of other
    types inside a folder are skipped; a file named explicitly must be of a supported type."""
    from ...data.readers import SUPPORTED_EXTENSIONS, iter_documents

    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files = [p]
        else:
            import glob

            files = [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
            if not files:
                raise DataError(f"{spec}: no such file or folder, and no file matches it as a glob")
        for f in files:
            suffix = f.suffix.lower()
            if suffix in HTML_EXT:
                yield str(f), _html_text(f)
            elif suffix in SUPPORTED_EXTENSIONS:
                docs = iter_documents(str(f), text_field=text_field)
                if suffix == ".txt":
                    yield str(f), "\n\n".join(d.text for d in docs)
                else:  # one document per record, keyed by its position
                    for n, d in enumerate(docs):
                        yield f"{f}#{n}", d.text
            elif p.is_file():
                raise DataError(
                    f"{f}: unsupported file type {suffix!r}; index .txt, .jsonl, .json, .parquet "
                    f"or .html files"
                )


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
        for source, text in iter_inputs(inputs, text_field):
            seen.add(source)
            if not text.strip():
                report.skipped["empty"] = report.skipped.get("empty", 0) + 1
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
        if prune:
            roots = [os.path.abspath(s) for s in inputs]
            for source in store.sources():
                path = os.path.abspath(source.split("#", 1)[0])
                under = any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
                if under and source not in seen:
                    store.delete_document(source)
                    report.deleted += 1
        return report, store.stats()
    finally:
        store.close()
