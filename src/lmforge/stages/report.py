"""`lmforge report`: the run's report card, `report/report.md` + self-contained `report/report.html`.

Reads whatever the other stages left in the run directory (manifests, metrics.jsonl, the data
funnel, eval results, samples, the final model's config) -- see `lmforge.eval.report` -- so it
works for any set of stages, and for a run interrupted halfway (failed stages are listed with
their error). PNG plots go to `report/plots/` for the Markdown and are inlined in the HTML.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..eval.report import build_sections, collect, images, render_html, render_markdown
from ..pipeline import ORDER, StageContext, register_stage
from ..runs import atomic_write_bytes, atomic_write_text


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, description="report title; default: 'Report card: run <name>'")
    max_samples: int = Field(6, ge=0, description="sample completions shown per stage")
    plots: bool = Field(True, description="draw PNG plots (matplotlib)")


def write_report(run_dir, out_dir, cfg: ReportConfig | None = None) -> dict:
    """Write report.md, report.html and plots/*.png for `run_dir` into `out_dir`."""
    cfg = cfg or ReportConfig()
    info = collect(run_dir, list(ORDER), skip=("report", out_dir.name))
    sections = build_sections(info, title=cfg.title, max_samples=cfg.max_samples, plots=cfg.plots)
    pngs = images(sections)
    for name, data in pngs.items():
        atomic_write_bytes(out_dir / "plots" / name, data)
    atomic_write_text(out_dir / "report.md", render_markdown(sections))
    atomic_write_text(out_dir / "report.html", render_html(sections))
    return {"stages": len(info["stages"]), "sections": len(sections), "plots": len(pngs),
            "report": str(out_dir / "report.html")}


@register_stage("report", ReportConfig, needs=("data", "tokenizer", "eval", "sample"), uses_model=True,
                after="sample", help="report card: report.md + report.html with plots")
def report_stage(ctx: StageContext) -> dict:
    metrics = write_report(ctx.run_dir, ctx.dir, ctx.cfg)
    ctx.log(f"report card of {metrics['stages']} stage(s), {metrics['plots']} plot(s): {metrics['report']}")
    return metrics
