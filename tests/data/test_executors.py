"""Process-pool workers of the data stage die with their driver; task claims are exclusive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmforge.data.stage import claim_task
from lmforge.errors import DataError

DRIVER = """
import os, sys, time
from lmforge.data.executors import run_tasks

def slow(i, folder):
    open(os.path.join(folder, f"worker-{i}.pid"), "w").write(str(os.getpid()))
    time.sleep(60)
    return {}

run_tasks(slow, [(i, sys.argv[1]) for i in range(2)], executor="local", workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_driver_leaves_no_worker(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    pids: list[int] = []
    try:
        deadline = time.time() + 60
        while len(pids) < 2 and time.time() < deadline:
            pids = [int(p.read_text()) for p in tmp_path.glob("worker-*.pid") if p.read_text()]
            time.sleep(0.1)
        assert len(pids) == 2, "the workers never started"
        assert all(_alive(p) for p in pids)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.time() + 10
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "workers outlived their driver"
    finally:
        driver.kill()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_task_claim_is_exclusive(tmp_path):
    claim = tmp_path / "task-00000.claim"
    with claim_task(claim):
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from lmforge.data.stage import claim_task\n"
                "try:\n    with claim_task(Path(sys.argv[1])): pass\n"
                "except Exception as e:\n    print(e); sys.exit(3)",
                str(claim),
            ],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 3 and f"pid {os.getpid()}" in probe.stdout
    with claim_task(claim):  # released by its holder: free again
        pass
    with pytest.raises(DataError, match="being run by"):
        with claim_task(claim):
            with claim_task(claim):  # a second open file description of the same file
                pass
