"""Seeded, order-independent choices shared by the two phases of the data stage.

`BottomK` keeps a uniform sample of texts (the k smallest seeded hashes), so the classifier's
training sample does not depend on how the input was cut into tasks; `unit_hash` maps a text to
[0, 1) for the train/val split (the same formula as `builtin.split_train_val`).
"""

from __future__ import annotations

import hashlib
import heapq

import xxhash

SAMPLE_CHARS = 20_000


class BottomK:
    """A uniform, order-independent sample: the k texts with the smallest seeded hash."""

    def __init__(self, k: int, seed: int):
        self.k, self.seed = k, seed
        self.heap: list[tuple[int, str]] = []  # (-key, text): a max-heap on key

    def add(self, text: str, key: int | None = None) -> None:
        if key is None:
            key = xxhash.xxh3_64_intdigest(
                text.encode("utf-8", "surrogatepass"), seed=self.seed & 0xFFFFFFFFFFFFFFFF
            )
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (-key, text[:SAMPLE_CHARS]))
        elif key < -self.heap[0][0]:
            heapq.heapreplace(self.heap, (-key, text[:SAMPLE_CHARS]))

    def items(self) -> list[tuple[int, str]]:
        return sorted((-nk, t) for nk, t in self.heap)

    def texts(self) -> list[str]:
        return [t for _, t in self.items()]


def unit_hash(seed: int, text: str) -> float:
    """A number in [0, 1) from sha256(seed, text); same formula as builtin.split_train_val."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
