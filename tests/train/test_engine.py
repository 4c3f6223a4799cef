"""Training engine: exact resume after kill -9, corrupt checkpoints, bad steps, accumulation."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective
from lmforge.train.outcomes import TrainingStopped
from tests.conftest import TokenRows, tiny_args


def _weights(root, name):
    return load_file(str(root / name / "pretrain" / "model" / "model.safetensors"))


def test_kill9_resume_equals_uninterrupted(clone_run):
    root = clone_run("straight")
    clone_run("killed")
    assert main(["pretrain", *tiny_args(root, "straight", "pretrain.max_steps=30")]) == 0

    cmd = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "pretrain",
        *tiny_args(root, "killed", "pretrain.max_steps=30"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = root / "killed" / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ck / "step_00000010").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((root / "killed" / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "running"  # it really died mid-stage
    assert main(["pretrain", *tiny_args(root, "killed", "pretrain.max_steps=30")]) == 0
    manifest = json.loads((root / "killed" / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["resumed_from_step"] >= 10
    a, b = _weights(root, "straight"), _weights(root, "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log has no duplicated steps after the resume
    steps = [
        r["step"]
        for r in map(json.loads, open(root / "killed" / "pretrain" / "metrics.jsonl"))
        if "loss" in r
    ]
    assert steps == sorted(set(steps))


def test_completed_stages_are_skipped_and_changes_rerun(clone_run, capsys):
    root = clone_run("cache")
    args = tiny_args(root, "cache", "pretrain.max_steps=6")
    assert main(["run", *args]) == 0
    m1 = json.loads((root / "cache" / "pretrain" / "manifest.json").read_text())
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("cached") >= 5
    m2 = json.loads((root / "cache" / "pretrain" / "manifest.json").read_text())
    assert m1 == m2
    assert main(["run", *args[:-1], "pretrain.max_steps=8"]) == 0
    m3 = json.loads((root / "cache" / "pretrain" / "manifest.json").read_text())
    assert m3["metrics"]["steps"] == 8 and m3["fingerprint"] != m1["fingerprint"]
    ev = json.loads((root / "cache" / "eval" / "manifest.json").read_text())
    assert ev["inputs"]["pretrain"].startswith(m3["fingerprint"] + ":")  # fingerprint:content digest


def _small_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


def test_corrupt_checkpoint_is_named(tmp_path):
    m = _small_model()
    path = save_checkpoint(tmp_path, 3, m, None, {"step": 3})
    verify_checkpoint(path)
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(path, m, None)
    (path / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(path)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    class Poisoned:
        def __init__(self):
            self.inner = pretrain_objective()
            self.calls = 0

        def __call__(self, model, batch):
            loss, n, m = self.inner(model, batch)
            self.calls += 1
            return (loss * float("nan") if self.calls >= 3 else loss), n, m

        def count(self, batch):
            return self.inner.count(batch)

    cfg = TrainConfig(max_steps=20, batch_size=2, checkpoint_every=1, max_bad_steps=3, warmup_steps=0)
    tr = Trainer(
        _small_model(),
        Poisoned(),
        TokenRows(2),
        cfg,
        tmp_path,
        device=torch.device("cpu"),
        log=lambda s: None,
    )
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite losses at step 2"):
        tr.fit()
    assert (tmp_path / "checkpoints" / "step_00000002").exists()
    skipped = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "skipped" in l]
    assert len(skipped) == 3


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    def run(batch, accum, out):
        cfg = TrainConfig(
            max_steps=3,
            batch_size=batch,
            grad_accum=accum,
            warmup_steps=0,
            lr=1e-2,
            checkpoint_every=0,
            eval_every=0,
        )

        class Big(TokenRows):  # the same 8 rows per step however they are split
            def __next__(self):
                step, part = divmod(self.i, accum)
                g = torch.Generator().manual_seed(step)
                x = torch.randint(0, 50, (8, 9), generator=g)[part * batch : (part + 1) * batch]
                self.i += 1
                return x[:, :-1], x[:, 1:]

        m = _small_model()
        Trainer(
            m,
            pretrain_objective(),
            Big(batch),
            cfg,
            tmp_path / out,
            device=torch.device("cpu"),
            log=lambda s: None,
        ).fit()
        return m

    a, b = run(8, 1, "a"), run(2, 4, "b")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_sigterm_checkpoints_and_stops(tmp_path):
    class Signalling(TokenRows):
        def __next__(self):
            if self.i == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__next__()

    cfg = TrainConfig(max_steps=50, batch_size=2, checkpoint_every=0, warmup_steps=0)
    tr = Trainer(
        _small_model(),
        pretrain_objective(),
        Signalling(2),
        cfg,
        tmp_path,
        device=torch.device("cpu"),
        log=lambda s: None,
    )
    with pytest.raises(TrainingStopped, match="stopped by signal"):
        tr.fit()
    assert (tmp_path / "checkpoints" / "step_00000005").exists()
