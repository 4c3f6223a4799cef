"""Run-directory lock: one writer at a time, holder named, stale locks taken over."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lmforge import runlock
from lmforge.cli import main
from lmforge.errors import RunLockedError
from lmforge.runlock import LOCK_FILE, acquire_run_lock, release_run_lock, run_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from lmforge.runlock import run_lock
    with run_lock(sys.argv[1], "lmforge run (holder)"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path/'run'."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=env)
    assert p.stdout.readline().strip() == b"locked"
    yield run_dir, p
    p.kill()
    p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_refused_with_holder_named(holder):
    run_dir, p = holder
    with pytest.raises(RunLockedError) as e:
        acquire_run_lock(run_dir, "lmforge run")
    assert f"pid {p.pid} on host {socket.gethostname()}" in str(e.value)
    assert "lmforge run (holder)" in str(e.value)


def test_second_lmforge_run_refuses_at_once(holder, capsys):
    run_dir, p = holder
    rc = main(["run", "tiny", f"run.root={run_dir.parent}", f"run.name={run_dir.name}", "data.max_docs=5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"pid {p.pid}" in err and "in use" in err
    assert not (run_dir / "data").exists()  # nothing written beside the holder
    assert p.poll() is None


def test_lock_released_by_a_killed_holder_is_taken_over(holder):
    run_dir, p = holder
    p.kill()
    p.wait()
    # the dead holder's record is still in the file; the kernel dropped its flock
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == p.pid
    with run_lock(run_dir, "lmforge run"):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run_dir / LOCK_FILE).read_text() == ""  # released: no holder recorded


def test_nested_use_shares_the_lock(tmp_path):
    with run_lock(tmp_path, "outer"), run_lock(tmp_path, "inner"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "outer"
    fd = acquire_run_lock(tmp_path, "again")
    release_run_lock(fd)


def _no_flock(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", refuse)


def _write_holder(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"command": "lmforge run", "started": "then", **holder}))


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    _write_holder(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    fd = acquire_run_lock(tmp_path, "lmforge run")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_lock(fd)


def test_without_flock_a_live_or_remote_holder_is_refused(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    _write_holder(tmp_path, pid=os.getppid(), host=socket.gethostname())
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        acquire_run_lock(tmp_path, "lmforge run")
    _write_holder(tmp_path, pid=_dead_pid(), host="elsewhere-node-7")
    with pytest.raises(RunLockedError, match="host elsewhere-node-7.*delete .*lmforge.lock"):
        acquire_run_lock(tmp_path, "lmforge run")


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    # our parent is alive, but it started at a different moment than the recorded holder
    ticks = runlock._start_ticks(os.getppid())
    _write_holder(tmp_path, pid=os.getppid(), host=socket.gethostname(), start_ticks=(ticks or 0) + 12345)
    fd = acquire_run_lock(tmp_path, "lmforge run")
    release_run_lock(fd)
