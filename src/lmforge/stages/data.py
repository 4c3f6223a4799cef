"""`lmforge data`: raw inputs -> extracted, filtered, deduplicated, scored, mixed train/val
shards with a funnel report. The work happens in `lmforge.data.stage`; this module registers it
as the first stage of the pipeline. See docs/data.md for the steps and their defaults."""

from __future__ import annotations

from ..data.config import DataConfig
from ..data.stage import iter_output_texts, run_data_stage
from .base import StageContext, define_stage

__all__ = ["DataConfig", "iter_output_texts"]


@define_stage("data", DataConfig, help="extract, filter, deduplicate and split the text corpus")
def data_stage(ctx: StageContext) -> dict:
    return run_data_stage(ctx.cfg, ctx.dir, seed=ctx.seed, log=ctx.log, threads=ctx.pipeline.run.threads)
