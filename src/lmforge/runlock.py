"""The run-directory lock: one writer per run directory.

A command that writes to a run directory holds its lock (`run_lock`): ``<run>/.lmforge.lock``,
locked with flock(2) and holding the holder's pid, host, command and start time. A second
writer is refused at once with the holder named; a lock whose holder died (SIGKILL, power
loss) is released by the kernel and simply taken over. On a file system without flock the
holder record alone decides: a dead pid on this host is stale and taken over, a holder on
another host cannot be checked and is reported with the command that removes it.

It lives apart from `runs` (manifests and atomic writes) because it is about processes, not
files: pid liveness, hosts, flock semantics.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import RunLockedError, translate_storage_errors

_UMASK = os.umask(0)
os.umask(_UMASK)

LOCK_FILE = ".lmforge.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: dict[str, list] = {}  # resolved run dir -> [fd, depth]: re-entrant within one process


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder recorded on this host still runs (same pid and same start time)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    ticks = holder.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(`{holder.get('command', '?')}`, since {holder.get('started', '?')})"
    )


def acquire_run_lock(run_dir: str | os.PathLike, command: str) -> int:
    """Take the run directory's lock for `command`; return the open lock file descriptor.

    Raises `RunLockedError` naming the holder when another live process has it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    with translate_storage_errors(path):
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    host = socket.gethostname()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunLockedError(
                f"{run_dir} is in use by {describe_holder(holder)}: two commands writing one run "
                f"directory corrupt it; wait for that one to finish (or stop it), or set another "
                f"run.name / run.root"
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            flocked = False  # no flock on this file system: the holder record decides
        holder = _read_holder(fd)
        if holder and holder.get("pid") != os.getpid():
            same_host = holder.get("host") == host
            if (same_host and _alive(holder)) or (not flocked and not same_host):
                fix = "" if same_host else f"; if no lmforge command runs there any more, delete {path}"
                raise RunLockedError(f"{run_dir} is in use by {describe_holder(holder)}{fix}")
        me = {
            "pid": os.getpid(),
            "host": host,
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "start_ticks": _start_ticks(os.getpid()),
        }
        with translate_storage_errors(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def release_run_lock(fd: int) -> None:
    """Clear the holder record and drop the lock. The file itself stays: deleting it would let
    a process that opened the old file and one that creates a new one both hold 'the' lock."""
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block; nested use in one process (a pipeline running its
    stages) shares the outer lock."""
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = acquire_run_lock(run_dir, command)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        release_run_lock(fd)
