"""Verified artifacts: every file a stage wrote, recorded with size and hash, checked when read.

When a stage completes, `record_artifacts` lists every file in its folder (model weights, token
shards, the tokenizer, cached reference log-probs, reports...) with its size, modification time
and sha256, and the pipeline stores that in the stage's manifest under ``artifacts``. Readers
call `verify_stage` (a stage's whole output: the pipeline does it for a stage's inputs and
before skipping a finished stage) or `verify_path` (a folder or file inside some stage's output,
for loaders that take a path: model folders, tokenizers, shards). A file whose size or hash
differs raises `ArtifactError` naming the file and the stage to re-run; `lmforge run` re-runs it.

Hashing gigabytes on every read would be slow, so there is a fast path, as in git's index: a
file whose size and mtime (nanoseconds) equal the recorded ones is taken as unchanged, provided
that mtime is older than the moment of recording by more than the file system's timestamp
granularity (`RACY_NS`). A file written just before it was recorded is "racily clean" (a later
write within the same timestamp tick would not change its mtime), so it is hashed; once hashed
and found intact, its (size, mtime, hash) goes into ``<stage>/.verified.json`` so the next read
takes the fast path. That cache is best effort: on a read-only run directory reads just hash.

Not recorded: ``manifest.json`` itself, hidden files (temporaries, the lock, the cache) and
``checkpoints/``, which carry their own checksums and are pruned while a stage runs.

`content_digest` condenses a finished stage's recorded hashes into one identity of what it
produced; the pipeline puts it into the fingerprint of every stage that reads that stage, so a
stage re-run upstream that wrote other bytes (a damaged file re-made, a non-deterministic GPU
run) re-runs what was made from the old ones, and one that wrote the same bytes does not. Run
records (`RUN_RECORDS`: training logs with throughput, reports, the data stage's timings,
eval's results with their timings and machine) are left out of it: they differ on every run and
no stage is made from them (the report shows them), so identical runs keep equal fingerprints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .errors import ArtifactError, StorageError
from .runs import MANIFEST, atomic_write_json, file_sha256, fingerprint, read_manifest

RACY_NS = 2_000_000_000  # mtime granularity allowance (ext4/xfs: a few ms; FAT: 2 s)
CACHE_FILE = ".verified.json"
SKIP_DIRS = ("checkpoints",)
# files that record how a run went (per-step timings, throughput, reports), not what it made
RUN_RECORDS = frozenset(
    {"metrics.jsonl", "done.json", "funnel.json", "report.md", "report.html", "results.json"}
)


def _recorded(rel: str) -> bool:
    parts = Path(rel).parts
    return not (rel == MANIFEST or any(p.startswith(".") for p in parts) or parts[0] in SKIP_DIRS)


def record_artifacts(stage_dir: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {size, mtime_ns, sha256}} for every file the stage left in its folder."""
    root = Path(stage_dir)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not _recorded(rel) or not p.is_file():
                continue
            st = p.stat()
            out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(p)}
    return out


def content_digest(manifest: dict) -> str:
    """One hash of the recorded files of a stage (its run records aside; see module docstring):
    equal for two runs that produced the same bytes."""
    files = manifest.get("artifacts") or {}
    items = sorted(
        (rel, e["sha256"])
        for rel, e in files.items()
        if isinstance(e, dict) and "sha256" in e and Path(rel).name not in RUN_RECORDS
    )
    return fingerprint(items)


def _load_cache(stage_dir: Path) -> dict:
    try:
        cache = json.loads((stage_dir / CACHE_FILE).read_text(encoding="utf-8"))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _fast_ok(entry: dict, st: os.stat_result, cached: list | None, recorded_ns: int) -> bool:
    """Unchanged by size and mtime alone, with no racy timestamp (see module docstring)."""
    if st.st_size != entry["size"]:
        return False
    if st.st_mtime_ns == entry.get("mtime_ns") and st.st_mtime_ns < recorded_ns - RACY_NS:
        return True
    if isinstance(cached, list) and len(cached) == 4:
        size, mtime_ns, sha, checked_ns = cached
        return (size, mtime_ns, sha) == (
            st.st_size,
            st.st_mtime_ns,
            entry["sha256"],
        ) and mtime_ns < checked_ns - RACY_NS
    return False


def _mismatch(path: Path, stage: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: {what} since stage '{stage}' wrote it (changed or damaged on disk); "
        f"re-run that stage: `lmforge {stage} --force`, or `lmforge run`, which re-runs it",
        stage=stage,
    )


def verify_stage(
    stage_dir: str | os.PathLike, manifest: dict | None = None, *, under: str | None = None
) -> int:
    """Check the recorded files of a finished stage (those below `under`, a path relative to
    the stage folder, when given); return how many were hashed. Raises `ArtifactError`."""
    root = Path(stage_dir)
    manifest = manifest if manifest is not None else read_manifest(root) or {}
    files = manifest.get("artifacts") or {}
    stage = str(manifest.get("stage") or root.name)
    recorded_ns = int(manifest.get("artifacts_recorded_ns") or 0)
    prefix = "" if under in (None, "", ".") else Path(under).as_posix().rstrip("/") + "/"
    cache = _load_cache(root)
    hashed, fresh = 0, {}
    for rel, entry in files.items():
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue  # a manifest from before artifacts were recorded
        if prefix and not (rel + "/").startswith(prefix) and rel != prefix.rstrip("/"):
            continue
        p = root / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            raise _mismatch(p, stage, "missing") from None
        if st.st_size != entry["size"]:
            raise _mismatch(p, stage, f"{st.st_size:,} bytes instead of {entry['size']:,}")
        if _fast_ok(entry, st, cache.get(rel), recorded_ns):
            continue
        hashed += 1
        if file_sha256(p) != entry["sha256"]:
            raise _mismatch(p, stage, "content (sha256) differs")
        fresh[rel] = [st.st_size, st.st_mtime_ns, entry["sha256"], time.time_ns()]
    if fresh:
        with contextlib.suppress(OSError, StorageError):
            atomic_write_json(root / CACHE_FILE, {**cache, **fresh})
    return hashed


def owning_stage(path: str | os.PathLike, levels: int = 3) -> tuple[Path, dict, str] | None:
    """(stage folder, its manifest, `path` relative to it) when `path` lies inside the output of
    a completed stage that recorded its artifacts; None for a user's own folder or file."""
    p = Path(path).absolute()
    for parent in [p, *p.parents][: levels + 1]:
        if (parent / MANIFEST).is_file():
            m = read_manifest(parent)
            if m and m.get("status") == "complete" and m.get("artifacts"):
                return parent, m, p.relative_to(parent).as_posix()
            return None
    return None


def verify_path(path: str | os.PathLike) -> int:
    """Verify a folder or file read from a run directory (no-op outside one); see `verify_stage`."""
    found = owning_stage(path)
    if found is None:
        return 0
    root, manifest, rel = found
    return verify_stage(root, manifest, under=rel)
