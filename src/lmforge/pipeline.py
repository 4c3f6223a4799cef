"""The runner behind `lmforge run` and every stage subcommand.

The pipeline is the literal tuple `lmforge.stages.STAGES`. The runner computes each stage's
fingerprint (its resolved config, the run seed and, for each stage it reads -- for a stage that
uses the latest policy, every policy stage -- that stage's fingerprint and the digest of the
bytes it wrote, `artifacts.content_digest`, so a stage re-run upstream that produced other
bytes re-runs the stages made from the old ones), skips stages whose
manifest is complete with the same fingerprint, re-runs changed ones from scratch, and lets an
interrupted stage resume (its manifest says "running" with the same fingerprint; the stage
decides how, e.g. pretraining restores its last checkpoint). Every stage writes
`manifest.json` through `StageRecord`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
import yaml
from rich.markup import escape

from .artifacts import content_digest, record_artifacts, verify_stage
from .config import apply_overrides, load_yaml, pipeline_model, validate
from .errors import ArtifactError, ConfigError, LMForgeError
from .runlock import run_lock
from .runs import (
    MANIFEST,
    POLICY_STAGES,
    StageRecord,
    atomic_write_text,
    fingerprint,
    read_manifest,
    remove_stale_temps,
    storage_error,
    translate_storage_errors,
)
from .stages import STAGES, Stage, StageContext
from .stages.base import console, warnings_to_log
from .train.tracking import track_stage

CONFIG_DIR = Path(__file__).parent / "configs"
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
DEFAULT_CONFIG = "tiny"


# The validated pipeline config: a pydantic model built at run time from the stages' config
# classes (`config.pipeline_model`), so its fields are known to the runner, not to the checker.
PipelineConfig: TypeAlias = Any

REGISTRY: dict[str, Stage] = {s.name: s for s in STAGES}
ORDER: tuple[str, ...] = tuple(REGISTRY)


# ----------------------------------------------------------------------------- config
def resolve_config_path(name: str | None) -> Path:
    """A path to a YAML file, or the name of a pipeline shipped with lmforge (`tiny`)."""
    if name is None:
        name = DEFAULT_CONFIG
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        return p
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name!r} is neither a YAML file nor a shipped pipeline ({names})")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    stages = REGISTRY
    src = resolve_config_path(str(path) if path is not None else None)
    data = apply_overrides(load_yaml(src), list(overrides))
    model = pipeline_model({n: s.config_cls for n, s in stages.items()})
    cfg: PipelineConfig = validate(data, model, str(src) + (" (with overrides)" if overrides else ""))
    for name in cfg.stages or []:
        if name not in stages:
            raise ConfigError(f"{src}: stages: unknown stage {name!r}; known: {', '.join(ORDER)}")
    return cfg


def pipeline_stages(cfg: PipelineConfig) -> list[str]:
    return list(cfg.stages) if cfg.stages else [n for n in ORDER if n in REGISTRY]


# ----------------------------------------------------------------------------- running
def stage_inputs(name: str) -> list[str]:
    """The stages whose output `name` reads."""
    stage = REGISTRY[name]
    deps = list(stage.needs)
    if stage.uses_model:  # whichever policy stage ran last feeds this one
        deps += [n for n in ORDER if n in POLICY_STAGES and n not in deps and n != name]
    return deps


def stage_fingerprint(cfg: PipelineConfig, name: str) -> tuple[str, dict[str, str]]:
    inputs = {}
    for dep in stage_inputs(name):
        m = read_manifest(cfg.run.dir / dep)
        inputs[dep] = f"{m.get('fingerprint', 'missing')}:{content_digest(m)}" if m else "missing"
    fp = fingerprint(
        {
            "stage": name,
            "config": getattr(cfg, name).model_dump(mode="json"),
            "seed": cfg.run.seed,
            "inputs": inputs,
        }
    )
    return fp, inputs


def why_rerun(prev: dict, config: dict, inputs: dict[str, str]) -> str:
    """Why a stage whose last manifest is `prev` no longer matches its config and inputs."""
    old_config, old_inputs = prev.get("config") or {}, prev.get("inputs") or {}
    if old_config != config:
        keys = sorted(k for k in {*old_config, *config} if old_config.get(k) != config.get(k))
        return f"its config changed ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
    changed = [d for d, v in inputs.items() if old_inputs.get(d) != v]
    if changed:
        return f"its input{'s' if len(changed) > 1 else ''} {', '.join(changed)} changed"
    return "its fingerprint changed (run.seed)"


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached | failed
    seconds: float
    metrics: dict
    dir: Path


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _wait_for_rank0(stage_dir: Path, fp: str, complete: bool, timeout: float = 24 * 3600) -> dict:
    """Non-zero ranks: wait until rank 0 has started (or finished) the stage with this fingerprint."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = read_manifest(stage_dir)
        if m and m.get("fingerprint") == fp:
            if m.get("status") == "failed":
                raise LMForgeError(f"stage {stage_dir.name} failed on rank 0: {m.get('error')}")
            if m.get("status") == "complete" or (not complete and m.get("status") == "running"):
                return m
        time.sleep(0.2)
    raise LMForgeError(f"timed out waiting for rank 0 to run stage {stage_dir.name}")


@contextlib.contextmanager
def _sigterm_interrupts():
    """Treat SIGTERM like Ctrl-C while a stage runs: the stage unwinds (atomic writers drop
    their temporary files), its manifest records "interrupted" and the CLI exits with 130;
    running the same command again resumes. The training engine installs its own handlers
    for both signals (finish the step, checkpoint, stop) for the duration of a fit."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- integrity hooks
def _writer_lock(cfg: PipelineConfig, what: str) -> contextlib.AbstractContextManager:
    """The run directory's lock for a command that writes to it; under torchrun only rank 0
    takes it (the other ranks follow rank 0's manifests)."""
    if _rank() > 0:
        return contextlib.nullcontext()
    command = " ".join(["lmforge", *sys.argv[1:]]) if sys.argv[1:] else f"lmforge {what}"
    return run_lock(cfg.run.dir, command)


def _outputs_intact(stage_dir: Path, manifest: dict, name: str) -> bool:
    """A finished stage's recorded files are unchanged; when not, say so (it is then re-run)."""
    try:
        verify_stage(stage_dir, manifest)
        return True
    except ArtifactError as e:
        console.print(f"[yellow]{name}[/yellow]: {escape(str(e))}; running the stage again")
        return False


def run_stage(cfg: PipelineConfig, name: str, force: bool = False) -> StageOutcome:
    with _writer_lock(cfg, name):
        return _run_stage(cfg, name, force)


def _run_stage(cfg: PipelineConfig, name: str, force: bool = False) -> StageOutcome:
    stage = REGISTRY[name]
    run_dir = cfg.run.dir
    stage_dir = run_dir / name
    fp, inputs = stage_fingerprint(cfg, name)
    rank = _rank()
    if rank > 0:  # under torchrun: rank 0 owns the run directory
        m = _wait_for_rank0(stage_dir, fp, complete=not stage.distributed)
        if not stage.distributed or m.get("status") == "complete":
            return StageOutcome(name, "ran on rank 0", m.get("seconds", 0.0), m.get("metrics", {}), stage_dir)
        record = StageRecord(stage_dir, name, {}, fingerprint=fp, inputs=inputs, write=False)
        ctx = StageContext(
            name, getattr(cfg, name), cfg, run_dir, stage_dir, record, run_dir / f"log.rank{rank}.txt", ORDER
        )
        t0 = time.time()
        metrics = stage.fn(ctx) or {}
        return StageOutcome(name, "ran", time.time() - t0, metrics, stage_dir)
    prev = read_manifest(stage_dir)
    if prev and prev.get("status") == "complete" and prev.get("fingerprint") == fp and not force:
        if not _outputs_intact(stage_dir, prev, name):
            return _run_stage(cfg, name, force=True)
        return StageOutcome(name, "cached", prev.get("seconds", 0.0), prev.get("metrics", {}), stage_dir)
    stage_cfg = getattr(cfg, name)
    with translate_storage_errors(stage_dir):
        if stage_dir.exists() and (force or not prev or prev.get("fingerprint") != fp):
            if prev and prev.get("fingerprint") != fp:
                why = why_rerun(prev, stage_cfg.model_dump(mode="json"), inputs)
                console.print(f"re-running [yellow]{name}[/yellow]: {escape(why)}; starting the stage over")
            shutil.rmtree(stage_dir)
        elif prev and prev.get("status") != "complete":
            for junk in remove_stale_temps(stage_dir):  # left by a killed writer of the same stage
                console.print(f"[dim]{name}: removed leftover temporary {junk.relative_to(stage_dir)}[/dim]")
        stage_dir.mkdir(parents=True, exist_ok=True)
        record = StageRecord(
            stage_dir, name, stage_cfg.model_dump(mode="json"), fingerprint=fp, inputs=inputs
        )
    ctx = StageContext(name, stage_cfg, cfg, run_dir, stage_dir, record, run_dir / "log.txt", ORDER)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    console.rule(f"[bold]{name}[/bold]  [dim]{stage.help}[/dim]")
    t0 = time.time()
    completed = False
    try:
        with (
            _sigterm_interrupts(),
            warnings_to_log(ctx.log),
            track_stage(cfg.run, name, stage_cfg, stage_dir, ctx.log) as tracking,
        ):
            metrics = stage.fn(ctx) or {}
            if tracking is not None:
                tracking.summary = metrics
            record.metrics.update(metrics)
            record.complete(record_artifacts(stage_dir))
            completed = True
    except LMForgeError as e:
        record.fail(str(e))
        raise
    except KeyboardInterrupt:
        if not completed:  # an interrupt just after the manifest said "complete" keeps it so
            record.fail("interrupted")
        raise
    except OSError as e:
        # a write outside the atomic helpers (EACCES is left alone: it may come from reading input)
        err = storage_error(e, e.filename or stage_dir) if e.errno in _WRITE_ERRNOS else None
        record.fail(str(err or "".join(traceback.format_exception_only(type(e), e)).strip()))
        if err is not None:
            raise err from e
        raise
    except Exception as e:  # a bug: keep the traceback in the manifest and re-raise
        record.fail("".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    return StageOutcome(name, "ran", time.time() - t0, record.metrics, stage_dir)


def run_pipeline(
    cfg: PipelineConfig, only: list[str] | None = None, force: bool = False
) -> list[StageOutcome]:
    with _writer_lock(cfg, "run"):
        return _run_pipeline(cfg, only, force)


def _run_pipeline(cfg: PipelineConfig, only: list[str] | None, force: bool) -> list[StageOutcome]:
    names = pipeline_stages(cfg)
    if only:
        bad = [n for n in only if n not in REGISTRY]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; known: {', '.join(ORDER)}")
        names = [n for n in names if n in only] or list(only)
    run_dir = cfg.run.dir
    with translate_storage_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        atomic_write_text(
            run_dir / "pipeline.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
    outcomes = []
    with _sigterm_interrupts():  # between stages too: a SIGTERM is an interrupt, never a hard kill
        for name in names:
            outcomes.append(run_stage(cfg, name, force=force))
    return outcomes


def stale_reason(cfg: PipelineConfig, name: str, manifest: dict, stale: Sequence[str] = ()) -> str | None:
    """Why `lmforge run` would re-run a stage recorded by `manifest`, or None if it would not
    (status aside: a stage that is not complete always runs). `stale`: stages already found
    stale, whose re-run re-runs this one when it reads them."""
    if name not in REGISTRY:
        return None
    upstream = [d for d in stage_inputs(name) if d in stale]
    if upstream:
        return f"its input{'s' if len(upstream) > 1 else ''} {', '.join(upstream)} will be re-run"
    fp, inputs = stage_fingerprint(cfg, name)
    if manifest.get("fingerprint") == fp:
        return None
    return why_rerun(manifest, getattr(cfg, name).model_dump(mode="json"), inputs)


def stage_status(run_dir: Path) -> dict[str, dict]:
    out = {}
    for d in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []:
        if (d / MANIFEST).exists():
            out[d.name] = read_manifest(d) or {}
    return out
