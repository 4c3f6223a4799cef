"""Pipeline steps of the data stage (see base.py for the interface).

Per-document steps, in the order of the `DOC_STEPS` registry (each built by its class's
`Step.from_config` from its own config section)::

    extract -> sanity -> url_filter -> language -> gopher_quality -> gopher_repetition
            -> c4 -> fineweb -> content_filter -> pii -> decontam -> domain

Global steps run once over all surviving documents (stage.py): exact_dedup, near_dedup,
quality_classifier, mixing; then the train/val split and the shard writers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lmforge.data.steps import quality
from lmforge.data.steps.base import HIST_BINS, Step, StepStats, approx_tokens, run_steps
from lmforge.data.steps.content import ContentFilter, PIIScrub, UrlFilter
from lmforge.data.steps.decontam import Decontaminate
from lmforge.data.steps.domain import DomainLabel
from lmforge.data.steps.extract import HtmlExtract
from lmforge.data.steps.language import LanguageFilter

if TYPE_CHECKING:
    from lmforge.data.config import DataConfig

# Steps whose drops are "low quality" examples (negatives for the classifier by default).
HEURISTIC_STEPS = ("url_filter", "gopher_quality", "gopher_repetition", "c4", "fineweb", "content_filter")
GLOBAL_STEP_ORDER = ("exact_dedup", "near_dedup", "quality_classifier", "mixing")


# The per-document steps in pipeline order: (DataConfig section, builder). A builder takes the
# section, examples_per_reason and the stage's context and returns the step (or None).
DOC_STEPS: tuple[tuple[str, Callable[..., Step | None]], ...] = (
    ("extract", HtmlExtract.from_config),
    ("sanity", quality.Sanity.from_config),
    ("url_filter", UrlFilter.from_config),
    ("language", LanguageFilter.from_config),
    ("gopher_quality", quality.gopher_quality),
    ("gopher_repetition", quality.gopher_repetition),
    ("c4", quality.c4),
    ("fineweb", quality.fineweb),
    ("content_filter", ContentFilter.from_config),
    ("pii", PIIScrub.from_config),
    ("decontam", Decontaminate.from_config),
    ("domain", DomainLabel.from_config),
)
DOC_STEP_ORDER = tuple(name for name, _ in DOC_STEPS)


def build_doc_steps(
    cfg: DataConfig, decontam_ngrams: tuple[np.ndarray, list[int], list[str]] | None = None
) -> list[Step]:
    """The enabled per-document steps for `cfg`, in pipeline order, each built from its section."""
    steps: list[Step] = []
    for name, build in DOC_STEPS:
        section = getattr(cfg, name)
        if section.enabled:
            step = build(section, cfg.examples_per_reason, decontam=decontam_ngrams)
            if step is not None:
                steps.append(step)
    return steps


__all__ = [
    "Step",
    "StepStats",
    "run_steps",
    "approx_tokens",
    "build_doc_steps",
    "HIST_BINS",
    "HEURISTIC_STEPS",
    "DOC_STEP_ORDER",
    "GLOBAL_STEP_ORDER",
]
