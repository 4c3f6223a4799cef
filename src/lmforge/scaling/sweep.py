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
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LMForgeError
from lmforge.scaling.flops import parse_quantity

SPEC_KEYS = ("sizes", "tokens", "isoflops", "head_dim", "lr_width_exp", "warmup_fraction")
# Train settings the sweep picks for every point unless the user overrides them.
POINT_DEFAULTS = {"schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0, "eval_every": 0}
# The sweep trains every point from scratch; continued pretraining would ignore the shapes.
REFUSED_KEYS = ("pretrain.init_from",)
FEW_STEPS = 20
EMBEDDING_HEAVY = 2 / 3  # share of N in the embedding table above which a size gets a note


# ----------------------------------------------------------------------------- spec
@dataclass
class SweepSpec:
    """What to sweep. `sizes`: "DxL" / "DxLxH" strings or dicts of ModelConfig fields;
    exactly one of `tokens` (grid) or `isoflops` (compute budgets, FLOPs = 6ND)."""

    sizes: list[Any] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    isoflops: list[float] = field(default_factory=list)
    head_dim: int | None = None  # default: the config's d_model / n_heads
    lr_width_exp: float = 0.5  # LR ~ width^-0.5; 1 = muP-style 1/width; 0 = one LR
    warmup_fraction: float = 0.1

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        from lmforge.config import load_yaml

        data = load_yaml(path)
        bad = sorted(set(data) - set(SPEC_KEYS))
        if bad:
            raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(bad)}; known: {', '.join(SPEC_KEYS)}")
        for key in ("sizes", "tokens", "isoflops"):
            if key in data and not isinstance(data[key], list):
                data[key] = _split_list(str(data[key]))
        return cls(**data)

    @property
    def mode(self) -> str:
        return "isoflop" if self.isoflops else "grid"


def _split_list(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def _quantities(items: list[Any], what: str) -> list[float]:
    out = []
    for it in items:
        v = parse_quantity(it)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{what}: {it!r} must be a positive number")
        if v in out:
            raise ConfigError(f"{what}: {it!r} is listed twice")
        out.append(v)
    return sorted(out)


def _shape(item: Any, head_dim: int) -> tuple[str, dict]:
    """(label, ModelConfig fields) of one size entry."""
    if isinstance(item, dict):
        fields = dict(item)
        label = str(fields.pop("name", "") or "")
        if "d_model" not in fields or "n_layers" not in fields:
            raise ConfigError(f"sizes: {item!r} needs d_model and n_layers")
    else:
        parts = str(item).lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3) or min(nums) < 1:
            raise ConfigError(
                f"sizes: {item!r} is not a shape; write d_model x n_layers (e.g. 64x2) "
                f"or d_model x n_layers x n_heads (e.g. 64x2x4)"
            )
        fields = {"d_model": nums[0], "n_layers": nums[1]}
        if len(nums) == 3:
            fields["n_heads"] = nums[2]
        label = ""
    d = int(fields["d_model"])
    if "n_heads" not in fields:
        if d % head_dim:
            raise ConfigError(
                f"sizes: d_model {d} is not a multiple of head_dim {head_dim}; pick "
                f"widths that are, set --head-dim, or give heads as {d}x{fields['n_layers']}xH"
            )
        fields["n_heads"] = d // head_dim
    fields.setdefault("n_kv_heads", None)  # multi-head attention at every size
    fields.setdefault("d_ff", None)  # 8/3 d_model, rounded to 64
    name = label or (
        f"d{d}-l{fields['n_layers']}"
        + (f"-h{fields['n_heads']}" if head_dim * fields["n_heads"] != d else "")
    )
    return name, fields


# ----------------------------------------------------------------------------- plan
@dataclass
class SweepPoint:
    name: str
    model: dict  # ModelConfig fields set by the sweep
    params: int  # N, all parameters (as `pretrain` reports them)
    non_embedding_params: int
    steps: int
    tokens: int  # D actually trained: steps x tokens per step
    lr: float
    warmup_steps: int
    budget: float | None = None  # IsoFLOP compute budget (6ND) of its group
    epochs: float | None = None  # passes over the training split (None before the tokenizer ran)
    status: str = "planned"  # planned | ran | cached
    val_loss: float | None = None
    seconds: float | None = None

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.params * self.tokens


def _fmt_num(x: float, tokens: bool) -> str:
    if tokens:
        for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
            if x >= div:
                return f"{x / div:.3g}{suf}"
        return f"{x:.0f}"
    m, e = f"{x:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def plan_points(
    cfg: Any, spec: SweepSpec, vocab_size: int, train_tokens: int | None = None
) -> list[SweepPoint]:
    """The sweep's points for a resolved pipeline config; raises ConfigError on a bad grid."""
    from lmforge.model.config import ModelConfig

    if not spec.sizes:
        raise ConfigError(
            "the sweep has no model sizes: give --sizes (e.g. 64x2,96x3,128x4) or `sizes:` in the spec"
        )
    if bool(spec.tokens) == bool(spec.isoflops):
        raise ConfigError(
            "give token budgets (--tokens 1M,2M,4M) or IsoFLOP compute budgets "
            "(--isoflops 1e12,3e12), exactly one of them, with at least one value"
        )
    if not (0 <= spec.warmup_fraction < 1) or spec.lr_width_exp < 0:
        raise ConfigError("warmup_fraction must be in [0, 1) and lr_width_exp >= 0")
    pt = cfg.pretrain
    head_dim = spec.head_dim or pt.model.head_dim
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} must be even (RoPE) and >= 2")
    budgets = _quantities(spec.isoflops or spec.tokens, "isoflops" if spec.isoflops else "tokens")
    tokens_per_step = pt.batch_size * pt.grad_accum * pt.seq_len
    shapes, seen = [], set()
    for item in spec.sizes:
        name, fields = _shape(item, head_dim)
        if name in seen:
            raise ConfigError(f"sizes: {name} is listed twice")
        seen.add(name)
        base = pt.model.model_dump()
        base.update(fields, vocab_size=vocab_size, max_seq_len=pt.seq_len)
        try:
            mcfg = ModelConfig(**base)
        except Exception as e:  # pydantic ValidationError: report the shape, not a traceback
            errors = e.errors() if hasattr(e, "errors") else [{"msg": str(e)}]
            msg = "; ".join(x["msg"] for x in errors)
            raise ConfigError(f"sizes: {name}: invalid model shape ({msg})") from None
        shapes.append((name, fields, mcfg))
    shapes.sort(key=lambda s: s[2].param_count())
    n_max = shapes[-1][2].param_count()
    per_size = 6.0 * n_max if spec.isoflops else 1.0
    if budgets[0] / per_size < tokens_per_step / 2:
        what = (
            f"IsoFLOP budget {budgets[0]:.3g} gives the largest size {shapes[-1][0]} (N={n_max:,}) "
            f"D = C/6N = {budgets[0] / per_size:,.0f} tokens"
            if spec.isoflops
            else f"token budget {budgets[0]:,.0f}"
        )
        raise ConfigError(
            f"{what}, less than one training step of {tokens_per_step:,} tokens "
            f"(batch_size {pt.batch_size} x grad_accum {pt.grad_accum} x seq_len "
            f"{pt.seq_len}); raise it to at least {tokens_per_step * per_size:.3g} "
            f"(better 20+ steps) or lower pretrain.batch_size / pretrain.seq_len"
        )

    def steps_for(budget: float, n: int) -> int:
        return max(1, int(round((budget / (6.0 * n) if spec.isoflops else budget) / tokens_per_step)))

    points = []
    for budget in budgets:
        for name, fields, mcfg in shapes:
            n = mcfg.param_count()
            steps = steps_for(budget, n)
            # One warmup and peak LR per size, whatever the budget: with the same seed and data
            # order, the runs of a size then share their warmup and stable phase and differ only
            # in where the WSD decay starts, so loss vs D is not blurred by warmup noise.
            all_steps = [steps_for(b, n) for b in budgets]
            warmup = min(
                pt.warmup_steps, int(round(spec.warmup_fraction * max(all_steps))), min(all_steps) // 2
            )
            lr = pt.lr * (pt.model.d_model / mcfg.d_model) ** spec.lr_width_exp
            label = f"c{_fmt_num(budget, False)}" if spec.isoflops else f"t{_fmt_num(budget, True)}"
            tokens = steps * tokens_per_step
            points.append(
                SweepPoint(
                    name=f"{name}-{label}",
                    model=fields,
                    params=n,
                    non_embedding_params=mcfg.non_embedding_params(),
                    steps=steps,
                    tokens=tokens,
                    lr=float(f"{lr:.4g}"),
                    warmup_steps=warmup,
                    budget=budget if spec.isoflops else None,
                    epochs=tokens / train_tokens if train_tokens else None,
                )
            )
    return points


def point_overrides(point: SweepPoint, out: Path, user_overrides: list[str]) -> list[str]:
    """Dotted overrides that turn the base config into this point's config."""
    user_keys = {o.split("=", 1)[0].strip() for o in user_overrides}
    ov = [
        f"run.root={json.dumps(str(out))}",
        f"run.name={point.name}",
        f"pretrain.max_steps={point.steps}",
        f"pretrain.lr={point.lr}",
        f"pretrain.warmup_steps={point.warmup_steps}",
    ]
    ov += [f"pretrain.model.{k}={json.dumps(v)}" for k, v in point.model.items()]
    ov += [
        f"pretrain.{k}={json.dumps(v)}" for k, v in POINT_DEFAULTS.items() if f"pretrain.{k}" not in user_keys
    ]
    return list(user_overrides) + ov


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
    from lmforge.pipeline import console, load_config, run_pipeline, run_stage, stage_fingerprint
    from lmforge.train.engine import TrainingStopped

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
            o = run_stage(cfg, stage)
            console.print(
                f"{stage}: " + ("complete, reused" if o.status == "cached" else f"ran in {o.seconds:.1f}s")
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
    _print_plan(points, spec, batch_tokens, cfg)
    res = SweepResult(out=out, points=points, notes=notes)
    if dry_run:
        _print_notes(notes)
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
    for i, (p, pcfg) in enumerate(todo, done + 1):
        console.rule(
            f"[bold]sweep {i}/{len(points)}: {p.name}[/bold]  [dim]N={p.params:,}  "
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
    for p in points:
        metrics = _annotate_manifest(out / p.name / "pretrain", p, batch_tokens)
        p.seconds, p.val_loss = metrics.get("train_seconds"), metrics.get("val_loss")
    res.runs_csv = collect(out, points)
    _print_results(points)
    if fit:
        try:
            res.fit = fit_runs(res.runs_csv, out, plots=plots, bootstrap=bootstrap, seed=seed)
        except LMForgeError as e:
            res.fit_error = str(e)
            (out / "fit.json").unlink(missing_ok=True)  # never leave an older sweep's fit behind
    res.wall_seconds = time.time() - t0
    _write_summary(res, config, overrides, spec, cfg)
    _print_notes(notes)
    return res


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
    queue, running, failed, n = list(points), [], [], total - len(points)
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


def _plan_notes(points: list[SweepPoint]) -> list[str]:
    notes = []
    few = [p.name for p in points if p.steps < FEW_STEPS]
    if few:
        notes.append(
            f"{len(few)} point(s) train fewer than {FEW_STEPS} steps ({', '.join(few[:4])}"
            f"{', ...' if len(few) > 4 else ''}): their loss is mostly warmup and noisy; "
            "raise the budgets or lower pretrain.batch_size"
        )
    rep = [p for p in points if p.epochs and p.epochs > 1.0]
    if rep:
        worst = max(rep, key=lambda p: p.epochs)
        notes.append(
            f"{len(rep)} point(s) repeat the training data (up to {worst.epochs:.1f} epochs, "
            f"{worst.name}); up to ~4 epochs costs little (Muennighoff et al. 2023, "
            "arXiv:2305.16264), beyond that the law bends"
        )
    heavy = {
        p.name.rsplit("-", 1)[0]: 1 - p.non_embedding_params / p.params
        for p in points
        if p.non_embedding_params < (1 - EMBEDDING_HEAVY) * p.params
    }
    if heavy:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in list(heavy.items())[:4])
        notes.append(
            f"{len(heavy)} size(s) are mostly embedding table ({shares} of N): their loss "
            "depends on the vocabulary more than on N, which can make loss non-monotone "
            "in N and the N term of the fit degenerate; use wider sizes or a smaller "
            "tokenizer.vocab_size (see docs/scaling.md, Sweeps)"
        )
    return notes


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
    from lmforge.scaling.cli import cmd_fit

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


# ----------------------------------------------------------------------------- printing
def _print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """Like `scaling fit`'s tables, but at least 132 columns wide when writing to a log file,
    so that a 10-column plan does not wrap into an unreadable strip."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=max(c.width, 132))
    c.print(t)


def _print_plan(points: list[SweepPoint], spec: SweepSpec, batch_tokens: int, cfg) -> None:
    from lmforge.scaling.cli import _count, _sci

    total = sum(p.flops_6nd for p in points)
    rows = [
        (
            p.name,
            _count(p.params),
            _count(p.non_embedding_params),
            _count(p.tokens),
            f"{p.tokens / p.params:.2g}",
            str(p.steps),
            "-" if p.epochs is None else f"{p.epochs:.2f}",
            f"{p.lr:.3g}",
            str(p.warmup_steps),
            _sci(p.flops_6nd),
        )
        for p in points
    ]
    _print_table(
        f"Sweep plan: {len(points)} runs ({spec.mode}), {batch_tokens:,} tokens/step, "
        f"{_sci(total)} FLOPs (6ND) in all",
        rows,
        ("point", "N", "N non-emb", "D", "D/N", "steps", "epochs", "peak LR", "warmup", "C=6ND"),
    )


def _print_results(points: list[SweepPoint]) -> None:
    from lmforge.scaling.cli import _count, _sci

    rows = [
        (
            p.name,
            _count(p.params),
            _count(p.tokens),
            _sci(p.flops_6nd),
            "-" if p.val_loss is None else f"{p.val_loss:.4f}",
            "-" if p.seconds is None else f"{p.seconds:.0f}",
            p.status,
        )
        for p in points
    ]
    _print_table(
        "Sweep results (final val loss, nats/token)",
        rows,
        ("point", "N", "D", "C=6ND", "val loss", "train s", "status"),
    )


def _print_notes(notes: list[str]) -> None:
    from lmforge.scaling.cli import _print_notes as pn

    pn("notes", notes)


# ----------------------------------------------------------------------------- CLI
def cmd_sweep(args: argparse.Namespace) -> int:
    from lmforge.cli import _split_args

    config, overrides = _split_args(args.args)
    spec = SweepSpec.from_yaml(args.spec) if args.spec else SweepSpec()
    if args.sizes is not None:
        spec.sizes = _split_list(args.sizes)
    if args.tokens is not None:
        spec.tokens = _split_list(args.tokens)
        if args.spec and args.isoflops is None:
            spec.isoflops = []
    if args.isoflops is not None:
        spec.isoflops = _split_list(args.isoflops)
        if args.spec and args.tokens is None:
            spec.tokens = []
    for k in ("head_dim", "lr_width_exp", "warmup_fraction"):
        if getattr(args, k) is not None:
            setattr(spec, k, getattr(args, k))
    if args.bootstrap < 0 or args.jobs < 1:
        raise ConfigError("--bootstrap must be >= 0 and --jobs >= 1")
    res = run_sweep(
        config,
        overrides,
        spec,
        args.out,
        fit=not args.no_fit,
        plots=not args.no_plots,
        bootstrap=args.bootstrap,
        seed=args.seed,
        dry_run=args.dry_run,
        jobs=args.jobs,
    )
    if args.dry_run:
        print("dry run: nothing trained")
        return 0
    print(
        f"sweep: {len(res.points)} runs in {res.out}; table {res.runs_csv}; "
        f"wall time {res.wall_seconds / 60:.1f} min (training {sum(p.seconds or 0 for p in res.points if p.status == 'ran') / 60:.1f} min)"
    )
    if res.fit_error:
        raise LMForgeError(f"the runs are in {res.runs_csv}, but the fit failed: {res.fit_error}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `sweep` to the `lmforge scaling` sub-commands (called by scaling/cli.py)."""
    s = sub.add_parser(
        "sweep",
        help="train a grid of small models (sizes x tokens or IsoFLOP budgets), then fit",
        description="Train one model per (size, budget) point with the real `pretrain` stage on "
        "the config's data and tokenizer (run once, shared), collect the final val "
        "losses into OUT/runs.csv and fit scaling laws into OUT (fit.json, plots), as "
        "`scaling fit` does. Completed points are skipped: re-run to resume.",
        epilog="examples:\n"
        "  lmforge scaling sweep tiny pretrain.batch_size=8 tokenizer.vocab_size=1024 "
        "run.root=sweeps/base \\\n      --sizes 32x2,64x2,96x3,128x4,192x4 "
        "--tokens 256K,512K,1M,2M --jobs 2 --out sweeps/grid\n"
        "  lmforge scaling sweep tiny pretrain.batch_size=8 --sizes 64x2,96x3,128x4,192x4 "
        "--isoflops 1e13,3e13,1e14 --out sweeps/iso\n"
        "  lmforge scaling sweep --spec sweep.yaml --out sweeps/x --dry-run\n"
        "Details: docs/scaling.md (Sweeps).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="pipeline YAML (or shipped name, default 'tiny') and dotted overrides; its "
        "run directory (run.root/run.name) holds the shared data and tokenizer",
    )
    s.add_argument(
        "--sizes",
        metavar="DxL,...",
        help="model shapes d_model x n_layers (heads = d_model / head_dim), or DxLxH",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tokens", metavar="D,...", help="token budgets per size (grid), e.g. 250K,500K,1M")
    g.add_argument(
        "--isoflops",
        metavar="C,...",
        help="compute budgets in FLOPs (C = 6ND); each size trains D = C / 6N tokens",
    )
    s.add_argument(
        "--spec",
        metavar="YAML",
        help=f"sweep spec file with keys {', '.join(SPEC_KEYS)} "
        "(sizes may be mappings of ModelConfig fields); flags override it",
    )
    s.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="sweep directory: one run directory per point, runs.csv, fit.json, plots",
    )
    s.add_argument("--head-dim", type=int, help="head width for DxL shapes (default: the config's)")
    s.add_argument(
        "--lr-width-exp",
        type=float,
        help="peak LR = pretrain.lr x (config d_model / d_model)^EXP (default 0.5; 1 = muP-style "
        "1/width; 0 = one LR for all)",
    )
    s.add_argument(
        "--warmup-fraction",
        type=float,
        help="warmup per size = min(pretrain.warmup_steps, FRACTION x the size's longest run, "
        "half its shortest run) (default 0.1)",
    )
    s.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="K",
        help="bootstrap resamples for the fit's intervals (default: %(default)s)",
    )
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    s.add_argument("--no-fit", action="store_true", help="train and collect runs.csv only")
    s.add_argument("--no-plots", action="store_true", help="fit without writing PNG plots")
    s.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="K",
        help="train K points at once in child processes, each with cpu_count/K torch "
        "threads (default: %(default)s; on a CPU, --jobs 2 with 1 thread each is "
        "usually faster for tiny models)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    s.set_defaults(func=cmd_sweep)
    return s
