"""Domain labels (ordered rules) and mixing to target domain weights.

Labelling: the first rule that matches wins; a rule may test the URL's host+path, the source
name, and/or the share of lines matching a regex (e.g. "20% of lines look like code"). Rules
are config, so a user can add "legal" or "medical" without code. Documents with a URL that no
rule matched are `web_domain`, the rest `default_domain`.

Mixing (`mix_plan`): given per-document domain, size and a seeded hash, choose how many copies
of each document to keep so the output's shares match the configured weights. With
``max_repeat = 1`` it only downsamples: the largest total the scarcest domain allows is
``min_d(have_d / w_d)``; each domain then keeps documents in hash order until it reaches
``w_d * total``. With ``max_repeat = k`` a domain may be repeated up to k times. Domains absent
from `weights` are dropped when weights are given (their weight is 0); a weighted domain with no
documents at all is left out of the computation and reported as missing (otherwise one typo in a
domain name would empty the output).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import numpy as np

from lmforge.data.readers import Document
from lmforge.data.steps.base import Step


class DomainLabel(Step):
    name = "domain"

    def __init__(self, rules, web_domain: str = "web", default_domain: str = "prose", max_examples: int = 3):
        super().__init__("drop", max_examples)
        self.rules = [
            (
                r.domain,
                re.compile(r.url_regex, re.I) if r.url_regex else None,
                re.compile(r.source_regex) if r.source_regex else None,
                re.compile(r.text_regex, re.M) if r.text_regex else None,
                r.min_line_ratio,
            )
            for r in rules
        ]
        self.web_domain, self.default_domain = web_domain, default_domain

    def label(self, doc: Document) -> str:
        url = doc.meta.get("url") if isinstance(doc.meta.get("url"), str) else None
        where = ""
        if url:
            try:
                parts = urlsplit(url)
                where = (parts.hostname or "") + parts.path
            except ValueError:
                where = url
        n_lines = None
        for domain, url_re, source_re, text_re, ratio in self.rules:
            if url_re is not None and not (where and url_re.search(where)):
                continue
            if source_re is not None and not source_re.search(doc.source):
                continue
            if text_re is not None:
                if n_lines is None:
                    n_lines = max(1, sum(1 for line in doc.text.splitlines() if line.strip()))
                hits = sum(1 for _ in text_re.finditer(doc.text))
                if hits == 0 or hits / n_lines < ratio:
                    continue
            if url_re is None and source_re is None and text_re is None:
                continue
            return domain
        return self.web_domain if url else self.default_domain

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> DomainLabel:
        return cls(section.rules, section.web_domain, section.default_domain, max_examples)

    def apply(self, doc: Document) -> str | None:
        domain = self.label(doc)
        doc.meta["domain"] = domain
        self.stats.count(f"domain_{domain}")
        return None


def mix_plan(
    domains: np.ndarray,
    sizes: np.ndarray,
    order_keys: np.ndarray,
    weights: dict[str, float],
    max_repeat: int = 1,
) -> tuple[np.ndarray, dict]:
    """Copies (0..max_repeat) of each document so the output mix follows `weights`.

    domains: array of domain names; sizes: tokens (or 1 per doc); order_keys: seeded hashes
    deciding which documents are kept first. Returns (copies, summary).
    """
    copies = np.zeros(len(domains), dtype=np.int64)
    total_w = sum(w for w in weights.values() if w > 0)
    have = {d: float(sizes[domains == d].sum()) for d in np.unique(domains)} if len(domains) else {}
    if not weights or total_w <= 0:
        copies[:] = 1
        return copies, {"target": {}, "have": have, "total": float(sizes.sum())}
    missing = sorted(d for d, w in weights.items() if w > 0 and have.get(d, 0.0) <= 0)
    present = {d: w for d, w in weights.items() if w > 0 and d not in missing}
    if not present:  # nothing of any weighted domain: keep the natural mix rather than nothing
        copies[:] = 1
        return copies, {"target": {}, "have": have, "total": float(sizes.sum()), "missing": missing}
    total_w = sum(present.values())
    share = {d: w / total_w for d, w in present.items()}
    # Largest total T with share_d * T <= max_repeat * have_d for every weighted domain.
    caps = [max_repeat * have.get(d, 0.0) / s for d, s in share.items()]
    total = min(caps) if caps else 0.0
    target = {d: s * total for d, s in share.items()}
    for d, want in target.items():
        idx = np.flatnonzero(domains == d)
        if not len(idx) or want <= 0:
            continue
        idx = idx[np.argsort(order_keys[idx], kind="stable")]
        cum = np.cumsum(sizes[idx])
        full_rounds = int(want // cum[-1]) if cum[-1] > 0 else 0
        full_rounds = min(full_rounds, max_repeat)
        copies[idx] = full_rounds
        rest = want - full_rounds * cum[-1]
        if full_rounds < max_repeat and rest > 0:
            # documents until the remainder is covered (the one crossing it is kept: >= target)
            k = int(np.searchsorted(cum, rest, side="left")) + 1
            copies[idx[:k]] += 1
    return copies, {"target": target, "have": have, "total": total, "missing": missing}
