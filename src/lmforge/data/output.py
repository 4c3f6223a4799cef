"""Output shards (JSONL or Parquet) and the intermediate files of tasks.

A record is ``{"text", "id", "source", "meta": {...}}`` -- the text under the conventional key
so any HF-style reader works, metadata nested so user fields can never collide with ours. Parquet
shards have the columns text, id, source and meta (a JSON string, so shards written from
different inputs share one schema). Every file is written whole to a temporary name and renamed
(`lmforge.runs.atomic_path`), and shard names are a function of the document order only, so a
rerun after a crash rewrites the same names and never duplicates a shard.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.runs import atomic_path

SHARD_GLOB = "shard-*"


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}.{fmt}"


class ShardWriter:
    """Buffer `shard_docs` records, then write them as one shard atomically."""

    def __init__(self, folder: Path, fmt: str = "jsonl", shard_docs: int = 10_000):
        self.folder, self.fmt, self.shard_docs = Path(folder), fmt, shard_docs
        self.folder.mkdir(parents=True, exist_ok=True)
        self.buffer: list[dict] = []
        self.written: list[str] = []
        self.docs = 0
        self.bytes = 0

    def write(self, record: dict) -> None:
        self.buffer.append(record)
        self.docs += 1
        self.bytes += len(record["text"].encode("utf-8", errors="surrogatepass"))
        if len(self.buffer) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = shard_name(len(self.written), self.fmt)
        path = self.folder / name
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table(
                {
                    "text": [r["text"] for r in self.buffer],
                    "id": [str(r.get("id", "")) for r in self.buffer],
                    "source": [str(r.get("source", "")) for r in self.buffer],
                    "meta": [
                        json.dumps(r.get("meta", {}), ensure_ascii=False, default=str) for r in self.buffer
                    ],
                }
            )
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp, compression="zstd")
        else:
            with atomic_path(path) as tmp:
                with open(tmp, "w", encoding="utf-8", errors="surrogatepass") as f:
                    for r in self.buffer:
                        f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        self.written.append(name)
        self.buffer = []

    def close(self) -> list[str]:
        """Flush, delete stale shards of an earlier (crashed or different) run, return names."""
        self.flush()
        keep = set(self.written)
        for p in self.folder.glob(SHARD_GLOB):
            if p.name not in keep:
                p.unlink()
        return self.written


def list_shards(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(folder).glob(SHARD_GLOB)
        if p.suffix in (".jsonl", ".parquet") and not p.name.startswith(".")
    )


def iter_records(folder: Path) -> Iterator[dict]:
    for path in list_shards(folder):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            for g in range(pf.num_row_groups):
                for row in pf.read_row_group(g).to_pylist():
                    row["meta"] = json.loads(row.get("meta") or "{}")
                    yield row
        else:
            with open(path, encoding="utf-8", errors="surrogatepass") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)


# ----------------------------------------------------------------------------- intermediate files
def write_jsonl_zst(path: Path, records) -> int:
    """Write records as zstd-compressed JSON lines, atomically; returns the count."""
    import zstandard

    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as z:
                buf = io.TextIOWrapper(z, encoding="utf-8", errors="surrogatepass", write_through=True)
                for r in records:
                    buf.write(json.dumps(r, ensure_ascii=False) + "\n")
                    n += 1
                buf.flush()
                buf.detach()
    return n


def read_jsonl_zst(path: Path) -> Iterator[dict]:
    import zstandard

    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(
            zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", errors="surrogatepass"
        )
        for line in reader:
            if line.strip():
                yield json.loads(line)
