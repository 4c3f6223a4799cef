"""run.trackers: TensorBoard, W&B (offline) and MLflow (file store) hold what metrics.jsonl holds.

Each tracker is read back with its own reader: TensorBoard's event file loader, the W&B
transaction log of the offline run (records of W&B's protobuf schema in a LevelDB-style log),
and an MLflow client on the file store. A killed and resumed pretraining run must leave each
(tag, step) exactly once in every tracker.
"""

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmforge.config import RunSettings
from lmforge.errors import ConfigError
from lmforge.pipeline import load_config, run_stage
from lmforge.runs import read_jsonl
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective
from lmforge.train.tracking import MetricsWriter, flatten, scalars, track_stage
from tests.align.test_rl import _cfg as rl_cfg
from tests.align.test_rl import base_dir  # noqa: F401  (fixture: a tiny chat base model)
from tests.conftest import TokenRows as Rows
from tests.conftest import main, tiny_args
from tests.train.test_faults import _model, _trainer

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

SRC = str(Path(__file__).resolve().parents[2] / "src")
ALL = "run.trackers=[tensorboard,wandb,mlflow]"


# ----------------------------------------------------------------------------- readers
def tensorboard_scalars(log_dir: Path) -> list[tuple[str, int, float]]:
    """Every scalar event in every event file of `log_dir`, duplicates kept."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.append((v.tag, ev.step, float(tensor_util.make_ndarray(v.tensor))))
    return out


def _wandb_records(path: Path):
    """Parse W&B's transaction log: a 7-byte file header, then 32 KiB blocks of chunks with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            break
        pending += data[pos : pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def wandb_run(stage_dir: Path) -> dict:
    """History rows, config and summary of the W&B run(s) under `stage_dir/wandb`."""
    rows, config, summary, ids = [], {}, {}, set()
    for f in sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                for item in r.run.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in r.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                )
            elif kind == "summary":
                for i in r.summary.update:
                    summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return {"rows": rows, "config": config, "summary": summary, "ids": ids}


def wandb_scalars(run: dict, prefix: str = "pretrain") -> list[tuple[str, int, float]]:
    out = []
    for row in run["rows"]:
        step = row.get(f"{prefix}/step")
        out += [(k, step, v) for k, v in row.items() if k.startswith(prefix + "/") and k != f"{prefix}/step"]
    return out


def mlflow_run(root: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    out = []
    for key in run.data.metrics:
        out += [(key, m.step, m.value) for m in client.get_metric_history(run_id, key)]
    return run, out


def jsonl_scalars(path: Path, prefix: str = "pretrain") -> list[tuple[str, int, float]]:
    return [(f"{prefix}/{k}", r["step"], v) for r in read_jsonl(path) for k, v in scalars(r).items()]


def _by_key(items):
    return {(t, s): v for t, s, v in items}


# ----------------------------------------------------------------------------- tests
def test_every_tracker_holds_the_scalars_and_params_of_metrics_jsonl(clone_run):
    root = clone_run("tr")
    assert main(["pretrain", *tiny_args(root, "tr", "pretrain.max_steps=10", ALL)]) == 0
    stage = root / "tr" / "pretrain"
    want = jsonl_scalars(stage / "metrics.jsonl")
    keys = {t for t, _, _ in want}
    assert {"pretrain/loss", "pretrain/lr", "pretrain/eval/loss"} <= keys
    assert {s for t, s, _ in want if t == "pretrain/loss"} == {5, 10}

    tb = tensorboard_scalars(stage / "tensorboard")
    tb_curves = [x for x in tb if "/final/" not in x[0]]
    assert len(tb_curves) == len(want)
    assert _by_key(tb_curves).keys() == _by_key(want).keys()
    for k, v in _by_key(want).items():
        assert _by_key(tb_curves)[k] == pytest.approx(v, rel=1e-6)  # event files store float32
    manifest = json.loads((stage / "manifest.json").read_text())
    assert _by_key(tb)[("pretrain/final/val_loss", 10)] == pytest.approx(manifest["metrics"]["val_loss"])

    wb = wandb_run(stage)
    state = json.loads((stage / "tracking.json").read_text())
    assert wb["ids"] == {state["wandb_id"]}
    assert sorted(wandb_scalars(wb)) == sorted(want)
    cfg = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in wb["config"].items()}
    assert cfg["pretrain"]["max_steps"] == 10 and cfg["pretrain"]["model"]["d_model"] == 32
    assert cfg["run"]["name"] == "tr" and cfg["run"]["seed"] == 1337
    assert wb["summary"]["final/val_loss"] == manifest["metrics"]["val_loss"]

    run, ml = mlflow_run(root, state["mlflow_run_id"])
    curves = [x for x in ml if not x[0].startswith("final/")]
    assert sorted(curves) == sorted(want)
    assert run.data.params["pretrain.max_steps"] == "10" and run.data.params["run.seed"] == "1337"
    assert run.data.params["pretrain.model.d_model"] == "32"
    assert run.data.metrics["final/val_loss"] == manifest["metrics"]["val_loss"]
    assert run.info.run_name == "tr/pretrain" and run.info.status == "FINISHED"


def _cli(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        capture_output=True,
        text=True,
        # not W&B's service of this test process (an in-process run leaves WANDB_SERVICE set)
        env={
            **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
            "PYTHONPATH": SRC,
            **(env or {}),
        },
        timeout=600,
    )


def test_killed_and_resumed_pretraining_logs_each_step_once(clone_run):
    root = clone_run("kr")
    args = tiny_args(root, "kr", "pretrain.max_steps=15", ALL)
    # SIGKILL while writing the step-10 checkpoint: steps 6..10 were logged and get replayed
    p = _cli(["pretrain", *args], env={"LMFORGE_FAULT": "checkpoint:10:assembled"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    stage = root / "kr" / "pretrain"
    assert ("pretrain/loss", 10) in _by_key(tensorboard_scalars(stage / "tensorboard"))
    p = _cli(["pretrain", *args])
    assert p.returncode == 0, p.stderr
    m = json.loads((stage / "manifest.json").read_text())
    assert m["metrics"]["resumed_from_step"] == 5

    want = jsonl_scalars(stage / "metrics.jsonl")
    state = json.loads((stage / "tracking.json").read_text())
    tb = [x for x in tensorboard_scalars(stage / "tensorboard") if "/final/" not in x[0]]
    wb_run = wandb_run(stage)
    wb = wandb_scalars(wb_run)
    _, ml = mlflow_run(root, state["mlflow_run_id"])
    ml = [x for x in ml if not x[0].startswith("final/")]
    assert len(list((stage / "tensorboard").glob("events.*"))) == 2  # one directory, both processes
    assert wb_run["ids"] == {state["wandb_id"]}  # the resumed process continued the same W&B run
    for name, got in (("tensorboard", tb), ("wandb", wb), ("mlflow", ml)):
        counts = Counter((t, s) for t, s, _ in got)
        assert max(counts.values()) == 1, (name, [k for k, c in counts.items() if c > 1])
        assert set(counts) == {(t, s) for t, s, _ in want}, name
        losses = {s: v for t, s, v in got if t == "pretrain/loss"}
        assert sorted(losses) == [5, 10, 15], name
        for s, v in losses.items():  # exact resume: the replayed step had the same loss
            assert v == pytest.approx(_by_key(want)[("pretrain/loss", s)], rel=1e-6), name


def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_extra(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else find(n, *a))
    with pytest.raises(ConfigError, match=r"run\.trackers: wandb .*pip install 'lmforge\[wandb\]'"):
        load_config("tiny", ["run.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError, match=r"run\.trackers\.0"):
        load_config("tiny", ["run.trackers=[neptune]"])
    assert RunSettings().trackers == []


def test_a_writer_outside_a_tracked_stage_only_writes_jsonl(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write({"step": 1, "loss": 2.0, "skipped": "spike"})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0, "skipped": "spike"}]
    assert w.tracking is None


def test_flatten_and_scalars():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null"}
    assert scalars({"step": 3, "loss": 1, "ok": True, "why": "x", "x": None}) == {"loss": 1.0, "ok": 1.0}
    assert scalars({"step": 3, "skipped": "spike", "loss": 9.0}) == {"skipped/loss": 9.0}


def test_rl_rollout_lines_reach_the_trackers_through_the_same_writer(tmp_path, base_dir, one_thread):  # noqa: F811
    cfg = rl_cfg(tmp_path, base_dir, "rl.max_steps=2", "run.trackers=[tensorboard,mlflow]")
    o = run_stage(cfg, "rl")
    want = jsonl_scalars(o.dir / "metrics.jsonl", prefix="rl")
    assert ("rl/reward", 1) in _by_key(want) and ("rl/loss", 2) in _by_key(want)  # rollout and update lines
    tb = [x for x in tensorboard_scalars(o.dir / "tensorboard") if "/final/" not in x[0]]
    assert len(tb) == len(want) and _by_key(tb).keys() == _by_key(want).keys()
    state = json.loads((o.dir / "tracking.json").read_text())
    run, ml = mlflow_run(tmp_path, state["mlflow_run_id"])
    assert sorted(x for x in ml if not x[0].startswith("final/")) == sorted(want)
    assert run.data.params["rl.method"] == "grpo"


def _tracked(tmp_path, logs, trackers=("tensorboard",)):
    run = RunSettings(name="eng", root=str(tmp_path), trackers=list(trackers))
    stage_dir = run.dir / "pretrain"
    stage_dir.mkdir(parents=True)
    return stage_dir, track_stage(run, "pretrain", TrainConfig(), stage_dir, log=logs.append)


def test_only_rank_0_writes_metrics_and_tracker_lines(tmp_path):
    logs: list[str] = []
    stage_dir, ctx = _tracked(tmp_path, logs)
    with ctx:
        for rank in (1, 0):
            out = stage_dir / f"rank{rank}"
            Trainer(
                _model(),
                pretrain_objective(),
                Rows(),
                TrainConfig(max_steps=4, batch_size=2, warmup_steps=0, eval_every=0, log_every=1),
                out,
                device=torch.device("cpu"),
                log=logs.append,
                dist_info=DistInfo(rank=rank, world=1),
            ).fit()
    tags = {t for t, _, _ in tensorboard_scalars(stage_dir / "tensorboard")}
    assert "pretrain/rank0/loss" in tags and not any("rank1" in t for t in tags)
    assert not (stage_dir / "rank1" / "metrics.jsonl").exists()


def test_a_rollback_replays_no_step_into_the_trackers(tmp_path):
    logs: list[str] = []
    stage_dir, ctx = _tracked(tmp_path, logs, ("tensorboard", "mlflow"))
    with ctx:
        tr, _, _ = _trainer(stage_dir, objective_kw={"nan_at": {12, 13, 14}}, rollback_after=3)
        tr.fit()
    assert any(r.get("rollback") for r in read_jsonl(stage_dir / "metrics.jsonl"))
    tb = tensorboard_scalars(stage_dir / "tensorboard")
    state = json.loads((stage_dir / "tracking.json").read_text())
    _, ml = mlflow_run(tmp_path, state["mlflow_run_id"])
    for got in (tb, ml):
        counts = Counter((t, s) for t, s, _ in got if "final" not in t)
        assert max(counts.values()) == 1
        assert {s for t, s in counts if t == "pretrain/loss"} == set(range(1, 31))
    assert any("not sent again" in m for m in logs)
