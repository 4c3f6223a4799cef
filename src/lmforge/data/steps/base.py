"""The step interface: documents flow through small steps, each counting what it did and why.

As in datatrove, a step is a callable from an iterator of `Document`s to an iterator of
`Document`s, so a pipeline is plain generator composition and one task streams its input
through every step without holding it in memory. Unlike datatrove's free-form stat labels, each
step here keeps one `StepStats` with a fixed shape -- documents / bytes / approximate tokens in
and out, drops and flags *by reason*, up to N example snippets per reason, and fixed-bin
histograms -- because those numbers are the funnel of the report and they must merge across
tasks (and machines) by simple addition.

Writing a step: subclass `Step` and implement ``apply(doc) -> str | None``: return None to keep
the document (possibly after changing ``doc.text`` or ``doc.meta``) or a short reason to drop
it. Filters whose config has ``mode: flag`` keep the document instead, record the reason under
``flagged`` and append ``"<step>:<reason>"`` to ``doc.meta["flags"]``. An exception raised by `apply` drops that one
document under the reason ``step_error`` (the exception type is counted) instead of failing the
task: bad input is reported, never fatal.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.readers import Document

SNIPPET_CHARS = 300
# Fixed histogram bins so that per-task histograms add up: name -> (low, high, bins).
HIST_BINS: dict[str, tuple[float, float, int]] = {
    "lang_score": (0.0, 1.0, 20),
    "quality_score": (0.0, 1.0, 20),
    "log10_chars": (0.0, 7.0, 28),
}


def approx_tokens(text: str) -> int:
    """Token estimate used throughout the funnel: UTF-8 bytes / 4 (typical for English BPE)."""
    return (len(text.encode("utf-8", errors="surrogatepass")) + 3) // 4


def text_bytes(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def nfc(text: str) -> str:
    """Unicode NFC (what trafilatura's `extract` applies; cheap when already normalised)."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def snippet(text: str, n: int = SNIPPET_CHARS) -> str:
    text = " ".join(text[: n * 2].split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def doc_id(doc: Document) -> str:
    return str(doc.meta.get("id") or doc.meta.get("location") or doc.source)


@dataclass
class StepStats:
    """What one step did; `merge` adds another task's stats of the same step."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> {docs, bytes}
    flagged: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> {docs, bytes}
    counters: dict[str, int] = field(default_factory=dict)  # e.g. pii_email: 12
    examples: dict[str, list[dict]] = field(default_factory=dict)  # reason -> [{id, source, url, text}]
    hist: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    max_examples: int = 3

    # -- recording
    def add_in(self, doc: Document) -> int:
        b = text_bytes(doc.text)
        self.docs_in += 1
        self.bytes_in += b
        self.tokens_in += (b + 3) // 4
        return b

    def add_out(self, doc: Document) -> None:
        b = text_bytes(doc.text)
        self.docs_out += 1
        self.bytes_out += b
        self.tokens_out += (b + 3) // 4

    def drop(self, reason: str, doc: Document, nbytes: int | None = None) -> None:
        self._count(self.dropped, reason, doc, nbytes)

    def flag(self, reason: str, doc: Document, nbytes: int | None = None) -> None:
        self._count(self.flagged, "flag:" + reason, doc, nbytes, key=reason)

    def _count(
        self, table: dict, example_key: str, doc: Document, nbytes: int | None, key: str | None = None
    ) -> None:
        entry = table.setdefault(key or example_key, {"docs": 0, "bytes": 0})
        entry["docs"] += 1
        entry["bytes"] += text_bytes(doc.text) if nbytes is None else nbytes
        self.example(example_key, doc)

    def example(self, reason: str, doc: Document) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            entry = {
                "id": doc_id(doc),
                "source": doc.source,
                "url": doc.meta.get("url"),
                "text": snippet(doc.text),
            }
            if doc.meta.get("contaminated_by"):
                entry["matched"] = doc.meta["contaminated_by"]  # the eval item (file:line)
            ex.append(entry)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def observe(self, name: str, value: float) -> None:
        lo, hi, bins = HIST_BINS[name]
        h = self.hist.setdefault(name, [0] * bins)
        i = int((value - lo) / (hi - lo) * bins)
        h[min(max(i, 0), bins - 1)] += 1

    # -- (de)serialisation and merging
    @property
    def docs_dropped(self) -> int:
        return sum(v["docs"] for v in self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "name",
                "docs_in",
                "docs_out",
                "bytes_in",
                "bytes_out",
                "tokens_in",
                "tokens_out",
                "dropped",
                "flagged",
                "counters",
                "examples",
                "hist",
                "seconds",
                "max_examples",
            )
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(**d)

    def merge(self, other: StepStats) -> StepStats:
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "tokens_in", "tokens_out", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for mine, theirs in ((self.dropped, other.dropped), (self.flagged, other.flagged)):
            for reason, v in theirs.items():
                e = mine.setdefault(reason, {"docs": 0, "bytes": 0})
                e["docs"] += v["docs"]
                e["bytes"] += v["bytes"]
        for k, n in other.counters.items():
            self.counters[k] = self.counters.get(k, 0) + n
        for reason, exs in other.examples.items():
            mine_ex = self.examples.setdefault(reason, [])
            mine_ex.extend(exs[: max(0, self.max_examples - len(mine_ex))])
        for name, h in other.hist.items():
            if name in self.hist:
                self.hist[name] = [a + b for a, b in zip(self.hist[name], h)]
            else:
                self.hist[name] = list(h)
        return self


class Step:
    """Base class: subclasses set `name` and implement `apply`; `mode` is "drop" or "flag"."""

    name: str = "step"

    def __init__(self, mode: str = "drop", max_examples: int = 3):
        self.mode = mode
        self.stats = StepStats(self.name, max_examples=max_examples)
        self.on_drop: Callable[[Document, str], None] | None = None  # e.g. sample dropped text

    def apply(self, doc: Document) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def from_config(cls, section: Any, max_examples: int, **context: Any) -> Step | None:
        """The step configured by its own section of `DataConfig` (None: nothing to do);
        `context` carries what the stage prepared (e.g. ``decontam``: the eval n-gram index)."""
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            t0 = time.perf_counter()
            nbytes = stats.add_in(doc)
            try:
                reason = self.apply(doc)
            except Exception as e:  # one pathological document must not kill a task of thousands
                stats.count(f"error_{type(e).__name__}")
                reason = "step_error"
                if self.mode != "drop":  # an erroring document is dropped even by flag-mode steps
                    stats.drop(reason, doc, nbytes)
                    stats.seconds += time.perf_counter() - t0
                    continue
            if reason is not None and self.mode == "drop":
                stats.drop(reason, doc, nbytes)
                if self.on_drop is not None:
                    self.on_drop(doc, reason)
                stats.seconds += time.perf_counter() - t0
                continue
            if reason is not None:
                stats.flag(reason, doc, nbytes)
                doc.meta.setdefault("flags", []).append(f"{self.name}:{reason}")
            stats.add_out(doc)
            stats.seconds += time.perf_counter() - t0
            yield doc


def run_steps(docs: Iterable[Document], steps: list[Step]) -> Iterator[Document]:
    """Chain steps lazily: the documents of `docs` that survive all of them."""
    stream: Iterable[Document] = docs
    for step in steps:
        stream = step(stream)
    return iter(stream)
