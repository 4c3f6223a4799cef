"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH).

Both are global decisions, so they run in two halves as in datatrove: every task computes, per
surviving document, a 64-bit hash of its normalised text and a MinHash signature (`MinHasher`,
vectorised numpy), stored next to the task's output; the finalising phase groups the hashes,
bands the signatures (`lsh_clusters`) and keeps the first document of every cluster in input
order. Clusters are written out so a user can read what was merged.

MinHash: every word of the normalised text is hashed once (xxh3), word n-grams (default 5) are
combined from those hashes with vectorised numpy arithmetic (no per-n-gram string building) and
reduced to 32 bits; then ``num_perm = bands * rows`` hash functions from the multiply-add-shift
family ``h_i(x) = ((a_i x + b_i) mod 2^64) >> 32`` -- strongly universal for 32-bit keys
(Dietzfelbinger 1996), the same guarantee as datasketch's ``(a x + b) mod (2^61 - 1)`` but without
a 64-bit modulo, which numpy computes slowly. LSH: a document's signature
is cut into `bands` bands of `rows` values; documents whose band hashes agree in any band are
candidates, and candidates are merged with union-find. 14 bands x 8 rows (FineWeb) makes a
pair with Jaccard 0.75 a candidate with probability 1 - (1 - 0.75^8)^14 = 0.92, 0.5 with 0.05.

Why not a library: datatrove's MinHash is a four-stage job that owns its own file layout and
executor; datasketch's per-document objects are several times slower
(benchmarks/data_dedup.py) and its LSH index keeps everything in Python dicts.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_SHIFT = np.uint64(32)
_PUNCT = re.compile(r"[^\w\s]+", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation removed, whitespace collapsed: the text dedup compares."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_hash(text: str, normalized: str | None = None) -> int:
    norm = normalize(text) if normalized is None else normalized
    return xxhash.xxh3_64_intdigest(norm.encode("utf-8", "surrogatepass"))


class MinHasher:
    """Signatures of `bands * rows` 32-bit minima and the per-band 64-bit LSH keys."""

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        self.num_perm = bands * rows
        rng = np.random.RandomState(seed)

        def draw(n: int) -> np.ndarray:
            return rng.randint(0, 1 << 62, size=n, dtype=np.uint64) * np.uint64(4) + np.uint64(1)

        self.a, self.b = draw(self.num_perm), draw(self.num_perm)
        self.mix = draw(max(ngram, 1))  # odd multipliers combining word hashes into n-gram hashes

    def shingles(self, text: str, normalized: str | None = None) -> np.ndarray:
        """Unique 32-bit hashes of the word n-grams (one hash of the whole text if it is shorter)."""
        norm = normalize(text) if normalized is None else normalized
        words = norm.encode("utf-8", "surrogatepass").split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        w = np.fromiter(map(xxhash.xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))
        n = min(self.ngram, len(w))
        m = len(w) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):  # h = sum_k w[i+k] * mix[k]  (mod 2^64): order-sensitive n-gram hash
            h += w[k : k + m] * self.mix[k]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
        return np.unique(h >> _SHIFT)

    def signature(self, text: str, normalized: str | None = None) -> np.ndarray:
        sh = self.shingles(text, normalized)
        if not len(sh):
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(sh), 4096):  # bounded memory on huge documents
            block = sh[start : start + 4096, None]
            np.minimum(sig, ((block * self.a + self.b) >> _SHIFT).min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        rows = sig.reshape(self.bands, self.rows)
        return np.array([xxhash.xxh3_64_intdigest(r.tobytes()) for r in rows], dtype=np.uint64)


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return int(root)

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index stays root: clusters keep their first document
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry


def lsh_clusters(band_keys: np.ndarray, signatures=None, verify_threshold: float | None = None) -> np.ndarray:
    """Root (smallest member index) of each document's near-duplicate cluster.

    band_keys: (n_docs, bands) uint64. If `verify_threshold` is set, `signatures` (n_docs, perms)
    must be given and a candidate pair is merged only when its estimated Jaccard reaches it.
    """
    n = len(band_keys)
    uf = UnionFind(n)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    for b in range(band_keys.shape[1]):
        keys = band_keys[:, b]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if not len(same):
            continue
        is_start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        bucket_start = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))
        for i in same:  # consecutive members of a bucket: chain them to the bucket's first
            x, y = int(order[i]), int(order[i + 1])
            if verify_threshold is not None:
                x = int(order[bucket_start[i]])
                if np.mean(signatures[x] == signatures[y]) < verify_threshold:
                    continue
            uf.union(x, y)
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))
