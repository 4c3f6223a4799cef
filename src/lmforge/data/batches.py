"""Resumable in-memory batch streams for the list-of-examples stages (SFT rows, preference pairs).

Why here: the engine resumes a run exactly, so a loader's position must be a small state
({epoch, position}) from which the same stream continues; both streams below derive each epoch's
order from (seed, epoch) alone.

* `ShuffledBatches`: a fixed number of items per batch, one permutation per epoch.
* `TokenBudgetBatches`: variable-length items grouped by length under a token budget, so a
  step over short rows carries as many tokens as a packed one (SFT with packing=false).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError


class ShuffledBatches:
    """Endless shuffled batches of in-memory items, collated by `collate_fn`; one permutation per
    epoch seeded by (seed, epoch), so the state {epoch, position} restores the exact stream.
    The engine's resumable loader for every list-of-examples stage (SFT rows, preference pairs)."""

    def __init__(self, items: Sequence, batch_size: int, collate_fn, *, seed: int, empty: str):
        if not items:
            raise DataError(empty)
        self.items, self.batch_size, self.collate_fn, self.seed = items, batch_size, collate_fn, seed
        self.epoch, self.position = 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))

    def __iter__(self):
        perm = self._perm()
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if self.position >= len(perm):
                    self.epoch, self.position = self.epoch + 1, 0
                    perm = self._perm()
                batch.append(self.items[perm[self.position]])
                self.position += 1
            yield self.collate_fn(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class TokenBudgetBatches:
    """Endless batches of variable-length items whose padded size stays within `token_budget`
    tokens (rows x longest row), grouped by length so little of it is padding.

    Per epoch (seeded by (seed, epoch)): shuffle the items, cut the order into pools of
    `pool` items, sort each pool by length, cut it greedily into batches under the budget, then
    shuffle the batches. Every item appears exactly once per epoch; the state {epoch, position}
    (position = batches of this epoch already served) restores the exact stream."""

    def __init__(
        self,
        items: Sequence,
        lengths: Sequence[int],
        token_budget: int,
        collate_fn,
        *,
        seed: int,
        empty: str,
        pool: int = 4096,
    ):
        if not items:
            raise DataError(empty)
        if token_budget < max(lengths):
            raise DataError(
                f"token budget {token_budget} is smaller than the longest row ({max(lengths)} tokens); "
                f"raise batch_size or lower seq_len"
            )
        self.items, self.lengths = items, list(lengths)
        self.token_budget, self.collate_fn, self.seed, self.pool = token_budget, collate_fn, seed, pool
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.items))
        batches: list[list[int]] = []
        for s in range(0, len(perm), self.pool):
            group = sorted(perm[s : s + self.pool].tolist(), key=lambda i: self.lengths[i])
            cur: list[int] = []
            for i in group:  # sorted ascending: the new item is the longest of the batch
                if cur and (len(cur) + 1) * self.lengths[i] > self.token_budget:
                    batches.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                batches.append(cur)
        return [batches[j] for j in rng.permutation(len(batches))]

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        while True:
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
                batches = self.epoch_batches(self.epoch)
            b = batches[self.position]
            self.position += 1
            yield self.collate_fn([self.items[i] for i in b])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
