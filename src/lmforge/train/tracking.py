"""Metrics to where people watch experiments: TensorBoard, Weights & Biases, MLflow.

`metrics.jsonl` stays the ledger of a stage; `run.trackers` adds copies of the same scalars in
the tools researchers already use. Why it is shaped like this:

- **One writer.** Every metric line of a stage goes through `MetricsWriter.write`, which
  appends it to `metrics.jsonl` and hands its numbers to the stage's trackers. The training
  engine and the RL rollout loop both use it, so a tracker can never see a curve the ledger
  does not hold, or the other way round.
- **Opened by the pipeline, found by the writer.** The runner opens the trackers around a stage
  (`track_stage`) with the resolved config, the run name and seed; writers created during the
  stage find them through a context variable, so the stages need no tracker plumbing. A writer
  whose file lies outside the open stage's folder (a trainer used on its own) only writes JSONL.
- **One tracker run per stage**, named `<run>/<stage>` and grouped by run name; scalars are
  tagged `<stage>/<key>` (`pretrain/loss`, `sft/eval/loss`, `rl/objective/kl`), sub-trainers
  writing into a subfolder add it (`cpt/anneal/loss`). The run ids live in the stage folder's
  `tracking.json`, so a resumed stage reopens the same W&B run (same id, `resume="allow"`), the
  same MLflow run and the same TensorBoard directory, and a stage that starts over (its
  folder removed) gets new ones.
- **Each step once.** A resumed stage replays the steps between its last checkpoint and the
  crash. `tracking.json` keeps, per tracker and tag, the last step handed over; values at or
  below it are not sent again (under exact resume they are the same numbers). TensorBoard is
  flushed after each line so a killed process leaves nothing half-sent; W&B buffers its run log
  in a separate process, so for it the resumed stage reads back what reached the log instead. After an in-process
  rollback the replayed step numbers are likewise held back until the run passes them again;
  `metrics.jsonl` keeps the retrained values and the count of held-back values is logged.
- **Nothing leaves the machine unless asked.** W&B runs in offline mode unless `WANDB_MODE` is
  set; MLflow writes a file store under `run.root/mlruns` unless `MLFLOW_TRACKING_URI` is set.
- **Rank 0 only.** The pipeline opens trackers only in the process that owns the run directory.
- A tracker that fails mid-stage (full disk, lost server) is reported and turned off for the
  rest of the stage; training goes on with `metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..config import RunSettings, missing_trackers, tracker_install_hint
from ..errors import ConfigError
from ..runs import append_jsonl, read_jsonl, translate_storage_errors

STATE_FILE = "tracking.json"


def check_installed(names: list[str], where: str = "run.trackers") -> None:
    missing = missing_trackers(names)
    if missing:
        raise ConfigError(f"{where}: {tracker_install_hint(missing)}")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings (trackers want scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def scalars(rec: dict) -> dict[str, float]:
    """The numeric fields of a metrics line except `step` (bools as 0/1, strings dropped). The
    loss of a skipped bad step is not a point of the training curve (the step number is that of
    the last good step): it goes under `skipped/`."""
    out = {}
    under = "skipped/" if rec.get("skipped") else ""
    for k, v in rec.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        if isinstance(v, (bool, int, float)):
            out[under + k] = float(v)
    return out


# ----------------------------------------------------------------------------- backends
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, stage_dir: Path, stage: str, params: dict, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.stage, self.params = stage, params
        self.writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"), flush_secs=10)
        if not state.get("tensorboard_started"):
            text = "\n".join(f"    {k}: {v}" for k, v in params.items())
            self.writer.add_text(f"{stage}/config", text, 0)
            state["tensorboard_started"] = True

    def log(self, prefix: str, tags: dict[str, float], step: int) -> None:
        for tag, v in tags.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        if not failed:
            from torch.utils.tensorboard.summary import hparams

            nums = {f"{self.stage}/final/{k}": float(v) for k, v in scalars(summary).items()}
            hp = {k: v for k, v in self.params.items() if isinstance(v, (bool, int, float, str))}
            writer = self.writer.file_writer
            assert writer is not None  # created by SummaryWriter.__init__
            for summ in hparams(hp, nums):
                writer.add_summary(summ)
            for tag, v in nums.items():
                self.writer.add_scalar(tag, v, step)
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, stage_dir: Path, stage: str, run_name: str, config: dict, state: dict):
        import wandb

        self.resumed = "wandb_id" in state
        state.setdefault("wandb_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lmforge"),
            name=f"{run_name}/{stage}",
            group=run_name,
            job_type=stage,
            id=state["wandb_id"],
            resume="allow",
            dir=str(stage_dir),
            config=config,
            save_code=False,
            # offline unless the user chose a mode: nothing is uploaded without being asked
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=wandb.Settings(**_wandb_settings(wandb.Settings)),
        )
        self.defined: set[str] = set()
        self.logs = Path(stage_dir) / "wandb"

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """The last step of each tag that W&B has on disk for `run_id`. W&B writes its run log
        from a separate process with buffering, so a killed stage can have handed over lines
        that never reached the log; the resumed stage re-sends from what is really there."""
        from wandb.proto import wandb_internal_pb2 as pb

        last: dict[str, int] = {}
        for f in sorted(self.logs.glob(f"*-{run_id}/run-{run_id}.wandb")):
            for data in _leveldb_log_records(f.read_bytes()):
                rec = pb.Record()  # type: ignore[attr-defined]
                try:
                    rec.ParseFromString(data)
                except Exception:  # a torn record at the end of a killed run's log
                    continue
                if rec.WhichOneof("record_type") != "history":
                    continue
                row = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                step_keys = sorted((k for k in row if k.endswith("/step")), key=len)
                if not step_keys:
                    continue
                prefix = step_keys[0][: -len("/step")]
                step = int(float(row[step_keys[0]]))
                for tag in row:
                    if tag.startswith(prefix + "/") and tag != step_keys[0]:
                        last[tag] = max(last.get(tag, -1), step)
        return last

    def log(self, prefix: str, tags: dict[str, float], step: int) -> None:
        # one step axis per prefix: a sub-trainer restarting at step 0, or a rollout line logged
        # at step + 1, would otherwise be dropped by W&B's single increasing step
        if prefix not in self.defined:
            self.run.define_metric(f"{prefix}/step", hidden=True)
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.defined.add(prefix)
        self.run.log({**tags, f"{prefix}/step": step})

    def finish(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        for k, v in summary.items():
            if isinstance(v, (bool, int, float, str)):
                self.run.summary[f"final/{k}"] = v
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_settings(settings_cls: Any) -> dict[str, Any]:
    """Quiet, no system-stats sampling, and the run log flushed every second (so a killed stage
    loses little); options this W&B version does not know are left out."""
    wanted = {
        "console": "off",
        "silent": True,
        "x_disable_stats": True,
        "x_transaction_log_flush_interval": 1.0,
    }
    known = getattr(settings_cls, "model_fields", None)
    return {k: v for k, v in wanted.items() if known is None or k in known}


def _leveldb_log_records(data: bytes) -> Iterator[bytes]:
    """The records of a W&B run log: a 7-byte file header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type 1 full / 2 first / 3 middle / 4 last); the
    LevelDB log format. Stops at the first zero header or a torn end."""
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pos += 7
        if (n == 0 and kind == 0) or pos + n > len(data):
            return
        pending += data[pos : pos + n]
        pos += n
        if kind in (1, 4):
            yield pending
            pending = b""


class _MLflow:
    name = "mlflow"

    def __init__(self, root: Path, stage: str, run_name: str, params: dict, state: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (root / "mlruns").resolve().as_uri()
            # MLflow 3 refuses file stores unless told; a local store is what we want offline
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("mlflow_run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmforge")
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
            run = self.client.create_run(
                exp_id, run_name=f"{run_name}/{stage}", tags={"lmforge.run": run_name, "lmforge.stage": stage}
            )
            run_id = state["mlflow_run_id"] = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:500]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
        self.run_id = run_id

    def log(self, prefix: str, tags: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in tags.items()])

    def finish(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        nums = scalars(summary)
        if nums:
            self.log("final", {f"final/{k}": v for k, v in nums.items()}, step)
        for k, v in summary.items():
            if isinstance(v, str):
                self.client.set_tag(self.run_id, f"final.{k}", v[:500])
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# ----------------------------------------------------------------------------- one stage
class StageTracking:
    """The trackers of one stage: opened by `track_stage`, fed by `MetricsWriter`."""

    def __init__(
        self,
        names: list[str],
        *,
        stage: str,
        stage_dir: Path,
        run_root: Path,
        run_name: str,
        config: dict,
        log: Callable[[str], None] = print,
    ):
        self.stage, self.dir, self.log = stage, Path(stage_dir), log
        self.state_path = self.dir / STATE_FILE
        self.state = _read_state(self.state_path)
        self.sent: dict[str, dict[str, int]] = self.state.setdefault("sent", {})
        self.summary: dict[str, Any] = {}
        self.held_back = 0
        self.last_step = 0
        params = flatten(config)
        self.backends: list[Any] = []
        for name in names:
            try:
                if name == "tensorboard":
                    self.backends.append(_TensorBoard(self.dir, stage, params, self.state))
                elif name == "wandb":
                    self.backends.append(_WandB(self.dir, stage, run_name, config, self.state))
                elif name == "mlflow":
                    self.backends.append(_MLflow(Path(run_root), stage, run_name, params, self.state))
            except Exception as e:  # a tracker must never cost the user their training run
                self.log(f"tracker {name} could not start ({type(e).__name__}: {e}); continuing without it")
        for b in self.backends:
            if b.name == "wandb" and b.resumed:
                try:
                    self.sent["wandb"] = b.logged_steps(self.state["wandb_id"])
                except Exception as e:  # an unreadable log: keep the steps we handed over
                    self.log(f"tracker wandb: could not read back its run log ({e}); steps may be missing")
                else:
                    self._catch_up()
        self._save_state()

    def _catch_up(self) -> None:
        """Send again the lines of the stage's `metrics.jsonl` that a killed process handed to a
        tracker but that never reached it (W&B writes its log from a buffer): the steps up to
        the checkpoint the stage resumes from are not replayed by training. `write` skips every
        step a tracker already holds, so the others receive nothing twice."""
        path = self.dir / "metrics.jsonl"
        if path.is_file():
            for rec in read_jsonl(path):
                self.write(self.stage, rec)

    def prefix_for(self, metrics_path: Path) -> str | None:
        """`<stage>` or `<stage>/<subfolder>` for a metrics file inside this stage's folder."""
        try:
            rel = Path(metrics_path).parent.resolve().relative_to(self.dir.resolve())
        except ValueError:
            return None
        return "/".join([self.stage, *rel.parts])

    def write(self, prefix: str, rec: dict) -> None:
        step = int(rec.get("step", 0))
        self.last_step = max(self.last_step, step)
        values = scalars(rec)
        if not values or not self.backends:
            return
        changed = False
        for b in list(self.backends):
            sent = self.sent.setdefault(b.name, {})
            tags = {}
            for k, v in values.items():
                tag = f"{prefix}/{k}"
                if step <= sent.get(tag, -1):  # replayed after a resume or rollback
                    self.held_back += 1
                    continue
                tags[tag] = v
            if not tags:
                continue
            try:
                b.log(prefix, tags, step)
            except Exception as e:
                self._drop(b, e)
                continue
            for tag in tags:
                sent[tag] = step
            changed = True
        if changed:
            self._save_state()

    def finish(self, failed: bool) -> None:
        for b in self.backends:
            try:
                b.finish(self.summary, self.last_step, failed)
            except Exception as e:
                self.log(f"tracker {b.name} could not finish ({type(e).__name__}: {e})")
        self.backends = []
        self._save_state()
        if self.held_back:
            self.log(
                f"trackers: {self.held_back} value(s) of steps they already held (replayed after a "
                f"resume or rollback) were not sent again; metrics.jsonl has every line"
            )

    def _drop(self, backend: Any, err: Exception) -> None:
        self.backends.remove(backend)
        self.log(
            f"tracker {backend.name} failed ({type(err).__name__}: {err}); turned off for the rest "
            f"of this stage (metrics.jsonl keeps every line)"
        )

    def _save_state(self) -> None:
        """Written after every line, so replaced atomically but not fsynced: a killed process
        cannot tear it (the rename is atomic and the page cache survives), and fsync would cost
        ~15 ms a line; after an OS crash at worst a few values are sent again."""
        tmp = self.state_path.with_name("." + STATE_FILE + ".tmp")
        with translate_storage_errors(self.state_path):
            tmp.write_text(json.dumps(self.state, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self.state_path)


def _read_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: unreadable tracker state ({e}); delete the file to start new tracker runs"
        ) from None
    return data if isinstance(data, dict) else {}


_ACTIVE: ContextVar[StageTracking | None] = ContextVar("lmforge_tracking", default=None)


@contextlib.contextmanager
def track_stage(
    run: RunSettings, stage: str, stage_cfg: BaseModel, stage_dir: Path, log: Callable[[str], None] = print
) -> Iterator[StageTracking | None]:
    """Open the `run.trackers` of a stage for the duration of the block, with the run settings
    and the stage's resolved config as hyperparameters; the caller puts the stage's summary
    metrics in `.summary` before leaving it. Yields None when no tracker is asked for."""
    if not run.trackers:
        yield None
        return
    check_installed(list(run.trackers))
    tracking = StageTracking(
        list(run.trackers),
        stage=stage,
        stage_dir=stage_dir,
        run_root=Path(run.root),
        run_name=run.name,
        config={"run": run.model_dump(mode="json"), stage: stage_cfg.model_dump(mode="json")},
        log=log,
    )
    token = _ACTIVE.set(tracking)
    failed = True
    try:
        yield tracking
        failed = False
    finally:
        _ACTIVE.reset(token)
        tracking.finish(failed)


class MetricsWriter:
    """Appends metric lines to a `metrics.jsonl` and copies their numbers to the open trackers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tracking = _ACTIVE.get()
        self.prefix = self.tracking.prefix_for(self.path) if self.tracking else None

    def write(self, rec: dict) -> None:
        append_jsonl(self.path, rec)
        if self.tracking is not None and self.prefix is not None:
            self.tracking.write(self.prefix, rec)
