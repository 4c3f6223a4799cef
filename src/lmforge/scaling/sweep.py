"""`lmforge scaling sweep`: train a grid of small models with the real pipeline, then fit laws.

A scaling law is only as good as the runs under it, so the runs come from the same `pretrain`
stage as every other model (same engine, data, tokenizer, eval), not from a toy loop:

1. **Plan.** Model sizes are shapes `DxL` (d_model x n_layers; heads = d_model / head_dim, so
   head_dim stays fixed, multi-head attention, SwiGLU width by the 8/3 rule) or `DxLxH`, or
   mappings of `ModelConfig` fields in a YAML spec. The grid is sizes x token budgets
   (`--tokens`) or sizes x IsoFLOP budgets (`--isoflops`, `D = C / 6N`, N counted as `pretrain`
   counts it: all parameters, with the tokenizer's vocabulary). A point trains
   `max_steps = round(D / (batch_size x grad_accum x seq_len))` steps.
2. **Hyper-parameters per point.** The config (with its overrides) is the reference: its
   `pretrain.model` gives head_dim and the fields a size does not set, its `lr` and `d_model`
   anchor the LR rule, its batch, seq_len, eval and checkpoint settings apply to every point;
   its `max_steps` is replaced by each point's budget. Peak LR
   `lr x (d_ref / d_model)^lr_width_exp` (exponent 0.5 by default, between muP's 1/width for
   Adam's hidden weights and one LR for all; the best exponent differs by corpus and vocabulary,
   see docs/scaling.md), and a WSD
   schedule (warmup, flat, linear decay to 0 over the last 20%), which anneals every run at its
   own length (Hägele et al. 2024, arXiv:2405.18392). Warmup and LR depend on the size only
   (warmup = min(warmup_steps, warmup_fraction x the size's longest run, half its shortest)),
   so with the same seed and data order the runs of one size share warmup and stable phase and
   differ only in where their decay starts: loss vs D is not blurred by warmup noise. Eval only
   at the end. Overrides of `pretrain.schedule`, `decay_fraction`, `min_lr_ratio`, `eval_every`
   win over these.
3. **Shared data.** `data` and `tokenizer` run once in the config's run directory
   (`run.root/run.name`), cached there like `lmforge run`. Each point `OUT/<point>/` gets hard
   links (copies across file systems) of those stage folders, manifests included, so the
   pipeline sees them complete with the same fingerprints; then `pretrain` runs with
   `run.root=OUT run.name=<point>`.
4. **Resume.** A completed point is skipped by the pipeline's own manifest check; an interrupted
   one resumes from its last checkpoint; a changed base (new data or tokenizer) re-links and
   retrains. Run the same command again after a crash or Ctrl-C.
5. **Collect and fit.** `load_runs` on the points gives `OUT/runs.csv` (the IsoFLOP budget in its
   `budget` column; the LR as `peak_lr`, deliberately not `lr`: the sweep derives LR from width,
   it does not search it, so an `lr_opt(C)` law from it would only restate the rule); then
   `lmforge scaling fit OUT/runs.csv --out OUT` writes `fit.json` and the plots. Each point's
   `pretrain/manifest.json` also gets `metrics.budget`, `metrics.batch_tokens`, `metrics.lr` and
   `metrics.sweep`, as `scaling fit` expects of a sweep.

On a GPU the same command scales up: `run.device=auto` picks CUDA and bf16; give larger sizes,
budgets and `pretrain.batch_size`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LMForgeError
from lmforge.scaling.fitting import cmd_fit
from lmforge.scaling.outliers import DEFAULT_K
from lmforge.scaling.sweep_plan import (  # noqa: F401  (re-exported)
    POINT_DEFAULTS,
    REFUSED_KEYS,
    SPEC_KEYS,
    SweepPoint,
    SweepSpec,
    _plan_notes,
    plan_points,
    point_overrides,
)
from lmforge.scaling.sweep_print import print_plan, print_results, print_sweep_notes


# ----------------------------------------------------------------------------- running
def _link_tree(src: Path, dst: Path) -> None:
    """Copy a stage folder as hard links (a copy where links fail), manifest last, so a crash
    mid-way never leaves a folder that claims to be complete."""

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
        return d

    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(
        src,
        dst,
        copy_function=link_or_copy,
        ignore=lambda d, names: ["manifest.json"] if Path(d) == src else [],
    )
    link_or_copy(src / "manifest.json", dst / "manifest.json")


def _fingerprint(stage_dir: Path) -> str | None:
    from lmforge.runs import read_manifest

    m = read_manifest(stage_dir)
    return m.get("fingerprint") if m and m.get("status") == "complete" else None


def _annotate_manifest(stage_dir: Path, point: SweepPoint, batch_tokens: int) -> dict:
    """Add the sweep's fields to a completed pretrain manifest (fingerprint untouched)."""
    from lmforge.runs import atomic_write_json, read_manifest

    m = read_manifest(stage_dir) or {}
    metrics = m.setdefault("metrics", {})
    extra = {
        "budget": point.budget,
        "batch_tokens": batch_tokens,
        "lr": point.lr,
        "sweep": {
            "point": point.name,
            "d_model": point.model["d_model"],
            "n_layers": point.model["n_layers"],
            "n_heads": point.model["n_heads"],
            "warmup_steps": point.warmup_steps,
        },
    }
    extra = {k: v for k, v in extra.items() if v is not None}
    if any(metrics.get(k) != v for k, v in extra.items()):
        metrics.update(extra)
        atomic_write_json(stage_dir / "manifest.json", m)
    return metrics


@dataclass
class SweepResult:
    out: Path
    points: list[SweepPoint]
    runs_csv: Path | None = None
    fit: dict | None = None  # fit.json contents
    fit_error: str | None = None
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_sweep(
    config: str | Path | None,
    overrides: list[str],
    spec: SweepSpec,
    out: str | Path,
    *,
    fit: bool = True,
    plots: bool = True,
    bootstrap: int = 200,
    seed: int = 0,
    dry_run: bool = False,
    jobs: int = 1,
) -> SweepResult:
    """Plan, train (skipping completed points), collect into OUT/runs.csv and fit into OUT."""
    from lmforge.pipeline import console, load_config, run_stage, stage_fingerprint

    t0 = time.time()
    out = Path(out)
    overrides = list(overrides)
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in REFUSED_KEYS:
            raise ConfigError(f"override {o!r}: a sweep trains every point from scratch; remove {key}")
    cfg = load_config(config, overrides)
    base = cfg.run.dir
    if out.resolve() == base.resolve() or base.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} must not be inside the base run directory {base}")
    points = plan_points(cfg, spec, cfg.tokenizer.vocab_size)  # validates before any work
    notes: list[str] = []
    if not dry_run:
        base.mkdir(parents=True, exist_ok=True)
        console.rule(f"[bold]sweep[/bold]  [dim]shared data and tokenizer in {base}[/dim]")
        for stage in ("data", "tokenizer"):
            outcome = run_stage(cfg, stage)
            console.print(
                f"{stage}: "
                + ("complete, reused" if outcome.status == "cached" else f"ran in {outcome.seconds:.1f}s")
            )
    tok = read_json(base / "tokenizer" / "manifest.json")
    if tok.get("status") == "complete":  # the real vocabulary and corpus size
        m = tok.get("metrics") or {}
        points = plan_points(
            cfg, spec, int(m.get("vocab_size") or cfg.tokenizer.vocab_size), m.get("train_tokens")
        )
    notes += _plan_notes(points)
    pt = cfg.pretrain
    batch_tokens = pt.batch_size * pt.grad_accum * pt.seq_len
    print_plan(points, spec, batch_tokens, cfg)
    res = SweepResult(out=out, points=points, notes=notes)
    if dry_run:
        print_sweep_notes(notes)
        return res
    out.mkdir(parents=True, exist_ok=True)
    fps = {s: _fingerprint(base / s) for s in ("data", "tokenizer")}
    todo = []
    for p in points:
        run_dir = out / p.name
        for s in ("data", "tokenizer"):
            if _fingerprint(run_dir / s) != fps[s]:
                run_dir.mkdir(parents=True, exist_ok=True)
                _link_tree(base / s, run_dir / s)
        pcfg = load_config(config, point_overrides(p, out, overrides))
        if _fingerprint(run_dir / "pretrain") == stage_fingerprint(pcfg, "pretrain")[0]:
            p.status = "cached"
        else:
            todo.append((p, pcfg))
    done = len(points) - len(todo)
    if done:
        console.print(f"{done} of {len(points)} point(s) already complete; skipped")
    if jobs > 1 and len(todo) > 1:
        # longest first, so that the last job to finish is a short one
        _run_parallel(
            sorted((p for p, _ in todo), key=lambda p: -p.flops_6nd),
            out,
            config,
            overrides,
            jobs,
            len(points),
        )
        todo = []
    _train_in_turn(todo, done, len(points), out)
    for p in points:
        metrics = _annotate_manifest(out / p.name / "pretrain", p, batch_tokens)
        p.seconds, p.val_loss = metrics.get("train_seconds"), metrics.get("val_loss")
    res.runs_csv = collect(out, points)
    print_results(points)
    if fit:
        try:
            res.fit = fit_runs(res.runs_csv, out, plots=plots, bootstrap=bootstrap, seed=seed)
        except LMForgeError as e:
            res.fit_error = str(e)
            (out / "fit.json").unlink(missing_ok=True)  # never leave an older sweep's fit behind
    res.wall_seconds = time.time() - t0
    _write_summary(res, config, overrides, spec, cfg)
    print_sweep_notes(notes)
    return res


def _train_in_turn(todo: list, done: int, total: int, out: Path) -> None:
    """Train the pending points one after another in this process (``--jobs 1``)."""
    from lmforge.pipeline import console, run_pipeline
    from lmforge.train.outcomes import TrainingStopped

    for i, (p, pcfg) in enumerate(todo, done + 1):
        console.rule(
            f"[bold]sweep {i}/{total}: {p.name}[/bold]  [dim]N={p.params:,}  "
            f"D={p.tokens:,}  {p.steps} steps  lr {p.lr:g}[/dim]"
        )
        try:
            run_pipeline(pcfg, only=["pretrain"])
        except TrainingStopped as e:
            if "signal" in str(e):
                raise
            raise LMForgeError(f"sweep point {p.name} ({out / p.name}) failed: {e}") from None
        except LMForgeError as e:
            raise LMForgeError(
                f"sweep point {p.name} ({out / p.name}) failed: {e}. Fix the cause and run "
                f"the same command again: completed points are skipped"
            ) from None
        p.status = "ran"


def _run_parallel(
    points: list[SweepPoint], out: Path, config, overrides: list[str], jobs: int, total: int
) -> None:
    """Train points in `jobs` child processes (`lmforge run --only pretrain`), each with
    cpu_count / jobs torch threads unless run.threads is set: on a small CPU, two 1-thread
    trainings of tiny models beat one 2-thread training. Logs go to OUT/<point>/sweep.log."""
    import signal
    import subprocess
    import sys

    from lmforge.pipeline import console

    threads = max(1, (os.cpu_count() or 1) // jobs)
    set_threads = any(o.split("=", 1)[0].strip() == "run.threads" for o in overrides)
    running: list[tuple[SweepPoint, subprocess.Popen, io.TextIOWrapper, float]] = []
    failed: list[str] = []
    queue, n = list(points), total - len(points)
    env = dict(os.environ)
    if not set_threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def on_term(signum, frame):  # a killed sweep stops its children too (they checkpoint)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or running:
            while queue and len(running) < jobs and not failed:
                p = queue.pop(0)
                n += 1
                cmd = [
                    sys.executable,
                    "-m",
                    "lmforge.cli",
                    "run",
                    "--only",
                    "pretrain",
                    *([str(config)] if config else []),
                    *point_overrides(p, out, overrides),
                    *([] if set_threads else [f"run.threads={threads}"]),
                ]
                log = open(out / p.name / "sweep.log", "w", encoding="utf-8")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((p, proc, log, time.time()))
                console.print(
                    f"sweep {n}/{total}: started {p.name} (N={p.params:,}, D={p.tokens:,}, "
                    f"{p.steps} steps, lr {p.lr:g}); log {out / p.name / 'sweep.log'}"
                )
            time.sleep(0.5)
            for item in list(running):
                p, proc, log, t_start = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode == 0:
                    p.status = "ran"
                    m = read_json(out / p.name / "pretrain" / "manifest.json").get("metrics", {})
                    console.print(
                        f"  {p.name}: done in {time.time() - t_start:.0f} s, "
                        f"val loss {m.get('val_loss', float('nan')):.4f}"
                    )
                else:
                    tail = (out / p.name / "sweep.log").read_text(errors="replace").strip().splitlines()[-3:]
                    failed.append(f"{p.name} (exit {proc.returncode}): {' / '.join(tail)}")
                    if queue:
                        console.print(f"  {p.name} failed; finishing the running points, starting no more")
    except KeyboardInterrupt:
        for p, proc, log, _ in running:  # SIGTERM: the trainer checkpoints and stops
            proc.terminate()
        for p, proc, log, _ in running:
            proc.wait()
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if failed:
        raise LMForgeError(
            f"sweep point(s) failed: {'; '.join(failed)}. Fix the cause and run the same "
            "command again: completed points are skipped, interrupted ones resume"
        )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- collect + fit
CSV_COLUMNS = (
    "name",
    "d_model",
    "n_layers",
    "n_heads",
    "params",
    "non_embedding_params",
    "tokens",
    "steps",
    "batch_tokens",
    "peak_lr",
    "warmup_steps",
    "budget",
    "flops",
    "val_loss",
    "train_loss",
    "val_bpb",
    "train_seconds",
)


def collect(out: Path, points: list[SweepPoint]) -> Path:
    """Read the points' manifests with `load_runs` (which validates them) into OUT/runs.csv."""
    from lmforge.runs import atomic_write_text
    from lmforge.scaling.laws import load_runs

    table = load_runs([out / p.name for p in points])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for p, r in zip(points, table.runs):
        m = read_json(out / p.name / "pretrain" / "manifest.json").get("metrics", {})
        w.writerow(
            {
                "name": r.name,
                "d_model": p.model["d_model"],
                "n_layers": p.model["n_layers"],
                "n_heads": p.model["n_heads"],
                "params": int(r.n),
                "non_embedding_params": m.get("non_embedding_params"),
                "tokens": int(r.d),
                "steps": m.get("steps"),
                "batch_tokens": m.get("batch_tokens"),
                "peak_lr": p.lr,
                "warmup_steps": p.warmup_steps,
                "budget": "" if r.budget is None else f"{r.budget:g}",
                "flops": f"{r.compute:.6g}",
                "val_loss": f"{r.loss:.6g}",
                "train_loss": _g(m.get("train_loss")),
                "val_bpb": _g(m.get("val_bpb")),
                "train_seconds": m.get("train_seconds"),
            }
        )
    path = out / "runs.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def _g(x: Any) -> str:
    return "" if x is None else f"{x:.6g}"


def fit_runs(
    runs_csv: Path, out: Path, *, plots: bool = True, bootstrap: int = 200, seed: int = 0, n_starts: int = 16
) -> dict:
    """`lmforge scaling fit RUNS_CSV --out OUT` (its tables printed, fit.json and plots written)."""
    args = argparse.Namespace(
        inputs=[str(runs_csv)],
        out=str(out),
        bootstrap=bootstrap,
        n_starts=n_starts,
        seed=seed,
        group_tol=0.25,
        drop_invalid=False,
        no_plots=not plots,
        json=False,
        outlier_k=DEFAULT_K,
        drop_outliers=False,
    )
    cmd_fit(args)
    return read_json(out / "fit.json")


def _write_summary(res: SweepResult, config, overrides, spec: SweepSpec, cfg) -> None:
    from lmforge.runs import atomic_write_json

    atomic_write_json(
        res.out / "sweep.json",
        {
            "config": str(config or "tiny"),
            "overrides": overrides,
            "spec": asdict(spec),
            "base_run": str(cfg.run.dir),
            "mode": spec.mode,
            "points": [{**asdict(p), "flops_6nd": p.flops_6nd} for p in res.points],
            "wall_seconds": round(res.wall_seconds, 1),
            "train_seconds": round(sum(p.seconds or 0 for p in res.points if p.status == "ran"), 1),
            "runs_csv": str(res.runs_csv) if res.runs_csv else None,
            "fit": str(res.out / "fit.json") if res.fit else None,
            "fit_error": res.fit_error,
            "notes": res.notes,
        },
    )
