"""Pipeline steps of the data stage (see base.py for the interface).

Per-document steps, in the order `build_doc_steps` chains them::

    extract -> sanity -> url_filter -> language -> gopher_quality -> gopher_repetition
            -> c4 -> fineweb -> content_filter -> pii -> decontam -> domain

Global steps run once over all surviving documents (stage.py): exact_dedup, near_dedup,
quality_classifier, mixing; then the train/val split and the shard writers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lmforge.data.steps.base import HIST_BINS, Step, StepStats, approx_tokens, run_steps

if TYPE_CHECKING:
    from lmforge.data.config import DataConfig

# Steps whose drops are "low quality" examples (negatives for the classifier by default).
HEURISTIC_STEPS = ("url_filter", "gopher_quality", "gopher_repetition", "c4", "fineweb", "content_filter")
DOC_STEP_ORDER = (
    "extract",
    "sanity",
    "url_filter",
    "language",
    "gopher_quality",
    "gopher_repetition",
    "c4",
    "fineweb",
    "content_filter",
    "pii",
    "decontam",
    "domain",
)
GLOBAL_STEP_ORDER = ("exact_dedup", "near_dedup", "quality_classifier", "mixing")


def build_doc_steps(
    cfg: DataConfig, decontam_ngrams: tuple[np.ndarray, list[int], list[str]] | None = None
) -> list[Step]:
    """The enabled per-document steps for `cfg`, in pipeline order."""
    from lmforge.data.steps import quality
    from lmforge.data.steps.content import ContentFilter, PIIScrub, UrlFilter
    from lmforge.data.steps.decontam import Decontaminate
    from lmforge.data.steps.domain import DomainLabel
    from lmforge.data.steps.extract import HtmlExtract
    from lmforge.data.steps.language import LanguageFilter

    ex = cfg.examples_per_reason
    steps: list[Step] = []
    if cfg.extract.enabled:
        e = cfg.extract
        steps.append(
            HtmlExtract(e.favor, e.include_tables, e.include_comments, e.timeout_s, e.max_html_bytes, ex)
        )
    if cfg.sanity.enabled:
        s = cfg.sanity
        steps.append(quality.Sanity(s.min_chars, s.max_chars, s.max_line_chars, s.max_garbled_ratio, ex))
    if cfg.url_filter.enabled:
        u = cfg.url_filter
        steps.append(
            UrlFilter(
                u.blocked_domains,
                u.blocklist_files,
                u.banned_url_words,
                u.soft_word_threshold,
                u.datatrove_domain_list,
                ex,
            )
        )
    if cfg.language.enabled:
        la = cfg.language
        steps.append(LanguageFilter(la.languages, la.min_score, la.thresholds, la.max_chars, la.mode, ex))
    if cfg.gopher_quality.enabled:
        steps.append(quality.gopher_quality(cfg.gopher_quality, ex))
    if cfg.gopher_repetition.enabled:
        steps.append(quality.gopher_repetition(cfg.gopher_repetition, ex))
    if cfg.c4.enabled:
        steps.append(quality.c4(cfg.c4, ex))
    if cfg.fineweb.enabled:
        steps.append(quality.fineweb(cfg.fineweb, ex))
    if cfg.content_filter.enabled:
        c = cfg.content_filter
        steps.append(ContentFilter(c.words, c.regexes, c.word_files, c.max_matches, c.mode, ex))
    if cfg.pii.enabled:
        p = cfg.pii
        steps.append(
            PIIScrub(
                p.emails,
                p.phones,
                p.ips,
                p.only_public_ips,
                p.email_replacement,
                p.phone_replacement,
                p.ip_replacement,
                ex,
                p.phone_region,
            )
        )
    if cfg.decontam.enabled and decontam_ngrams is not None and len(decontam_ngrams[0]):
        d = cfg.decontam
        hashes, short, owners = decontam_ngrams
        steps.append(Decontaminate(hashes, d.ngram, short, d.mode, ex, owners))
    if cfg.domain.enabled:
        dm = cfg.domain
        steps.append(DomainLabel(dm.rules, dm.web_domain, dm.default_domain, ex))
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
