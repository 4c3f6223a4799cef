"""A rank dies or hangs under torchrun (2 gloo processes on CPU): the job stops instead of
hanging, and running the same command again resumes from the last complete sharded checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from tests.conftest import tiny_args

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")

EXTRA = [
    "pretrain.batch_size=4",
    "pretrain.max_steps=40",
    "pretrain.checkpoint_every=2",
    "pretrain.eval_every=0",
    "pretrain.log_every=1",
    "pretrain.parallel=fsdp",
]


def _launch(root, name, timeout_s="60"):
    env = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_DIST_TIMEOUT_S=timeout_s)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lmforge.cli",
        "pretrain",
        *tiny_args(root, name, *EXTRA),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes below `parent` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [parent]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                env = dict(
                    e.split("=", 1)
                    for e in (Path("/proc") / str(pid) / "environ").read_text().split("\0")
                    if "=" in e
                )
            except OSError:
                continue
            if "RANK" in env and "LOCAL_RANK" in env:
                out[int(env["RANK"])] = pid
    return out


def _complete(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt_dir.glob("step_*") if (p / "checksums.json").exists())


def _start_and_wait(proc, ckpt_dir, n_ckpts=2, limit=120):
    t0 = time.time()
    while len(_complete(ckpt_dir)) < n_ckpts:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:])
        if time.time() - t0 > limit:
            proc.kill()
            pytest.fail("no checkpoints appeared")
        time.sleep(0.01)
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    return pids


def test_killed_rank_stops_the_job_and_rerun_resumes(prepared_root, tmp_path):
    shutil.copytree(prepared_root / "base", tmp_path / "k")
    pre = tmp_path / "k" / "pretrain"
    proc = _launch(tmp_path, "k")
    pids = _start_and_wait(proc, pre / "checkpoints")
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0, out[-2000:]
    assert time.time() - t0 < 60  # torchrun notices the dead worker and stops the survivor
    last = _complete(pre / "checkpoints")[-1]
    assert last < 40
    # the same command again (here on one process: DCP reshards) resumes from the last complete one
    assert main(["pretrain", *tiny_args(tmp_path, "k", *EXTRA)]) == 0
    m = json.loads((pre / "manifest.json").read_text())
    assert (
        m["status"] == "complete"
        and m["metrics"]["resumed_from_step"] == last
        and m["metrics"]["steps"] == 40
    )


def test_hung_rank_times_out_instead_of_waiting_forever(prepared_root, tmp_path):
    shutil.copytree(prepared_root / "base", tmp_path / "h")
    proc = _launch(tmp_path, "h", timeout_s="4")
    pids = _start_and_wait(proc, tmp_path / "h" / "pretrain" / "checkpoints", n_ckpts=1)
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent: no socket closes, only the timeout helps
    t0 = time.time()
    try:
        while Path(f"/proc/{pids[0]}").exists() and "zombie" not in _state(pids[0]):
            assert time.time() - t0 < 60, "rank 0 kept waiting for the hung rank"
            time.sleep(0.1)
        waited = time.time() - t0
    finally:
        os.kill(pids[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert waited >= 3.5 and "imed out" in out, out[-3000:]


def _state(pid: int) -> str:
    try:
        return (
            (Path("/proc") / str(pid) / "status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
        )
    except (OSError, IndexError):
        return "zombie"


def test_partial_sharded_checkpoint_is_never_picked(tmp_path):
    """A `step_*` folder without checksums.json (a DCP save cut short, or a crash while an older
    copy of the same step was being deleted) must not be the one a resume picks."""
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.checkpoint import list_checkpoints, save_checkpoint

    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    good = save_checkpoint(tmp_path, 4, model, None, {"step": 4})
    partial = tmp_path / "step_00000008"
    (partial / "dcp").mkdir(parents=True)
    torch.save({"x": torch.zeros(2)}, partial / "dcp" / "__0_0.distcp")
    (partial / "trainer_state.json").write_text(json.dumps({"step": 8}))
    assert list_checkpoints(tmp_path) == [good]
