"""Decontamination: drop or flag training documents that share a long n-gram with an eval set.

The GPT-3 / Llama recipe: normalise (lowercase, keep letters and digits), split into words,
and flag a document if any of its word 13-grams occurs in an evaluation item; an item shorter
than 13 words counts as one n-gram of its own if it has at least `min_item_words` words (shorter
ones, "Yes" or "4", would match everything). The eval n-grams are 64-bit hashes in a Python set:
100k eval items cost a few tens of MB. Items are read from JSONL/JSON/CSV/TXT/Parquet, every
string field unless `eval_fields` names some (a question and its answer are both leakable).

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
from collections.abc import Iterable, Iterator
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
        for k, v in obj.items():
            if fields is None or k in fields:
                yield from _strings(v, None)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v, fields)


def iter_eval_items(spec: str, fields: list[str] | None = None) -> Iterator[str]:
    """Every text item of an eval-set spec (file, folder or glob)."""
    wanted = set(fields) if fields else None
    for path in _eval_files(spec):
        name = path.name.lower().removesuffix(".gz")
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                for row in pq.read_table(path).to_pylist():
                    yield from _strings(row, wanted)
                continue
            with opener(path, "rb") as f:
                raw = f.read()
        except Exception as e:
            raise DataError(f"{path}: cannot read eval set ({type(e).__name__}: {e})") from e
        text = raw.decode("utf-8", errors="replace")
        if name.endswith(".txt"):
            yield from (line for line in text.splitlines() if line.strip())
        elif name.endswith((".csv", ".tsv")):
            for row in csv.reader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ","):
                yield " ".join(row)  # one item per row: question and choices together
        elif name.endswith(".json") and text.lstrip().startswith("["):
            yield from _strings(json.loads(text), wanted)
        else:
            for line in text.splitlines():
                if line.strip():
                    try:
                        yield from _strings(json.loads(line), wanted)
                    except json.JSONDecodeError:
                        continue


def build_eval_ngrams(
    eval_sets: Iterable[str], fields: list[str] | None, n: int, min_item_words: int
) -> tuple[np.ndarray, int, list[int]]:
    """Sorted unique n-gram hashes of all eval items, the number of items read, and the word
    counts of the short items (those hashed whole)."""
    hashes: set[int] = set()
    short_lengths: set[int] = set()
    items = 0
    for spec in eval_sets:
        for item in iter_eval_items(spec, fields):
            words = words_of(item)
            if len(words) >= n:
                hashes.update(ngram_hashes(words, n))
            elif len(words) >= min_item_words:
                hashes.add(_short_key(words))
                short_lengths.add(len(words))
            else:
                continue
            items += 1
    return np.array(sorted(hashes), dtype=np.uint64), items, sorted(short_lengths)


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
    ):
        super().__init__(mode, max_examples)
        self.hashes = set(int(h) for h in ngram_hashes)
        self.n = n
        self.short_lengths = sorted(set(short_lengths))

    def apply(self, doc: Document) -> str | None:
        if not self.hashes:
            return None
        words = words_of(doc.text)
        for h in ngram_hashes(words, self.n):
            if h in self.hashes:
                doc.meta["contaminated"] = True
                return "eval_ngram_overlap"
        # short eval items: does the document contain one whole? (only their lengths are tried)
        if self.short_lengths:
            for k in self.short_lengths:
                for i in range(len(words) - k + 1):
                    if _short_key(words[i : i + k]) in self.hashes:
                        doc.meta["contaminated"] = True
                        return "eval_item_contained"
        return None
