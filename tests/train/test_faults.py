"""Faults the pipeline must survive: NaN / exploding losses (skip, roll back, stop), a full disk,
a file-size limit, a read-only run directory, SIGINT / SIGTERM, and kills at the write points
the crash harness targets (`LMFORGE_FAULT`). Real OS behaviour where the machine allows it
(RLIMIT_FSIZE in a subprocess, a tmpfs when running as root), never a mocked `open`."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmforge.errors import StorageError
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import atomic_write_bytes, read_manifest, remove_stale_temps, storage_error
from lmforge.train.checkpoint import list_checkpoints, load_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective
from lmforge.train.outcomes import TrainingStopped
from tests.conftest import TokenRows as Rows
from tests.conftest import tiny_args

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[2])


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


class Faulty:
    """Next-token loss, poisoned on chosen *batches* (by data position, so a rollback that
    skips them gets clean data afterwards): NaN, or the loss times `spike`."""

    def __init__(self, data: Rows, nan_at=(), spike_at=(), spike: float = 50.0):
        self.inner, self.data = pretrain_objective(), data
        self.nan_at, self.spike_at, self.spike = set(nan_at), set(spike_at), spike
        self.seen: list[int] = []

    def __call__(self, model, batch):
        loss, n, m = self.inner(model, batch)
        i = self.data.i - 1  # the batch just drawn
        self.seen.append(i)
        if i in self.nan_at:
            loss = loss * float("nan")
        elif i in self.spike_at:
            loss = loss * self.spike
        return loss, n, m

    def count(self, batch):
        return self.inner.count(batch)


def _trainer(tmp_path, objective_kw=None, model_seed=0, **cfg):
    data = Rows()
    obj = Faulty(data, **(objective_kw or {}))
    base = dict(
        max_steps=30,
        batch_size=2,
        warmup_steps=0,
        checkpoint_every=5,
        eval_every=0,
        lr=1e-2,
        spike_window=4,
        log_every=1,
    )
    base.update(cfg)
    logs: list[str] = []
    tr = Trainer(
        _model(model_seed),
        obj,
        data,
        TrainConfig(**base),
        tmp_path,
        device=torch.device("cpu"),
        log=logs.append,
    )
    return tr, obj, logs


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


# ----------------------------------------------------------------------------- numerical faults
def test_nan_burst_rolls_back_past_the_bad_batches_and_finishes(tmp_path):
    tr, obj, logs = _trainer(tmp_path, {"nan_at": {12, 13, 14}}, rollback_after=3)
    res = tr.fit()
    assert res.step == 30 and tr.rollbacks == 1
    rec = [r for r in _metrics(tmp_path) if "rollback" in r]
    # batches 0..11 made steps 1..12; 12..14 were bad; the checkpoint at step 10 was restored
    assert rec == [{"step": 10, "rollback": 1, "from_step": 12, "bad_steps": 3}]
    assert any("rolled back to the checkpoint at step 10" in line for line in logs)
    assert obj.seen.count(12) == 1 and obj.seen.count(14) == 1  # never replayed
    assert obj.seen[obj.seen.index(14) + 1] == 15  # training went on with fresh data
    steps = [r["step"] for r in _metrics(tmp_path) if "loss" in r and "skipped" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # metrics after the rollback point rewritten
    for p in tr.model.parameters():
        assert torch.isfinite(p).all()


def test_spike_is_skipped_with_a_log_line(tmp_path):
    tr, obj, logs = _trainer(tmp_path, {"spike_at": {9}}, max_steps=12)
    tr.fit()
    skipped = [r for r in _metrics(tmp_path) if r.get("skipped")]
    assert [r["skipped"] for r in skipped] == ["spike"] and skipped[0]["loss"] > 0
    assert any("is over 4x the median of the last 4 steps" in line for line in logs)
    assert tr.rollbacks == 0 and tr.step == 12


def test_spike_detection_off_lets_the_step_through(tmp_path):
    tr, _, _ = _trainer(tmp_path, {"spike_at": {9}}, max_steps=12, spike_factor=0)
    tr.fit()
    assert not [r for r in _metrics(tmp_path) if r.get("skipped")]


def test_persistent_nan_stops_clearly_after_the_rollbacks(tmp_path):
    tr, _, logs = _trainer(
        tmp_path, {"nan_at": set(range(7, 1000))}, rollback_after=2, max_rollbacks=2, max_bad_steps=4
    )
    with pytest.raises(
        TrainingStopped,
        match=r"4 consecutive non-finite losses at step 5 after 2 "
        r"rollback\(s\); stopped. Last good checkpoint: .*step_00000005",
    ):
        tr.fit()
    assert tr.rollbacks == 2
    assert sum("rolled back" in line for line in logs) == 2
    state = json.loads((tmp_path / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())
    assert state["rollbacks"] == 2  # the rewritten checkpoint remembers, so a re-run cannot loop


def test_bad_steps_before_any_checkpoint_are_skipped_without_rollback(tmp_path):
    tr, _, logs = _trainer(tmp_path, {"nan_at": {1, 2, 3}}, rollback_after=2, max_bad_steps=5, max_steps=8)
    tr.fit()
    assert tr.rollbacks == 0 and tr.step == 8
    assert any("no checkpoint to roll back to yet" in line for line in logs)


def test_resume_after_a_rollback_is_exact(tmp_path):
    """A run with a rollback, stopped by SIGTERM after it and resumed, ends with the same weights
    as the same run uninterrupted (the rollback count and loss window are in the checkpoint)."""
    faults = {"nan_at": {12, 13, 14}, "spike_at": {20}}
    a, _, _ = _trainer(tmp_path / "a", faults, rollback_after=3)
    a.fit()

    class StopAt(Rows):
        def __next__(self):
            if self.i == 18:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__next__()

    data = StopAt()
    cfg = dict(
        max_steps=30,
        batch_size=2,
        warmup_steps=0,
        checkpoint_every=5,
        eval_every=0,
        lr=1e-2,
        spike_window=4,
        log_every=1,
        rollback_after=3,
    )
    b = Trainer(
        _model(),
        Faulty(data, **faults),
        data,
        TrainConfig(**cfg),
        tmp_path / "b",
        device=torch.device("cpu"),
        log=lambda s: None,
    )
    with pytest.raises(TrainingStopped, match="stopped by signal"):
        b.fit()
    data2 = Rows()
    b2 = Trainer(
        _model(seed=5),
        Faulty(data2, **faults),
        data2,
        TrainConfig(**cfg),
        tmp_path / "b",
        device=torch.device("cpu"),
        log=lambda s: None,
    )
    b2.fit()
    assert b2.rollbacks == a.rollbacks == 1
    for (n, p), q in zip(a.model.named_parameters(), b2.model.parameters()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- storage faults
def test_storage_error_messages_name_the_path(tmp_path):
    p = tmp_path / "x" / "model.safetensors"
    assert "disk full (no space left on device) while writing" in str(
        storage_error(OSError(errno.ENOSPC, "x"), p)
    )
    assert str(p) in str(storage_error(OSError(errno.ENOSPC, "x"), p))
    assert "file size limit exceeded" in str(storage_error(OSError(errno.EFBIG, "x"), p))
    assert "read-only file system while writing" in str(storage_error(OSError(errno.EROFS, "x"), p))
    # libraries that do their own I/O: safetensors' message, torch's chained RuntimeError
    lib = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "disk full" in str(storage_error(lib, p))
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        assert "file size limit" in str(storage_error(e, p))
    assert storage_error(ValueError("bad value"), p) is None
    assert storage_error(OSError(errno.ENOENT, "x"), p) is None
    # an EACCES about some other file (e.g. an input being read) is not relabelled
    assert storage_error(PermissionError(errno.EACCES, "denied", "/elsewhere/input.txt"), p) is None


_FSIZE_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path[:0] = [{src!r}, {tests!r}]
    from tests.train.test_faults import Rows, _model
    from lmforge.errors import StorageError
    from lmforge.train.config import TrainConfig
    from lmforge.train.engine import Trainer
    from lmforge.train.objectives.pretrain import pretrain_objective
    out = sys.argv[1]
    cfg = dict(batch_size=2, warmup_steps=0, checkpoint_every=4, eval_every=0, log_every=1)
    Trainer(_model(), pretrain_objective(), Rows(), TrainConfig(max_steps=4, **cfg), out,
            device=torch.device("cpu"), log=lambda s: None).fit()
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))   # smaller than model.safetensors
    try:
        Trainer(_model(), pretrain_objective(), Rows(), TrainConfig(max_steps=8, **cfg), out,
                device=torch.device("cpu"), log=lambda s: None).fit()
    except StorageError as e:
        print("STORAGE_ERROR", e)
        sys.exit(3)
""")


def test_file_size_limit_fails_clearly_and_keeps_the_last_checkpoint(tmp_path):
    script = _FSIZE_SCRIPT.format(src=SRC, tests=TESTS)
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "file size limit exceeded (ulimit -f" in r.stdout
    assert "while writing " + str(tmp_path / "checkpoints") in r.stdout and "model.safetensors" in r.stdout
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000004"]
    assert not [
        p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")
    ]  # temp folder removed
    state = load_checkpoint(ckpts[0], _model(seed=3), None)
    assert state["step"] == 4


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only; skipped elsewhere -- the RLIMIT_FSIZE test covers those)."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_disk_full_fails_clearly_and_keeps_the_last_checkpoint(tmpfs):
    out = tmpfs / "run"
    cfg = dict(batch_size=2, warmup_steps=0, checkpoint_every=4, eval_every=0, log_every=1)
    Trainer(
        _model(),
        pretrain_objective(),
        Rows(),
        TrainConfig(max_steps=4, **cfg),
        out,
        device=torch.device("cpu"),
        log=lambda s: None,
    ).fit()
    _fill(tmpfs, leave=20_000)  # room for metrics lines, not for a checkpoint
    with pytest.raises(
        StorageError, match=r"disk full \(no space left on device\) while writing .*checkpoints"
    ):
        Trainer(
            _model(),
            pretrain_objective(),
            Rows(),
            TrainConfig(max_steps=8, **cfg),
            out,
            device=torch.device("cpu"),
            log=lambda s: None,
        ).fit()
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000004"]
    assert load_checkpoint(ckpts[0], _model(seed=3), None)["step"] == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_atomic_write_on_full_disk_keeps_the_old_file(tmpfs):
    target = tmpfs / "data.bin"
    atomic_write_bytes(target, b"old")
    _fill(tmpfs, leave=4096)
    with pytest.raises(StorageError, match=f"disk full .* while writing {target}"):
        atomic_write_bytes(target, b"x" * 1_000_000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmpfs.iterdir()) == ["data.bin", "filler"]


def test_read_only_run_directory_fails_clearly(clone_run, tmp_path):
    """Resuming a run whose directory became read-only: a one-line error naming the file."""
    root = clone_run("ro")
    args = tiny_args(root, "ro", "pretrain.max_steps=4")
    run_dir = root / "ro"
    if os.geteuid() != 0:
        for p in [run_dir, *run_dir.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        cleanup = lambda: [p.chmod(0o755) for p in [run_dir, *run_dir.rglob("*")] if p.is_dir()]  # noqa: E731
    else:  # root ignores permissions: bind-mount the run directory read-only instead
        r = subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot make a read-only directory here")
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(run_dir)])
            pytest.skip("cannot remount read-only here")
        cleanup = lambda: subprocess.run(["umount", "-l", str(run_dir)])  # noqa: E731
    try:
        r = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "pretrain", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": SRC},
        )
    finally:
        cleanup()
    assert r.returncode == 2, r.stderr
    assert "lmforge: error:" in r.stderr and "while writing" in r.stderr and str(run_dir) in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- kills and signals
def _cli(args, env=None, **kw):
    # SIGINT back to its default: a test run started in the background inherits it ignored
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def test_kill_at_checkpoint_and_shard_write_points_then_resume(clone_run):
    root = clone_run("fp")
    args = tiny_args(root, "fp", "pretrain.max_steps=10")
    # die with a complete temporary checkpoint folder that is not yet renamed into place
    p = _cli(["pretrain", *args], env={"LMFORGE_FAULT": "checkpoint:10:assembled"})
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    ck = root / "fp" / "pretrain" / "checkpoints"
    assert [c.name for c in ck.iterdir()] and any(c.name.startswith(".step_00000010") for c in ck.iterdir())
    p = _cli(["pretrain", *args])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    m = json.loads((root / "fp" / "pretrain" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["metrics"]["resumed_from_step"] == 5
    assert not [c for c in ck.iterdir() if c.name.startswith(".")]
    # die with the token shard's temporary file complete but not renamed: the rerun sweeps it
    tok = root / "fp" / "tokenizer"
    p = _cli(["tokenizer", *args, "--force"], env={"LMFORGE_FAULT": "atomic:train.bin"})
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert [f for f in tok.iterdir() if f.name.startswith(".train.bin.")]
    p = _cli(["tokenizer", *args])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert not [f for f in tok.iterdir() if f.name.startswith(".")]


def test_sigterm_and_sigint_stop_cleanly_and_resume(clone_run):
    root = clone_run("sig")
    args = tiny_args(root, "sig", "pretrain.max_steps=400", "pretrain.checkpoint_every=50")
    for sig in (signal.SIGTERM, signal.SIGINT):
        metrics = root / "sig" / "pretrain" / "metrics.jsonl"
        before = metrics.stat().st_size if metrics.exists() else 0
        p = _cli(["pretrain", *args])
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > before):
            time.sleep(0.05)  # signal once training runs (not during imports)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "stopped by signal" in err and "run the same command again to resume" in err
        m = json.loads((root / "sig" / "pretrain" / "manifest.json").read_text())
        assert m["status"] == "failed" and "stopped by signal" in m["error"]
        assert list_checkpoints(root / "sig" / "pretrain" / "checkpoints")
    p = _cli(["pretrain", *args])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    m = json.loads((root / "sig" / "pretrain" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["metrics"]["resumed_from_step"] > 0


def test_sigterm_outside_training_is_an_interrupt(clone_run):
    """SIGTERM while a non-training stage runs: manifest says interrupted, exit 130, no temp files."""
    root = clone_run("sigdata")
    args = tiny_args(root, "sigdata")
    p = _cli(["data", *args, "--force"])
    tok = root / "sigdata" / "data"  # the data stage takes seconds here
    deadline = time.time() + 60
    while time.time() < deadline and (read_manifest(tok) or {}).get("status") != "running":
        time.sleep(0.01)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the stage finished before the signal arrived")
    assert p.returncode == 130, err
    m = json.loads((tok / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == "interrupted"
    assert not [f for f in tok.iterdir() if f.name.startswith(".")]


def test_remove_stale_temps_only_touches_our_temporaries(tmp_path):
    (tmp_path / ".train.bin.ab12cd.tmp").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".manifest.json.zz.tmp").write_bytes(b"x")
    (tmp_path / ".step_00000010.tmp123").mkdir()
    (tmp_path / ".hidden").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep")
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".hidden", "notes.tmp", "sub"]


def test_replacing_a_checkpoint_never_loses_the_step(tmp_path):
    """Re-saving a step (a re-run or a rollback) renames the old copy aside first; a crash
    between the renames is repaired by list_checkpoints, and half-deleted folders are ignored."""
    from lmforge.train.checkpoint import save_checkpoint

    m = _model()
    first = save_checkpoint(tmp_path, 5, m, None, {"step": 5, "v": 1})
    # simulate the crash window: old copy renamed aside, the new one never renamed in
    aside = tmp_path / ".step_00000005.old999"
    os.replace(first, aside)
    assert list_checkpoints(tmp_path) == [first]
    assert json.loads((first / "trainer_state.json").read_text())["v"] == 1
    save_checkpoint(tmp_path, 5, m, None, {"step": 5, "v": 2})
    assert json.loads((first / "trainer_state.json").read_text())["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]
    # a folder whose deletion (or save) was cut short has no checksums.json: never picked
    half = tmp_path / "step_00000010"
    half.mkdir()
    (half / "trainer_state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == [first]


def test_spike_detection_ignores_small_and_signed_losses(tmp_path):
    """Near-zero losses (DPO-like) wobbling by 5x are not spikes; a median <= 0 disables the test."""
    tr, _, _ = _trainer(tmp_path, max_steps=2)
    tr.recent_losses = [0.01] * 4
    assert tr._spike_limit() == pytest.approx(1.01)  # 4x would be 0.04: the 1-nat margin rules
    tr.recent_losses = [-0.2, 0.1, -0.05, 0.0]
    assert tr._spike_limit() is None
    tr.recent_losses = [3.0] * 4
    assert tr._spike_limit() == pytest.approx(12.0)


def test_sharded_checkpoint_metadata_is_never_plainly_unpickled(tmp_path):
    """A DCP checkpoint round-trips through the restricted metadata unpickler, and a .metadata
    file carrying a pickle that would run code is refused with a CheckpointError."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from lmforge.errors import CheckpointError
    from lmforge.train.checkpoint import _safe_dcp_reader

    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))
    m2 = _model(seed=9)
    opt2 = torch.optim.AdamW(m2.parameters())
    msd2, osd2 = get_state_dict(m2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=_safe_dcp_reader(tmp_path / "dcp"))
    for k, v in msd.items():
        assert torch.equal(v, state["model"][k]), k

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refused to load .*posix.system|refused to load .*os.system"):
        dcp.load(state, storage_reader=_safe_dcp_reader(tmp_path / "dcp"))
    assert not (tmp_path / "pwned").exists()


def test_resume_at_the_end_reports_the_same_final_metrics(tmp_path):
    """Killed after the last checkpoint but before the stage finished: the re-run restores the
    final loss and evaluation from the checkpoint instead of reporting NaN / nothing (the crash
    harness found sft's val_loss_after missing after such a resume)."""

    def trainer():
        data = Rows()
        return Trainer(
            _model(),
            pretrain_objective(),
            data,
            TrainConfig(max_steps=6, batch_size=2, warmup_steps=0, checkpoint_every=3, eval_every=3),
            tmp_path,
            device=torch.device("cpu"),
            log=lambda s: None,
            evaluate=lambda m: {"loss": 1.25, "acc": 0.5},
        )

    first = trainer().fit()
    again = trainer().fit()
    assert again.resumed_from == 6 and again.final == first.final and math.isfinite(again.final["loss"])


def test_a_signal_that_arrives_too_late_to_stop_training_is_handed_on(tmp_path):
    got = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        tr, _, _ = _trainer(tmp_path, max_steps=3, checkpoint_every=3)
        tr.fit()
        tr2, _, _ = _trainer(tmp_path, max_steps=3, checkpoint_every=3)
        tr2._stop_signal = signal.SIGUSR1  # as if it came during the final save, after the last check
        tr2.fit()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == [signal.SIGUSR1]


def test_a_model_index_cannot_point_outside_its_folder(tmp_path):
    """Security: the shard names in model.safetensors.index.json (a downloaded file) are plain
    file names in the model folder; '../x' or an absolute path is refused, not followed."""
    from lmforge.errors import CheckpointError
    from lmforge.model.hf import weight_files

    for name in ("../../etc/passwd", "/etc/passwd", "sub/dir.safetensors", ".."):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(CheckpointError, match="not a file name inside"):
            weight_files(tmp_path)
