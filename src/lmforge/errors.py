"""Errors a user can cause and fix.

Anything raised as an `LMForgeError` is printed by the CLI as one line (no traceback) and the
process exits with status 2. The message must name the file / line / config key at fault and
say what to do about it. Internal bugs stay ordinary exceptions so their tracebacks survive.

Storage faults (disk full, quota, file-size limit, read-only file system) are recognised here
(`storage_error`, `translate_storage_errors`) rather than in the write layer, so that every
ground-floor module that writes (`runs`, `runlock`) can turn an OSError into a `StorageError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path


class LMForgeError(Exception):
    """Base class of user-facing errors."""


class ConfigError(LMForgeError):
    """A config file or override is wrong (unknown key, wrong type, impossible value)."""


class DataError(LMForgeError):
    """Input data is missing, empty or unreadable."""


class CheckpointError(LMForgeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


class StorageError(LMForgeError):
    """The disk is full, a file size or quota limit was hit, or the run directory is read-only.

    Raised by the write layer (`lmforge.runs`, via `translate_storage_errors`) with the path being written, so the user sees
    "disk full ... while writing runs/x/pretrain/checkpoints/..." instead of an OSError from
    deep inside safetensors or numpy. Writes are atomic, so the previous file is intact.
    """


class RunLockedError(LMForgeError):
    """Another live process is writing to the same run directory (see `runlock.run_lock`)."""


class ArtifactError(LMForgeError):
    """A file a finished stage wrote no longer matches the size and hash in its manifest.

    `stage` names the stage whose output is damaged, so `lmforge run` can re-run it and a
    single-stage command can tell the user which one to re-run."""

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message)
        self.stage = stage


# ----------------------------------------------------------------------------- storage faults
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


_ERRNO_TEXT = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "file too large": errno.EFBIG,
    "read-only file system": errno.EROFS,
}


def _storage_oserror(exc: BaseException | None) -> OSError | None:
    """The storage OSError behind `exc`: itself, one in its cause/context chain (torch.save
    to a file object wraps it in a RuntimeError), or one named in the message of a library
    that does its own I/O (safetensors: "... (os error 28)", arrow: "No space left on device")."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        text = str(exc)
        m = re.search(r"\(os error (\d+)\)", text)
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        low = text.lower()
        for phrase, code in _ERRNO_TEXT.items():
            if phrase in low:
                return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def storage_error(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """The user-facing error for a failure while writing `path`, or None when `exc` is not a
    storage fault (it is then re-raised unchanged: a bug or a different problem).

    Permission errors count only when they concern `path` (or its temporary file / folder),
    so a write helper does not relabel an unrelated EACCES raised inside its body.
    """
    if isinstance(exc, StorageError):
        return None
    err = _storage_oserror(exc)
    if err is None or err.errno not in _NO_SPACE + _READ_ONLY:
        return None
    path = Path(path)
    if err.errno in (errno.EACCES, errno.EPERM) and err.filename is not None:
        f = Path(os.fsdecode(err.filename))
        if f != path and f.parent != path.parent and f != path.parent:
            return None
    if err.errno == errno.ENOSPC:
        what = "disk full (no space left on device)"
    elif err.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    elif err.errno == errno.EFBIG:
        what = "file size limit exceeded (ulimit -f / RLIMIT_FSIZE, or the file system's maximum)"
    elif err.errno == errno.EROFS:
        what = "read-only file system"
    else:
        what = "permission denied"
    if err.errno in _NO_SPACE:
        fix = (
            "free some space (or set run.root to a bigger disk) and run the same command again; "
            "completed files and the last checkpoint are intact"
        )
    else:
        fix = "make the run directory writable (or set run.root to a writable folder) and run again"
    return StorageError(f"{what} while writing {path}: {fix}")


@contextlib.contextmanager
def translate_storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise storage OSErrors inside the block as `StorageError` naming `path`."""
    try:
        yield
    except Exception as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e
