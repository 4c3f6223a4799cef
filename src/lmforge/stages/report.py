"""`lmforge report`: the run's report card, `report/report.md` + self-contained `report/report.html`.

Reads whatever the other stages left in the run directory (manifests, metrics.jsonl, the data
funnel, eval results, samples, the final model's config) -- see `lmforge.eval.report` -- so it
works for any set of stages, and for a run interrupted halfway (failed stages are listed with
their error). PNG plots go to `report/plots/` for the Markdown and are inlined in the HTML. The alignment
stages (reward model, preference optimisation, RL) get their own before/after table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..eval.render import Section, images, render_html, render_markdown
from ..eval.report import build_sections, collect
from ..runs import atomic_write_bytes, atomic_write_text, read_manifest, run_relative
from .base import StageContext, define_stage

ALIGN_STAGES = ("reward", "align", "rl")
ALIGN_NOTES = {
    "val_accuracy": "held-out preference accuracy (reward: score of chosen > rejected; policy: chosen more "
    "likely than rejected)",
    "val_margin": "mean margin chosen - rejected (reward: score; policy: summed log-prob, nats)",
    "val_loss": "held-out loss of the stage's objective",
}


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, description="report title; default: 'Report card: run <name>'")
    max_samples: int = Field(6, ge=0, description="sample completions shown per stage")
    plots: bool = Field(True, description="draw PNG plots (matplotlib)")


def write_report(run_dir, out_dir, cfg: ReportConfig | None = None, order: tuple[str, ...] = ()) -> dict:
    """Write report.md, report.html and plots/*.png for `run_dir` into `out_dir`; stages in
    `order` first (the pipeline's), any others by start time."""
    cfg = cfg or ReportConfig()
    info = collect(run_dir, list(order), skip=("report", out_dir.name))
    sections = build_sections(info, title=cfg.title, max_samples=cfg.max_samples, plots=cfg.plots)
    al = alignment_section(Path(run_dir))
    if al is not None:  # after the overview and model card, before the per-stage training curves
        sections.insert(min(2, len(sections)), al)
    pngs = images(sections)
    for name, data in pngs.items():
        atomic_write_bytes(out_dir / "plots" / name, data)
    atomic_write_text(out_dir / "report.md", render_markdown(sections))
    atomic_write_text(out_dir / "report.html", render_html(sections))
    return {
        "stages": len(info["stages"]),
        "sections": len(sections),
        "plots": len(pngs),
        "report": run_relative(out_dir / "report.html", run_dir),
    }


def alignment_rows(run_dir: Path) -> list[list]:
    """[stage, metric, before, after] for every `<m>_before` / `<m>_after` metric pair of the
    completed alignment stages, plus their after-only figures (KL, implicit reward, interval)."""
    rows = []
    for name in ALIGN_STAGES:
        m = read_manifest(run_dir / name)
        if not m or m.get("status") != "complete":
            continue
        metrics = m.get("metrics") or {}
        label = name + (f" ({metrics['method']})" if isinstance(metrics.get("method"), str) else "")
        for k, v in metrics.items():
            if k.endswith("_before") and (k[:-7] + "_after") in metrics:
                rows.append([label, k[:-7], v, metrics[k[:-7] + "_after"]])
        for k, v in metrics.items():
            if k.endswith("_after") and (k[:-6] + "_before") not in metrics and isinstance(v, (int, float)):
                rows.append([label, k[:-6], None, v])
        if metrics.get("val_length_baseline") is not None:  # the reward model's length-only baseline
            rule = metrics.get("val_length_baseline_rule")
            rows.append(
                [label, f"length-only baseline (prefer {rule})", None, metrics["val_length_baseline"]]
            )
        lo, hi = metrics.get("val_accuracy_ci_low"), metrics.get("val_accuracy_ci_high")
        if lo is not None and hi is not None:
            rows.append(
                [
                    label,
                    "val_accuracy 95% CI",
                    None,
                    f"{lo:.3f} - {hi:.3f} ({metrics.get('val_pairs')} pairs)",
                ]
            )
    return rows


def alignment_section(run_dir: Path) -> Section | None:
    rows = alignment_rows(run_dir)
    if not rows:
        return None
    s = Section("Alignment: before / after")
    s.p(
        "Held-out figures of the reward model and the aligned policy, measured on pairs none of them trained on. "
        + " ".join(f"`{k}`: {v}." for k, v in ALIGN_NOTES.items())
        + " `val_log_ratio_chosen`: mean per-token log pi - log ref on the chosen answers (drift, not a KL);"
        " `val_reward_accuracy`: the implicit reward beta * (log pi - log ref) ranks chosen first."
    )
    s.table(["stage", "metric", "before", "after"], rows)
    return s


@define_stage(
    "report",
    ReportConfig,
    needs=("data", "tokenizer", "eval", "sample"),
    uses_model=True,
    help="report card: report.md + report.html with plots",
)
def report_stage(ctx: StageContext) -> dict:
    metrics = write_report(ctx.run_dir, ctx.dir, ctx.cfg, ctx.order)
    ctx.log(f"report card of {metrics['stages']} stage(s), {metrics['plots']} plot(s): {metrics['report']}")
    return metrics
