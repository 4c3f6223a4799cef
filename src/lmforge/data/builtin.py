"""The built-in corpus: real human-written English that every Python install already carries.

lmforge must train a tokenizer and a tiny model end to end with no network and no downloads
(the CPU pipeline, the tests, a first-time user on a plane). Synthetic text would make every
number meaningless, so we harvest prose from the interpreter itself:

* the docstrings of the standard library (module, class and function), read by parsing the
  ``.py`` files with `ast` -- never by importing them, since importing ``antigravity`` opens a
  browser, ``this`` prints, and others touch the OS or the GUI;
* the pydoc help-topic pages (``pydoc_data.topics.topics``: long sections of the language
  reference, e.g. "assert", "for", "NUMBERS"), one document each.

About 2 MB of text (Python 3.11), dominated by English prose with some code in doctests.
Docstrings are deduplicated exactly (hash of whitespace-normalised text, first occurrence in
sorted path order wins: ``_pyio`` repeats ``io``), then each module's remaining docstrings are
joined, in source order, into one document -- paragraphs of prose long enough to fill training
windows. Modules with less than ``min_chars`` of text are dropped, and whole documents are
deduplicated once more. Everything is sorted, so the corpus is identical on every run of the
same Python version (another Python version gives a different, equally valid, corpus).

`split_train_val` assigns each document to val by hashing ``(seed, text)``: stable across runs,
machines and input order, independent of everything else in the corpus.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from lmforge.data.document import Document
from lmforge.errors import ConfigError, DataError

SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
)
MIN_DOCSTRING_CHARS = 16  # drop "XXX"-style fragments inside a module's text
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def harvest_builtin_corpus(
    min_chars: int = 200, stdlib_dir: str | os.PathLike | None = None
) -> list[Document]:
    """All built-in documents (stdlib docstrings per module + pydoc topics), deduplicated, sorted.

    Parsing is cached per process (it takes a few seconds); each call returns fresh `Document`
    objects, so callers may mutate them.
    """
    root = str(stdlib_dir) if stdlib_dir is not None else sysconfig.get_paths()["stdlib"]
    cached = _harvest(int(min_chars), root)
    if not cached:
        raise DataError(
            f"{root}: found no standard-library docstrings or pydoc topics to build the "
            f"built-in corpus from; point the data spec at your own text files instead"
        )
    return [Document(text, source, dict(meta)) for text, source, meta in cached]


@functools.lru_cache(maxsize=4)
def _harvest(min_chars: int, root: str) -> tuple[tuple[str, str, tuple], ...]:
    seen: set[bytes] = set()
    docs: list[tuple[str, str, tuple]] = []
    for rel, docstrings in _stdlib_docstrings(root):
        parts = [d for d in docstrings if len(d) >= MIN_DOCSTRING_CHARS and _first_time(d, seen)]
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append((text, f"stdlib:{rel}", (("kind", "docstrings"), ("n_docstrings", len(parts)))))
    for key, text in _pydoc_topics():
        if len(text) >= min_chars:
            docs.append((text, f"pydoc:topic:{key}", (("kind", "pydoc_topic"),)))
    doc_seen: set[bytes] = set()
    return tuple(d for d in docs if _first_time(d[0], doc_seen))


def _first_time(text: str, seen: set[bytes]) -> bool:
    key = hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()
    if key in seen:
        return False
    seen.add(key)
    return True


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def _stdlib_docstrings(root: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(relative path, docstrings in source order) per parseable stdlib file; parsed once."""
    out = []
    for path in _stdlib_files(Path(root)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a file this Python cannot parse (or read) has nothing for us
        out.append((path.relative_to(root).as_posix(), tuple(_docstrings(tree))))
    return tuple(out)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Cleaned docstrings of `node` and everything nested in it, depth first in source order."""
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=False)
        if doc:
            doc = inspect.cleandoc(doc).strip()
            if doc:
                yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def _pydoc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics  # a plain dict of strings; importing it is inert
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [(key, inspect.cleandoc(text).strip()) for key, text in sorted(topics.items())]


# ----------------------------------------------------------------------------- train/val split
T = TypeVar("T")


def split_train_val(docs: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic split by hashing (seed, text); input order is kept within each split.

    A document's side depends only on its own text and the seed. With two or more documents the
    val split is never empty (the lowest-hash document goes to val) and neither is train.
    Accepts `Document`s or plain strings.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be strictly between 0 and 1 (e.g. 0.05)")
    scores = [_unit_hash(seed, _text_of(d)) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if len(docs) >= 2:
        if not any(is_val):
            is_val[min(range(len(docs)), key=scores.__getitem__)] = True
        if all(is_val):
            is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def split_by_key(
    items: Sequence[T], keys: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """`split_train_val` for any items: each goes to the side its key (e.g. the record's JSON)
    hashes to, so items with equal keys land together. Input order is kept."""
    _, va = split_train_val(list(keys), val_fraction, seed)
    va_set = set(va)
    return (
        [x for x, k in zip(items, keys) if k not in va_set],
        [x for x, k in zip(items, keys) if k in va_set],
    )


def _text_of(doc: object) -> str:
    return doc if isinstance(doc, str) else doc.text  # type: ignore[attr-defined]


def _unit_hash(seed: int, text: str) -> float:
    """A number in [0, 1) from sha256(seed, text): the same on every machine and Python."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
