"""Run directories, manifests and atomic file writes.

A run directory is the ledger of one experiment::

    runs/<name>/
      pipeline.yaml            the resolved pipeline config of the last `lmforge run`
      <stage>/                 everything the stage produced
        manifest.json          stage, resolved config, input fingerprints, metrics, timings, status

A stage is *complete* when its manifest says ``status: "complete"`` and its fingerprint (a hash
of the stage's resolved config plus the fingerprints of the stages it reads from) equals the
one the pipeline computes now. Complete stages are skipped; anything else is (re)run, and the
stage itself decides how to resume (pretraining restores its last checkpoint).

Every file that another step reads is written atomically: to a temporary file in the same
directory, fsynced, then `os.replace`d over the target, so a crash leaves either the old file
or the new one and never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    Use for writers that want a file name (safetensors, numpy, pyarrow). On error the
    temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ----------------------------------------------------------------------------- hashing
def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable object (configs, lists of input hashes)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifests
def read_manifest(stage_dir: str | os.PathLike) -> dict | None:
    """The stage's manifest, or None when it is absent or unreadable (treated as not run)."""
    p = Path(stage_dir) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_complete(stage_dir: str | os.PathLike, fp: str | None = None) -> bool:
    m = read_manifest(stage_dir)
    if not m or m.get("status") != "complete":
        return False
    return fp is None or m.get("fingerprint") == fp


class StageRecord:
    """Collects what a running stage reports and writes its manifest.

    >>> rec = StageRecord(stage_dir, "pretrain", config_dict, fingerprint="ab12", inputs={...})
    >>> rec.metrics["val_loss"] = 3.1
    >>> rec.complete()              # writes manifest.json with status "complete"

    A manifest with status "running" is written at start, so an interrupted stage is visible as
    such; `fail(msg)` records the error.
    """

    def __init__(self, stage_dir: str | os.PathLike, stage: str, config: dict, *,
                 fingerprint: str, inputs: dict[str, str] | None = None, write: bool = True):
        self.write = write  # False on non-zero ranks of a distributed stage
        self.dir = Path(stage_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.config = config
        self.fingerprint = fingerprint
        self.inputs = dict(inputs or {})
        self.metrics: dict[str, Any] = {}
        self.artifacts: dict[str, str] = {}
        self.started = time.time()
        self._write("running")

    def _write(self, status: str, error: str | None = None) -> None:
        if not self.write:
            return
        now = time.time()
        manifest = {
            "stage": self.stage,
            "status": status,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "config": self.config,
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(now - self.started, 3),
        }
        if error:
            manifest["error"] = error
        atomic_write_json(self.dir / MANIFEST, manifest)

    def complete(self) -> None:
        self._write("complete")

    def fail(self, error: str) -> None:
        self._write("failed", error)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (metrics logs). Appends of one short line are effectively atomic;
    a torn last line from a crash is tolerated by `read_jsonl`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # torn final line after a crash
    except FileNotFoundError:
        pass
    return out
