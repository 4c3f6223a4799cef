"""`lmforge compare RUN [RUN ...]`: several runs side by side, from what their stages left on disk.

A learning-rate sweep or a DPO-vs-ORPO comparison asks three questions: what differed between
the runs, how did they end, and how did they get there. So the comparison is:

- **config differences**: every resolved config key (each stage's `manifest.json` config, and
  the run settings of `pipeline.yaml` other than name and root) whose value is not the same in
  all runs; keys that agree are left out, so the table shows exactly what was varied;
- **summary metrics**: each stage's manifest metrics, one column per run;
- **curves overlaid per stage**: train loss, eval loss, reward, KL and accuracy from each
  stage's `metrics.jsonl`, one line per run, in one PNG and in a self-contained HTML page (the
  report card's renderer: inline CSS and images, no scripts, no network).

A RUN is a run directory (`runs/tiny`: folders with a `manifest.json`) or a folder of them,
such as the output of `lmforge scaling sweep`, whose points are taken in name order.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from ..runs import atomic_write_bytes, atomic_write_text, read_jsonl, read_manifest
from .plots import _plt, _png
from .render import Section, _cell, _num, render_html

# (panel title, preferred metric keys in order, fallback test on a key) for the curve panels
CURVES: list[tuple[str, list[str], Callable[[str], bool]]] = [
    ("loss", ["loss"], lambda k: False),
    ("eval loss", ["eval/loss"], lambda k: False),
    ("reward", ["reward", "rewards/margins", "objective/rlhf_reward"], lambda k: "reward" in k),
    ("KL", ["objective/kl", "kl", "eval/kl"], lambda k: k.split("/")[-1] == "kl"),
    (
        "accuracy",
        ["eval/accuracy", "rewards/accuracies", "accuracy", "eval/reward_accuracy"],
        lambda k: "acc" in k.split("/")[-1] and "_ci_" not in k,
    ),
]


@dataclass
class RunData:
    label: str
    dir: Path
    stages: dict[str, dict] = field(default_factory=dict)  # name -> manifest
    curves: dict[str, list[dict]] = field(default_factory=dict)  # name -> metrics.jsonl records
    settings: dict = field(default_factory=dict)  # pipeline.yaml run section


def _is_run_dir(d: Path) -> bool:
    return d.is_dir() and any((c / "manifest.json").is_file() for c in d.iterdir() if c.is_dir())


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories named directly, or the run directories inside a folder (a sweep)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p}: no such run directory")
        if _is_run_dir(p):
            out.append(p)
            continue
        inner = sorted(c for c in p.iterdir() if _is_run_dir(c))
        if not inner:
            raise DataError(
                f"{p}: neither a run directory (stage folders with manifest.json) nor a folder of "
                f"them; pass runs/<name> or a scaling sweep's output folder"
            )
        out += inner
    unique: dict[Path, Path] = {}
    for d in out:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def _labels(dirs: list[Path]) -> list[str]:
    """Run names, with parent folders added until they are unique."""
    for depth in range(1, 6):
        labels = ["/".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in dirs]


def load_run(d: Path, label: str) -> RunData:
    run = RunData(label, d)
    for sd in sorted(c for c in d.iterdir() if c.is_dir()):
        m = read_manifest(sd)
        if not m:
            continue
        run.stages[sd.name] = m
        recs = read_jsonl(sd / "metrics.jsonl")
        if recs:
            run.curves[sd.name] = recs
    py = d / "pipeline.yaml"
    if py.is_file():
        try:
            data = yaml.safe_load(py.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{py}: invalid YAML ({e}); the file is written by `lmforge run`") from None
        if isinstance(data, dict) and isinstance(data.get("run"), dict):
            run.settings = {k: v for k, v in data["run"].items() if k not in ("name", "root")}
    return run


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(runs: list[RunData]) -> list[list[Any]]:
    """Rows [key, value per run] for the config keys whose values differ between runs."""
    flats = []
    for r in runs:
        f = _flat({"run": r.settings}, "")
        for name, m in r.stages.items():
            f.update(_flat(m.get("config") or {}, name))
        flats.append(f)
    missing = object()
    rows = []
    for key in sorted(set().union(*flats)):
        vals = [f.get(key, missing) for f in flats]
        if any(v != vals[0] for v in vals):
            rows.append([key, *[None if v is missing else v for v in vals]])
    return rows


def summary_rows(runs: list[RunData]) -> list[list[Any]]:
    """Rows [stage.metric, value per run] of every scalar manifest metric."""
    keys: dict[str, None] = {}
    for r in runs:
        for name, m in r.stages.items():
            for k, v in (m.get("metrics") or {}).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    keys[f"{name}.{k}"] = None
    rows = []
    for key in keys:
        stage, metric = key.split(".", 1)
        rows.append([key, *[(r.stages.get(stage, {}).get("metrics") or {}).get(metric) for r in runs]])
    return rows


def curve_panels(runs: list[RunData]) -> list[tuple[str, str, str]]:
    """(stage, panel title, metric key) for every curve some run has, stages in run order."""
    panels = []
    stages = list(dict.fromkeys(s for r in runs for s in r.curves))
    for stage in stages:
        keys = list(dict.fromkeys(k for r in runs for rec in r.curves.get(stage, []) for k in rec))
        for title, preferred, fallback in CURVES:
            key = next((k for k in preferred if k in keys), None) or next(
                (k for k in keys if fallback(k)), None
            )
            if key is not None:
                panels.append((stage, title, key))
    return panels


def series(runs: list[RunData], stage: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points of one curve for each run that has it: what one panel draws."""
    out = {}
    for r in runs:
        pts = [
            (rec["step"], rec[key]) for rec in r.curves.get(stage, []) if "step" in rec and _num(rec.get(key))
        ]
        if pts:
            out[r.label] = pts
    return out


def plot_compare(runs: list[RunData], panels: list[tuple[str, str, str]]) -> bytes | None:
    """One row of panels per stage, one line per run."""
    if not panels:
        return None
    stages = list(dict.fromkeys(p[0] for p in panels))
    ncols = max(sum(1 for p in panels if p[0] == s) for s in stages)
    plt = _plt()
    fig, axes = plt.subplots(len(stages), ncols, figsize=(4.2 * ncols, 3.0 * len(stages)), squeeze=False)
    for i, stage in enumerate(stages):
        mine = [p for p in panels if p[0] == stage]
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(mine):
                ax.axis("off")
                continue
            _, title, key = mine[j]
            for label, pts in series(runs, stage, key).items():
                ax.plot(*zip(*pts), "o-" if len(pts) < 12 else "-", label=label, lw=1.4, ms=3)
            ax.set_title(f"{stage}: {title}" + (f" ({key})" if key not in ("loss", "eval/loss") else ""))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def compare(paths: list[str | Path], out: Path) -> dict:
    """Write `compare.png`, `compare.html` and `compare.md` under `out`; return the tables."""
    dirs = find_runs(paths)
    if len(dirs) < 2:
        raise DataError(f"compare needs at least two runs; found {len(dirs)} in {', '.join(map(str, paths))}")
    runs = [load_run(d, label) for d, label in zip(dirs, _labels(dirs))]
    header = ["key", *[r.label for r in runs]]
    diff, summary = config_diff(runs), summary_rows(runs)
    panels = curve_panels(runs)
    png = plot_compare(runs, panels)
    sections = [
        Section(f"compare: {', '.join(r.label for r in runs)}").p(
            "Runs: " + ", ".join(f"`{r.dir}`" for r in runs)
        ),
        Section("config differences").table(header, diff).p("" if diff else "The configs are identical."),
        Section("summary metrics").table(header, summary),
        Section("curves").image("compare.png", png, "curves of the runs overlaid per stage"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.html", render_html(sections))
    md = [f"# compare: {', '.join(r.label for r in runs)}", "", "## config differences", ""]
    md += _md_table(header, diff) + ["", "## summary metrics", ""] + _md_table(header, summary)
    if png:
        atomic_write_bytes(out / "compare.png", png)
        md += ["", "## curves", "", "![curves](compare.png)"]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    return {"runs": [str(r.dir) for r in runs], "header": header, "config_diff": diff, "summary": summary}


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def _print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    from rich import get_console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for h in header:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*[_cell(c) for c in r])
    get_console().print(t if rows else f"{title}: none")


def cmd_compare(a: argparse.Namespace) -> int:
    out = Path(a.out)
    res = compare(a.runs, out)
    _print_table("config differences", res["header"], res["config_diff"])
    _print_table("summary metrics", res["header"], res["summary"])
    print(
        f"wrote {out / 'compare.html'}, {out / 'compare.md'}"
        + (", compare.png" if (out / "compare.png").exists() else "")
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare runs: config differences, summary metrics, curves overlaid (PNG + HTML)",
        description="Compare run directories (or folders of them, e.g. a scaling sweep): a table of "
        "the config keys that differ, a table of each stage's summary metrics, and the runs' "
        "loss / eval loss / reward / KL / accuracy curves overlaid per stage in compare.png and a "
        "self-contained compare.html.",
        epilog="example: lmforge compare runs/lr1e-3 runs/lr3e-3 --out runs/compare-lr. "
        "Details: docs/tracking.md.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a folder of run directories")
    p.add_argument("--out", default="compare", help="folder for compare.html/.md/.png (default: ./compare)")
    p.set_defaults(func=cmd_compare)
