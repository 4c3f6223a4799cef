"""The pipeline's fingerprints follow the bytes a stage read: a stage re-run upstream that wrote
other bytes re-runs the stages made from the old ones, one that wrote the same bytes does not;
`lmforge status` and the runner say why a stage runs again."""

from __future__ import annotations

import time

import pytest
from safetensors.torch import load_file, save_file

from lmforge.artifacts import record_artifacts
from lmforge.cli import main
from lmforge.pipeline import why_rerun
from lmforge.runs import atomic_write_json, read_manifest
from tests.conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _flip(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_downstream_reruns_when_and_only_when_upstream_bytes_change(clone_run, capsys):
    root = clone_run("d")
    args = [*tiny_args(root, "d"), "run.threads=1"]
    run = root / "d"
    assert main(["run", "--only", "pretrain,sample", *args]) == 0
    weights = run / "pretrain" / "model" / "model.safetensors"
    good, sampled = weights.read_bytes(), read_manifest(run / "sample")["started_at"]
    sample_fp = read_manifest(run / "sample")["fingerprint"]

    # damaged weights: pretrain runs again and, deterministic on the CPU, writes the same bytes;
    # the samples were made from those bytes, so sample is not re-run
    _flip(weights, offset=len(good) // 2)
    capsys.readouterr()
    assert main(["run", "--only", "pretrain,sample", *args]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "running the stage again" in out
    assert weights.read_bytes() == good
    assert "re-running sample" not in out
    assert read_manifest(run / "sample")["started_at"] == sampled
    assert read_manifest(run / "sample")["fingerprint"] == sample_fp

    # pretrain re-made with other bytes under the same config (as a non-deterministic GPU run
    # would): recorded like any finished stage, its fingerprint unchanged, sample now stale
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 0.01
    save_file(state, str(weights), metadata={"format": "pt"})
    m = read_manifest(run / "pretrain")
    m["artifacts"], m["artifacts_recorded_ns"] = record_artifacts(run / "pretrain"), time.time_ns()
    atomic_write_json(run / "pretrain" / "manifest.json", m)
    capsys.readouterr()
    assert main(["status", *args]) == 0
    status = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert status.count("stale:") == 1  # sample only: pretrain's own config and inputs are as they were
    assert "sample complete" in status and "stale: its input pretrain changed" in status
    assert status.index("stale:") > status.index("sample complete")
    assert main(["run", "--only", "pretrain,sample", *args]) == 0
    out = capsys.readouterr().out
    assert "re-running sample: its input pretrain changed" in " ".join(out.split())
    assert read_manifest(run / "sample")["fingerprint"] != sample_fp
    assert read_manifest(run / "sample")["status"] == "complete"

    # and nothing a stage wrote holds the run directory's absolute path
    for p in run.rglob("*"):
        if p.is_file() and p.parent != run and p.suffix in (".json", ".jsonl", ".md", ".html", ".txt"):
            assert str(root) not in p.read_text(encoding="utf-8", errors="replace"), p


def test_rerun_reason_names_changed_keys_or_inputs():
    prev = {"config": {"lr": 1e-3, "max_steps": 10}, "inputs": {"pretrain": "a:1", "reward": "b:2"}}
    assert why_rerun(prev, {"lr": 2e-3, "max_steps": 10}, prev["inputs"]) == "its config changed (lr)"
    same = prev["config"]
    assert why_rerun(prev, same, {"pretrain": "a:9", "reward": "b:2"}) == "its input pretrain changed"
    assert (
        why_rerun(prev, same, {"pretrain": "a:9", "reward": "c:2"}) == "its inputs pretrain, reward changed"
    )
    assert why_rerun(prev, same, prev["inputs"]) == "its fingerprint changed (run.seed)"
