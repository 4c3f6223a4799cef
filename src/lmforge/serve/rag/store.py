"""The vector store: one SQLite file (`index.db`) with documents, chunks and their vectors.

Vectors live in a `vec0` virtual table of the sqlite-vec extension (cosine distance, exact
k-nearest-neighbour search in C), loaded through `apsw` because Python's own `sqlite3` module is
often built without extension loading. Without apsw or sqlite-vec the same file layout works with
the standard library: vectors are kept as BLOBs in the `chunks` table and searched with numpy
(brute force, fine up to ~10^5 chunks). The backend is recorded, and an index written by either
can be read by either (the BLOB column is always written).

Tables: `meta(key, value)` holds the embedder name and dimension (a query with another embedder
is refused); `documents(id, source, sha256, n_chunks, added_at)`; `chunks(id, doc_id, ord, text,
embedding)`. Adding a document whose source exists replaces it (incremental re-index); deleting
removes its chunks and vectors in one transaction.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embed import RagError

DB_NAME = "index.db"
SCHEMA_VERSION = "1"


@dataclass
class Hit:
    text: str
    source: str
    chunk: int
    score: float  # cosine similarity
    chunk_id: int

    def citation(self, snippet: int = 240) -> dict:
        t = self.text if len(self.text) <= snippet else self.text[:snippet].rsplit(" ", 1)[0] + " ..."
        return {"source": self.source, "chunk": self.chunk, "score": round(self.score, 4), "text": t}


def _connect(path: Path, want_vec: bool) -> tuple[Any, bool]:
    """(connection, has_vec). apsw + sqlite-vec when installed, else stdlib sqlite3."""
    if want_vec:
        try:
            import apsw
            import sqlite_vec

            conn: Any = apsw.Connection(str(path))  # apsw or sqlite3: the same calls are used
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            return conn, True
        except ImportError:
            pass
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    return conn, False


class VectorStore:
    def __init__(
        self,
        folder: str | Path,
        *,
        create: bool = False,
        embedder_name: str | None = None,
        dim: int | None = None,
        use_vec: bool = True,
    ):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        if not self.path.exists():
            if not create:
                raise RagError(
                    f"{self.folder}: no retrieval index here (no {DB_NAME}); build one with "
                    f"`lmforge rag index {self.folder} DOCS...`"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
        self.conn, self.vec = _connect(self.path, use_vec)
        self._x("PRAGMA journal_mode=WAL")
        self._x("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
        meta = self.meta()
        if not meta:
            if embedder_name is None or dim is None:
                raise RagError(f"{self.path}: empty index without an embedder")
            self._x(
                "CREATE TABLE documents(id INTEGER PRIMARY KEY, source TEXT UNIQUE, sha256 TEXT, "
                "n_chunks INTEGER, added_at REAL)"
            )
            self._x(
                "CREATE TABLE chunks(id INTEGER PRIMARY KEY, doc_id INTEGER, ord INTEGER, text TEXT, "
                "embedding BLOB)"
            )
            self._x("CREATE INDEX chunks_doc ON chunks(doc_id)")
            for k, v in (
                ("schema", SCHEMA_VERSION),
                ("embedder", embedder_name),
                ("dim", str(dim)),
                ("created_at", str(time.time())),
            ):
                self._x("INSERT INTO meta VALUES (?, ?)", (k, v))
            meta = self.meta()
        elif embedder_name is not None and meta.get("embedder") != embedder_name:
            raise RagError(
                f"{self.folder}: this index was built with embedder {meta.get('embedder')!r}, "
                f"not {embedder_name!r}; vectors from different models cannot be compared. Use "
                f"the same --embedder, or build a new index in another folder"
            )
        self.embedder_name, self.dim = meta["embedder"], int(meta["dim"])
        if self.vec:
            self._x(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS vecs USING vec0(id INTEGER PRIMARY KEY, "
                f"embedding float[{self.dim}] distance_metric=cosine)"
            )
            n_chunks = self._one("SELECT count(*) FROM chunks")
            n_vecs = self._one("SELECT count(*) FROM vecs")
            if n_vecs != n_chunks:  # written by the numpy backend: rebuild the vector table
                self._x("DELETE FROM vecs")
                for cid, blob in self._x("SELECT id, embedding FROM chunks").fetchall():
                    self._x("INSERT INTO vecs(id, embedding) VALUES (?, ?)", (cid, blob))
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    # -- sqlite helpers
    def _x(self, sql: str, args=()):
        return self.conn.execute(sql, args)

    def _one(self, sql: str, args=()):
        row = self._x(sql, args).fetchone()
        return row[0] if row else None

    def _begin(self):
        self._x("BEGIN IMMEDIATE")

    def meta(self) -> dict:
        return dict(self._x("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        self.conn.close()

    # -- documents
    def document_sha(self, source: str) -> str | None:
        return self._one("SELECT sha256 FROM documents WHERE source = ?", (source,))

    def sources(self) -> list[str]:
        return [r[0] for r in self._x("SELECT source FROM documents ORDER BY id").fetchall()]

    def add_document(self, source: str, sha256: str, chunks: list[str], vectors: np.ndarray) -> int:
        """Insert (or replace) one document with its chunks; returns its number of chunks."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.dim):
            raise RagError(
                f"{source}: got vectors of shape {vectors.shape}, index expects ({len(chunks)}, {self.dim})"
            )
        self._begin()
        try:
            self._delete(source)
            self._x(
                "INSERT INTO documents(source, sha256, n_chunks, added_at) VALUES (?, ?, ?, ?)",
                (source, sha256, len(chunks), time.time()),
            )
            doc_id = self._one("SELECT last_insert_rowid()")
            for i, (text, v) in enumerate(zip(chunks, vectors)):
                blob = v.tobytes()
                self._x(
                    "INSERT INTO chunks(doc_id, ord, text, embedding) VALUES (?, ?, ?, ?)",
                    (doc_id, i, text, blob),
                )
                if self.vec:
                    cid = self._one("SELECT last_insert_rowid()")
                    self._x("INSERT INTO vecs(id, embedding) VALUES (?, ?)", (cid, blob))
            self._x("COMMIT")
        except BaseException:
            self._x("ROLLBACK")
            raise
        self._cache = None
        return len(chunks)

    def _delete(self, source: str) -> int:
        doc = self._one("SELECT id FROM documents WHERE source = ?", (source,))
        if doc is None:
            return 0
        n = self._one("SELECT count(*) FROM chunks WHERE doc_id = ?", (doc,))
        if self.vec:
            self._x("DELETE FROM vecs WHERE id IN (SELECT id FROM chunks WHERE doc_id = ?)", (doc,))
        self._x("DELETE FROM chunks WHERE doc_id = ?", (doc,))
        self._x("DELETE FROM documents WHERE id = ?", (doc,))
        return n

    def delete_document(self, source: str) -> int:
        """Remove a document and its chunks; returns the number of chunks removed (0: unknown)."""
        self._begin()
        try:
            n = self._delete(source)
            self._x("COMMIT")
        except BaseException:
            self._x("ROLLBACK")
            raise
        self._cache = None
        return n

    def stats(self) -> dict:
        return {
            "documents": self._one("SELECT count(*) FROM documents"),
            "chunks": self._one("SELECT count(*) FROM chunks"),
            "embedder": self.embedder_name,
            "dim": self.dim,
            "backend": "sqlite-vec" if self.vec else "sqlite+numpy",
            "path": str(self.path),
        }

    # -- search
    def search(self, vector: np.ndarray, k: int = 4) -> list[Hit]:
        v = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise RagError(
                f"query vector has dimension {v.shape[0]}, the index {self.dim}: the index was "
                f"built with another embedder ({self.embedder_name})"
            )
        if self.vec:
            rows = self._x(
                "SELECT id, distance FROM vecs WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                (v.tobytes(), int(k)),
            ).fetchall()
            scored = [(int(cid), 1.0 - float(d)) for cid, d in rows]
        else:
            ids, mat = self._matrix()
            if not len(ids):
                return []
            sims = mat @ v
            top = np.argsort(-sims, kind="stable")[:k]
            scored = [(int(ids[j]), float(sims[j])) for j in top]
        hits = []
        for cid, score in scored:
            row = self._x(
                "SELECT c.text, d.source, c.ord FROM chunks c JOIN documents d ON d.id = c.doc_id "
                "WHERE c.id = ?",
                (cid,),
            ).fetchone()
            if row:
                hits.append(Hit(text=row[0], source=row[1], chunk=int(row[2]), score=score, chunk_id=cid))
        return hits

    def _matrix(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            rows = self._x("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = (
                np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                if rows
                else np.zeros((0, self.dim), np.float32)
            )
            self._cache = (ids, mat)
        return self._cache
