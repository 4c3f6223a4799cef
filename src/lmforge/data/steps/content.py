"""Undesirable content: URL blocklist, a word/regex list, and PII scrubbing.

URL filter: FineWeb's rules (datatrove's `URLFilter`) -- blocked domains and their subdomains,
banned words as URL tokens, >= 2 "soft" banned words, banned sub-strings of the normalised URL
-- using the word lists datatrove ships as package data. We re-implement the matching because
datatrove's class needs `tldextract` (which fetches the public-suffix list over the network on
first use) and `pyahocorasick`; matching every suffix of the host name against the set gives
the same domain/subdomain semantics with no suffix list, and one compiled regex replaces the
Aho-Corasick automaton for ~130 sub-words. datatrove's 4-million-domain UT1 list is opt-in
(`datatrove_domain_list`): loading it costs ~1 GB and a minute.

PII: datatrove's e-mail regex; IPv4 and IPv6 candidates validated by the standard `ipaddress`
module (public addresses only by default; a dotted number after "version", "v", "release"... is a
version string, not an address); phone numbers found by Google's libphonenumber port
(`phonenumbers`, numbers valid for their region or written with a country code) plus a pattern
for separator-formatted numbers it cannot place in a region (``030 1234 5678``, fictional 555
numbers). All are replaced by documentation placeholders (``email@example.com``, ``555-0100``,
``192.0.2.1`` from RFC 5737's TEST-NET) so the text stays fluent. The step never drops a
document; it counts replacements per kind.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from lmforge.data.readers import Document
from lmforge.data.steps.base import Step
from lmforge.errors import ConfigError

_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


def _normalize(text: str) -> str:
    return _NON_ALNUM.sub("", text).lower()


@functools.lru_cache(maxsize=1)
def _datatrove_assets() -> str:
    from datatrove.utils._import_utils import ASSETS_PATH

    return ASSETS_PATH


def _read_list(path: str | os.PathLike, normalize: bool) -> set[str]:
    out = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.add(_normalize(line) if normalize else line.lower())
    return out


@functools.lru_cache(maxsize=1)
def _datatrove_domains() -> frozenset[str]:
    path = Path(_datatrove_assets()) / "url_filterblacklistsv0_3_0.tar.gz"
    domains: set[str] = set()
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name.rsplit("/", 1)[-1] == "domains":
                f = tar.extractfile(member)
                assert f is not None
                for raw in f:
                    line = raw.decode("utf-8", "replace").strip().lower()
                    if line and not line.startswith("#"):
                        domains.add(line)
    return frozenset(domains)


def host_of(url: str) -> str:
    try:
        host = urlsplit(url if "//" in url else "//" + url).hostname or ""
    except ValueError:
        return ""
    return host.lower().rstrip(".")


class UrlFilter(Step):
    name = "url_filter"

    def __init__(
        self,
        blocked_domains=(),
        blocklist_files=(),
        banned_url_words: bool = True,
        soft_word_threshold: int = 2,
        datatrove_domain_list: bool = False,
        max_examples: int = 3,
    ):
        super().__init__("drop", max_examples)
        self.domains = {d.strip().lower().lstrip(".") for d in blocked_domains if d.strip()}
        for path in blocklist_files:
            if not Path(path).is_file():
                raise ConfigError(f"data.url_filter.blocklist_files: {path} does not exist")
            self.domains |= _read_list(path, normalize=False)
        self.big_domains = _datatrove_domains() if datatrove_domain_list else frozenset()
        self.words: set[str] = set()
        self.soft_words: set[str] = set()
        self.subword_re = None
        if banned_url_words:
            assets = Path(_datatrove_assets())
            self.words = _read_list(assets / "banned_words.txt", normalize=True)
            self.soft_words = _read_list(assets / "soft_banned_words.txt", normalize=True)
            subwords = sorted(
                _read_list(assets / "banned_subwords.txt", normalize=True), key=len, reverse=True
            )
            if subwords:
                self.subword_re = re.compile("|".join(map(re.escape, subwords)))
        self.soft_word_threshold = soft_word_threshold

    def _blocked_host(self, host: str) -> bool:
        parts = host.split(".")
        for i in range(len(parts) - 1):  # host, then each parent domain (never the bare TLD)
            suffix = ".".join(parts[i:])
            if suffix in self.domains or suffix in self.big_domains:
                return True
        return False

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> UrlFilter:
        u = section
        return cls(
            u.blocked_domains,
            u.blocklist_files,
            u.banned_url_words,
            u.soft_word_threshold,
            u.datatrove_domain_list,
            max_examples,
        )

    def apply(self, doc: Document) -> str | None:
        url = doc.meta.get("url")
        if not url or not isinstance(url, str):
            self.stats.count("no_url")
            return None
        host = host_of(url)
        if host and self._blocked_host(host):
            return "blocked_domain"
        if self.words or self.soft_words:
            tokens = {t.lower() for t in _NON_ALNUM.split(url) if t}
            if tokens & self.words:
                return "banned_word"
            if len(tokens & self.soft_words) >= self.soft_word_threshold:
                return "soft_banned_words"
        if self.subword_re is not None and self.subword_re.search(_normalize(url)):
            return "banned_subword"
        return None


class ContentFilter(Step):
    """Drop (or flag) documents with more than `max_matches` hits of a word list or regexes."""

    name = "content_filter"

    def __init__(
        self,
        words=(),
        regexes=(),
        word_files=(),
        max_matches: int = 0,
        mode: str = "drop",
        max_examples: int = 3,
    ):
        super().__init__(mode, max_examples)
        words = [w.strip() for w in words if w.strip()]
        for path in word_files:
            if not Path(path).is_file():
                raise ConfigError(f"data.content_filter.word_files: {path} does not exist")
            words += sorted(_read_list(path, normalize=False))
        self.word_re = (
            re.compile(
                r"(?<!\w)(?:"
                + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                + r")(?!\w)",
                re.IGNORECASE,
            )
            if words
            else None
        )
        self.regexes = [re.compile(r, re.IGNORECASE | re.MULTILINE) for r in regexes]
        self.max_matches = max_matches

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> ContentFilter:
        c = section
        return cls(c.words, c.regexes, c.word_files, c.max_matches, c.mode, max_examples)

    def apply(self, doc: Document) -> str | None:
        hits = 0
        if self.word_re is not None:
            for _ in self.word_re.finditer(doc.text):
                hits += 1
                if hits > self.max_matches:
                    return "word_list"
        for rx in self.regexes:
            for _ in rx.finditer(doc.text):
                hits += 1
                if hits > self.max_matches:
                    return "regex"
        return None


# Phone numbers libphonenumber does not validate (no region, fictional 555 numbers): optional
# +country code, then 3 groups separated by space/dot/dash, e.g. +1 (555) 123-4567, 030 1234 5678.
# Separators are required so that bare digit runs (ids, timestamps) and dotted versions (3.11.2)
# are left alone; the last group has 4 digits and there are 9-15 digits in total.
PHONE_RE = re.compile(
    r"(?<![\w.+/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{4}(?![\w/-]|\.\d)"
)
IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:\bv|\bver|version|release|rev|build|firmware|kernel|python|node|libc|api)[\s:=.-]{0,3}$"
)


def _phone_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    if not 9 <= digits <= 15:
        return False
    seps = {c for c in match if c in " .-"}
    return len(seps) <= 2 and not re.fullmatch(r"(19|20)\d\d[-.]\d\d[-.]\d\d.*", match)  # not a date


_PHONE_WORDS = re.compile(
    r"(?i)(?:call|phone|tel|telephone|mobile|cell|fax|contact|sms|text|whatsapp|dial|ring|hotline)\b[^\n]{0,30}$"
)


def _phone_context_ok(text: str, start: int, end: int, raw: str) -> bool:
    """Not a piece of a larger token (2.5555555555, aix-7107-..., 0x7fffffff), and a bare digit
    run (no + or separators: ids, int literals, timestamps) only after a word such as "call"."""
    before = text[start - 1] if start else " "
    if before.isalnum() or before in "._-/\\'\"" or re.match(r"[\w]|\.\d|-\d", text[end : end + 2]):
        return False
    if raw.isdigit():
        return bool(_PHONE_WORDS.search(text[max(0, start - 40) : start]))
    return True


def _find_phones(text: str, region: str) -> list[tuple[int, int]]:
    """Spans of phone numbers: libphonenumber's valid matches, then the separator pattern."""
    import phonenumbers

    spans: list[tuple[int, int]] = []
    if sum(c.isdigit() for c in text) >= 7:
        for pm in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            if _phone_context_ok(text, pm.start, pm.end, pm.raw_string):
                spans.append((pm.start, pm.end))
    for m in PHONE_RE.finditer(text):
        if _phone_ok(m.group(0)) and not any(a < m.end() and m.start() < b for a, b in spans):
            spans.append(m.span())
    return sorted(spans)


def _find_ips(text: str, only_public: bool) -> list[tuple[int, int]]:
    """Spans of IPv4/IPv6 addresses that `ipaddress` accepts (public ones if `only_public`)."""
    import ipaddress

    spans = []
    for rx in (IPV4_RE, IPV6_RE):
        for m in rx.finditer(text):
            cand = m.group(0)
            if rx is IPV6_RE and (cand.count(":") < 2 or not any(c.isdigit() for c in cand)):
                continue
            try:
                ip = ipaddress.ip_address(cand)
            except ValueError:
                continue
            if only_public and not ip.is_global:
                continue
            if ip.version == 4 and _VERSION_CONTEXT.search(text[max(0, m.start() - 12) : m.start()]):
                continue
            spans.append(m.span())
    return sorted(spans)


def _replace_spans(text: str, spans: list[tuple[int, int]], replacement: str) -> str:
    out, at = [], 0
    for a, b in spans:
        out += [text[at:a], replacement]
        at = b
    out.append(text[at:])
    return "".join(out)


class PIIScrub(Step):
    name = "pii"

    def __init__(
        self,
        emails: bool = True,
        phones: bool = True,
        ips: bool = True,
        only_public_ips: bool = True,
        email_replacement: str = "email@example.com",
        phone_replacement: str = "555-0100",
        ip_replacement: str = "192.0.2.1",
        max_examples: int = 3,
        phone_region: str = "US",
    ):
        super().__init__("drop", max_examples)
        from datatrove.pipeline.formatters.pii import PIIFormatter

        email_re = PIIFormatter().emails_replacer.regex
        self.replacers: list[tuple[str, Callable[[str], list[tuple[int, int]]], str]] = []
        if emails:
            self.replacers.append(
                (
                    "email",
                    lambda t: [m.span() for m in email_re.finditer(t)] if "@" in t else [],
                    email_replacement,
                )
            )
        if ips:
            self.replacers.append(("ip", lambda t: _find_ips(t, only_public_ips), ip_replacement))
        if phones:
            self.replacers.append(("phone", lambda t: _find_phones(t, phone_region), phone_replacement))

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> PIIScrub:
        p = section
        return cls(
            p.emails,
            p.phones,
            p.ips,
            p.only_public_ips,
            p.email_replacement,
            p.phone_replacement,
            p.ip_replacement,
            max_examples,
            p.phone_region,
        )

    def apply(self, doc: Document) -> str | None:
        text = doc.text
        kinds = []
        for kind, find, replacement in self.replacers:
            spans = find(text)
            if spans:
                self.stats.count(f"{kind}_replaced", len(spans))
                text = _replace_spans(text, spans, replacement)
                kinds.append(kind)
        if kinds:
            self.stats.count("docs_modified")
            doc.text = text
            for kind in kinds:  # examples show the scrubbed text around the placeholder, never the PII
                placeholder = next(r for k, _, r in self.replacers if k == kind)
                at = max(0, text.find(placeholder) - 120)
                window = ("…" if at else "") + text[at : at + 280]
                self.stats.example(f"replaced:{kind}", Document(window, doc.source, doc.meta))
        return None
