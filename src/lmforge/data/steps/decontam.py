"""Decontamination: drop or flag training documents that share a long n-gram with an eval set.

The GPT-3 / Llama recipe: normalise (lowercase, keep letters and digits), split into words,
and flag a document if any of its word 13-grams occurs in an evaluation item; an item shorter
than 13 words counts as one n-gram of its own if it has at least `min_item_words` words (shorter
ones, "Yes" or "4", would match everything). The eval n-grams are 64-bit hashes in a Python set:
100k eval items cost a few tens of MB. Items are read from JSONL/JSON/CSV/TXT/Parquet; keys come
from the fields that carry the item's own text (question, context, passage, prompt...; the
`eval_fields` setting, ``["*"]`` for every string field), not from answer choices: a 9-word
choice such as "It depends on the motion of the source" occurs in unrelated prose and would drop
it. A record with none of the named fields is read whole. Every key remembers the item it came
from (``file:line``), so a dropped document names the eval item it matched (``meta.contaminated_by``
and the examples of the funnel).

datatrove's `NGramsDecontFilter` does the same but only for lighteval task objects; our eval
sets are files named in the config, hence this small module.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from lmforge.data.readers import Document
from lmforge.data.steps.base import Step
from lmforge.errors import ConfigError, DataError

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
EVAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(words: list[str], n: int) -> Iterator[int]:
    for i in range(len(words) - n + 1):
        yield xxhash.xxh3_64_intdigest(" ".join(words[i : i + n]).encode())


def _eval_files(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and _is_eval_file(q))
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
    files = [m for m in matches if m.is_file() and _is_eval_file(m)]
    if not files:
        raise ConfigError(
            f"data.decontam.eval_sets: {spec!r} matches no file "
            f"({', '.join(EVAL_EXTENSIONS)}, optionally .gz)"
        )
    return files


def _is_eval_file(p: Path) -> bool:
    name = p.name.lower().removesuffix(".gz")
    return name.endswith(EVAL_EXTENSIONS) and not p.name.startswith(".")


def _strings(obj, fields: set[str] | None) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        if fields is not None and not fields.intersection(obj):
            fields = None  # none of the key fields: the whole record
        for k, v in obj.items():
            if fields is None or k in fields:
                yield from _strings(v, None)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v, fields)


def iter_eval_records(spec: str, fields: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(label, text) of every item of an eval-set spec (file, folder or glob); the label is
    ``file:line`` (``file:row`` for Parquet/CSV, ``file:index`` for a JSON array)."""
    wanted = None if not fields or "*" in fields else set(fields)
    for path in _eval_files(spec):
        name = path.name.lower().removesuffix(".gz")
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                for i, row in enumerate(pq.read_table(path).to_pylist()):
                    yield from ((f"{path.name}:{i + 1}", t) for t in _strings(row, wanted))
                continue
            with opener(path, "rb") as f:
                raw = f.read()
        except Exception as e:
            raise DataError(f"{path}: cannot read eval set ({type(e).__name__}: {e})") from e
        text = unicodedata.normalize("NFC", raw.decode("utf-8", errors="replace"))
        if name.endswith(".txt"):
            for i, line in enumerate(text.splitlines()):
                if line.strip():
                    yield f"{path.name}:{i + 1}", line
        elif name.endswith((".csv", ".tsv")):
            rows = csv.reader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ",")
            for i, row in enumerate(rows):
                yield f"{path.name}:{i + 1}", " ".join(row)  # one item per row: question and choices
        elif name.endswith(".json") and text.lstrip().startswith("["):
            for i, rec in enumerate(json.loads(text)):
                yield from ((f"{path.name}:{i + 1}", t) for t in _strings(rec, wanted))
        else:
            for i, line in enumerate(text.splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    yield from ((f"{path.name}:{i + 1}", t) for t in _strings(rec, wanted))


def iter_eval_items(spec: str, fields: list[str] | None = None) -> Iterator[str]:
    """Every text item of an eval-set spec (file, folder or glob)."""
    for _, text in iter_eval_records(spec, fields):
        yield text


@dataclass
class EvalIndex:
    """Sorted unique n-gram keys of the eval items, the item each key came from, and the word
    counts of the short items (hashed whole)."""

    hashes: np.ndarray
    owners: np.ndarray  # index into labels, one per hash
    labels: list[str]
    items: int
    short: list[int]

    def owner_labels(self) -> list[str]:
        return [self.labels[i] for i in self.owners]


def build_eval_index(
    eval_sets: Iterable[str], fields: list[str] | None, n: int, min_item_words: int
) -> EvalIndex:
    """Hash every eval item's n-grams (or the whole item when shorter than `n`); the first item
    owning a key is the one reported."""
    owner: dict[int, int] = {}
    labels: list[str] = []
    short_lengths: set[int] = set()
    items = 0
    for spec in eval_sets:
        for label, item in iter_eval_records(spec, fields):
            words = words_of(item)
            if len(words) >= n:
                keys = list(ngram_hashes(words, n))
            elif len(words) >= min_item_words:
                keys = [_short_key(words)]
                short_lengths.add(len(words))
            else:
                continue
            if not labels or labels[-1] != label:
                labels.append(label)
            for h in keys:
                owner.setdefault(h, len(labels) - 1)
            items += 1
    hashes = np.array(sorted(owner), dtype=np.uint64)
    owners = np.array([owner[int(h)] for h in hashes], dtype=np.int64)
    return EvalIndex(hashes, owners, labels, items, sorted(short_lengths))


def build_eval_ngrams(
    eval_sets: Iterable[str], fields: list[str] | None, n: int, min_item_words: int
) -> tuple[np.ndarray, int, list[int]]:
    """Sorted unique n-gram hashes of all eval items, the number of items read, and the word
    counts of the short items (those hashed whole)."""
    index = build_eval_index(eval_sets, fields, n, min_item_words)
    return index.hashes, index.items, index.short


def _short_key(words: list[str]) -> int:
    return xxhash.xxh3_64_intdigest(("\x00short\x00" + " ".join(words)).encode())


class Decontaminate(Step):
    name = "decontam"

    def __init__(
        self,
        ngram_hashes: np.ndarray,
        n: int = 13,
        short_lengths: Iterable[int] = (),
        mode: str = "drop",
        max_examples: int = 3,
        owners: Sequence[str] | None = None,
    ):
        super().__init__(mode, max_examples)
        labels = owners if owners is not None else [""] * len(ngram_hashes)
        self.hashes: dict[int, str] = {int(h): lab for h, lab in zip(ngram_hashes, labels)}
        self.n = n
        self.short_lengths = sorted(set(short_lengths))

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> Decontaminate | None:
        """None unless the stage built an eval index (``context["decontam"]``) with keys in it."""
        index = context.get("decontam")
        if index is None or not len(index[0]):
            return None
        hashes, short, owners = index
        return cls(hashes, section.ngram, short, section.mode, max_examples, owners)

    def apply(self, doc: Document) -> str | None:
        if not self.hashes:
            return None
        words = words_of(doc.text)
        for h in ngram_hashes(words, self.n):
            if h in self.hashes:
                self._mark(doc, h)
                return "eval_ngram_overlap"
        # short eval items: does the document contain one whole? (only their lengths are tried)
        if self.short_lengths:
            for k in self.short_lengths:
                for i in range(len(words) - k + 1):
                    h = _short_key(words[i : i + k])
                    if h in self.hashes:
                        self._mark(doc, h)
                        return "eval_item_contained"
        return None

    def _mark(self, doc: Document, key: int) -> None:
        doc.meta["contaminated"] = True
        if self.hashes[key]:
            doc.meta["contaminated_by"] = self.hashes[key]
            self.stats.count(f"matched:{self.hashes[key]}")
