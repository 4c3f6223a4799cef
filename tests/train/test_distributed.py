"""Data parallel on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 follow the single-process
run with the same global batch, and a 2-rank sharded checkpoint resumes on 1 process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from tests.conftest import tiny_args

EXTRA = [
    "pretrain.batch_size=4",
    "pretrain.grad_accum=2",
    "pretrain.max_steps=8",
    "pretrain.checkpoint_every=4",
    "pretrain.eval_every=4",
    "pretrain.log_every=1",
]


def _torchrun(root, name, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
        *tiny_args(root, name, *EXTRA, *extra),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _losses(root, name):
    rows = [json.loads(l) for l in open(root / name / "pretrain" / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def _weights(root, name):
    return load_file(str(root / name / "pretrain" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(prepared_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for name in ("single", "ddp", "fsdp"):
        shutil.copytree(prepared_root / "base", root / name)
    assert main(["pretrain", *tiny_args(root, "single", *EXTRA)]) == 0
    _torchrun(root, "ddp", "pretrain.parallel=ddp")
    _torchrun(root, "fsdp", "pretrain.parallel=fsdp")
    return root


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(runs, name):
    assert _losses(runs, name) == pytest.approx(_losses(runs, "single"), abs=1e-4)
    a, b = _weights(runs, "single"), _weights(runs, name)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_sharded_checkpoint_resumes_on_one_process(runs):
    root = runs
    shutil.copytree(root / "fsdp", root / "resumed")
    pre = root / "resumed" / "pretrain"
    assert (pre / "checkpoints" / "step_00000004" / "dcp").is_dir()
    # simulate a crash after the step-4 checkpoint of the 2-rank run
    shutil.rmtree(pre / "checkpoints" / "step_00000008")
    shutil.rmtree(pre / "model")
    m = json.loads((pre / "manifest.json").read_text())
    m["status"] = "running"
    (pre / "manifest.json").write_text(json.dumps(m))
    assert main(["pretrain", *tiny_args(root, "resumed", *EXTRA, "pretrain.parallel=fsdp")]) == 0
    m = json.loads((pre / "manifest.json").read_text())
    assert m["status"] == "complete" and m["metrics"]["resumed_from_step"] == 4
    a, b = _weights(root, "single"), _weights(root, "resumed")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_batch_not_divisible_by_world_is_named(prepared_root, tmp_path):
    shutil.copytree(prepared_root / "base", tmp_path / "odd")
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
        *tiny_args(tmp_path, "odd", "pretrain.batch_size=3"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "batch_size 3 (the global micro-batch) is not divisible by the world size 2" in r.stderr + r.stdout
