"""Run directories, manifests and atomic file writes.

A run directory is the ledger of one experiment::

    runs/<name>/
      pipeline.yaml            the resolved pipeline config of the last `lmforge run`
      <stage>/                 everything the stage produced
        manifest.json          stage, resolved config, input fingerprints, metrics, timings, status

A stage is *complete* when its manifest says ``status: "complete"`` and its fingerprint (a hash
of the stage's resolved config plus, for each stage it reads from, that stage's fingerprint and
the digest of the files it wrote) equals the one the pipeline computes now. Complete stages are skipped; anything else is (re)run, and the
stage itself decides how to resume (pretraining restores its last checkpoint).

Every file that another step reads is written atomically: to a temporary file in the same
directory, fsynced, then `os.replace`d over the target, so a crash leaves either the old file
or the new one and never half of one. A temporary file orphaned by a SIGKILL is swept when its
stage is resumed (`remove_stale_temps`).

A command that writes to a run directory holds its lock (`runlock.run_lock`).

Storage faults (disk full, quota, file-size limit, read-only file system) surface as
`StorageError` naming the file being written, raised by this write layer (through
`errors.translate_storage_errors`), so no stage has to handle OSError itself; the previous
version of the file is untouched.

`fault_point(name)` marks the moments a crash is most harmful (a temporary file complete but
not yet renamed, a checkpoint folder assembled but not yet in place). It does nothing unless
the environment variable ``LMFORGE_FAULT`` names the point, in which case the process
SIGKILLs itself there: the crash harness (`benchmarks/crash_harness.py`) and the fault tests
use it to hit those windows deterministically instead of hoping a random kill lands in them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import StorageError, storage_error, translate_storage_errors

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


FAULT_ENV = "LMFORGE_FAULT"
FAULT_TRACE_ENV = "LMFORGE_FAULT_TRACE"
_fault_hits = 0


def fault_point(name: str, path: str | os.PathLike | None = None) -> None:
    """SIGKILL this process here if ``$LMFORGE_FAULT`` matches `name` (testing hook).

    ``LMFORGE_FAULT=PATTERN[@N]``: an fnmatch pattern over point names and the 1-based hit to
    die on (default the first). Point names: ``atomic:<file name>`` (temporary file written and
    closed, target not yet replaced), ``tokens:<split>.bin`` (after each batch of a token shard),
    ``checkpoint:<step>:weights`` / ``:assembled`` / ``:renamed`` (see `train.checkpoint`).
    ``LMFORGE_FAULT_TRACE=FILE`` appends every point passed, with `path`, to FILE (the crash
    harness records a reference run's points this way and then picks where to kill).
    Unset (always, outside tests and the crash harness), it costs two dictionary lookups.
    """
    trace = os.environ.get(FAULT_TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{name}\t{os.fspath(path) if path is not None else ''}\n")
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("@")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    global _fault_hits
    _fault_hits += 1
    if _fault_hits >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files and folders that a killed writer left under `directory`.

    Only names this module and `train.checkpoint` create are touched: ``.<name>.<random>.tmp``
    files from `atomic_path` and ``.step_<n>.tmp*`` checkpoint folders. Call it only when no
    writer is running in `directory` (the pipeline does, before resuming a stage).
    """
    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob(".*.tmp*")):
        name = p.name
        if p.is_file() and name.endswith(".tmp") and name.count(".") >= 3:
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.is_dir() and name.startswith(".step_") and ".tmp" in name:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    Use for writers that want a file name (safetensors, numpy, pyarrow). On error the
    temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    with translate_storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fault_point(f"atomic:{path.name}", path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        err = storage_error(e, path)
        if err is not None:
            raise err from e
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


# The stages whose `model/` folder holds a policy (a causal LM that later stages fine-tune,
# evaluate, sample or serve), in pipeline order. The reward model is not one.
POLICY_STAGES = ("pretrain", "cpt", "sft", "align", "rl")


def run_relative(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """`path` as an artifact records it: relative to the run directory when it lies inside it
    (a run directory holds no absolute path, so identical runs in two places write identical
    files and a run directory can be moved), else absolute. Read it back with `run_dir / path`."""
    p, root = Path(path).absolute(), Path(run_dir).absolute()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)


def policy_model_dir(run_dir: str | os.PathLike, among: tuple[str, ...] = POLICY_STAGES) -> Path | None:
    """The model folder of the last completed stage of `among` (policy stages, in pipeline
    order) that holds one, or None."""
    for name in reversed(among):
        d = Path(run_dir) / name
        m = read_manifest(d)
        if m and m.get("status") == "complete" and (d / "model" / "config.json").is_file():
            return d / "model"
    return None


class StageRecord:
    """Collects what a running stage reports and writes its manifest.

    >>> rec = StageRecord(stage_dir, "pretrain", config_dict, fingerprint="ab12", inputs={...})
    >>> rec.metrics["val_loss"] = 3.1
    >>> rec.complete()              # writes manifest.json with status "complete"

    A manifest with status "running" is written at start, so an interrupted stage is visible as
    such; `fail(msg)` records the error.
    """

    def __init__(
        self,
        stage_dir: str | os.PathLike,
        stage: str,
        config: dict,
        *,
        fingerprint: str,
        inputs: dict[str, str] | None = None,
        write: bool = True,
    ):
        self.write = write  # False on non-zero ranks of a distributed stage
        self.dir = Path(stage_dir)
        with translate_storage_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.config = config
        self.fingerprint = fingerprint
        self.inputs = dict(inputs or {})
        self.metrics: dict[str, Any] = {}
        self.artifacts: dict[str, dict] = {}  # relative path -> {size, mtime_ns, sha256}
        self.artifacts_recorded_ns: int | None = None
        self.time_estimate: dict | None = None  # a training stage's estimate, before it starts
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
            **({"artifacts_recorded_ns": self.artifacts_recorded_ns} if self.artifacts_recorded_ns else {}),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(now - self.started, 3),
        }
        if self.time_estimate is not None:  # with the measured time, once there is one
            manifest["time_estimate"] = {
                **self.time_estimate,
                **({"measured_seconds": manifest["seconds"]} if status == "complete" else {}),
            }
        if error:
            manifest["error"] = error
        atomic_write_json(self.dir / MANIFEST, manifest)

    def complete(self, artifacts: dict[str, dict] | None = None) -> None:
        """Mark the stage complete, recording `artifacts` (see `lmforge.artifacts`)."""
        if artifacts is not None:
            self.artifacts, self.artifacts_recorded_ns = artifacts, time.time_ns()
        self._write("complete")

    def fail(self, error: str) -> None:
        """Record the failure; best effort, so that on a full or read-only disk the original
        error reaches the user (the manifest then still says "running", which resumes too)."""
        with contextlib.suppress(OSError, StorageError):
            self._write("failed", error)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (metrics logs). Appends of one short line are effectively atomic;
    a torn last line from a crash is tolerated by `read_jsonl`."""
    with translate_storage_errors(path), open(path, "a", encoding="utf-8") as f:
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
