"""Token shards on disk and the loader that turns them into training batches.

A split is tokenised once into three files, so training never tokenises and never holds the
corpus in memory:

    {split}.bin      every document as [BOS] + tokens, concatenated; uint16 when the vocab
                     fits (half the bytes of uint32), else uint32; memory-mapped at load
    {split}.idx.npy  int64 offset of each document's BOS in .bin
    {split}.json     the index: dtype, n_tokens, n_docs, n_bytes (UTF-8 bytes of the texts,
                     for bits-per-byte), bos_id, vocab_size; written last, so its presence
                     means the other two are complete (all three are written atomically)

`load_shard` checks the .bin size against the index, so a truncated copy fails loudly instead
of training on garbage; verifies the three files against the size and sha256 their stage
recorded (`lmforge.artifacts`), so a shard overwritten with other valid ids is caught too; and
range-checks every token id against the vocabulary (one pass over the memory map, chunked), so
an out-of-range id is an error naming the file and the first bad position, not an IndexError
from inside the embedding.

`TokenLoader` is **BOS-aligned**: every row of a batch starts at a document start, so the model
always sees a document's beginning with no stale context before it (as nanochat does); a
document longer than seq_len adds windows at doc_start + k*seq_len that start mid-document. A
window that runs past its document continues into the next one (standard pretraining
packing), so with documents much shorter than seq_len a token appears in several windows per
epoch. Windows are shuffled per epoch by a numpy Generator seeded with (seed, epoch), and the
loader is an endless stream of epochs whose whole state is ``{"epoch", "position"}``:
restoring it reproduces exactly the batches an uninterrupted run would have drawn.
`iter_eval_windows` instead covers the tokens once, in order, in non-overlapping windows,
which is what a validation loss (and bits per byte) needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.artifacts import verify_path
from lmforge.errors import DataError
from lmforge.runs import atomic_path, atomic_write_json, fault_point
from lmforge.tokenizer import LMTokenizer


# ----------------------------------------------------------------------------- writing
def shard_paths(out_dir: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    d = Path(out_dir)
    return d / f"{split}.bin", d / f"{split}.idx.npy", d / f"{split}.json"


def write_token_shards(
    docs: Iterable, tok: LMTokenizer, out_dir: str | os.PathLike, split: str, batch_docs: int = 512
) -> dict:
    """Tokenise `docs` (strings or Documents) into `{split}.bin/.idx.npy/.json`; return the index."""
    if tok.bos_id is None:
        raise DataError("the tokenizer has no BOS token; token shards need one to mark document starts")
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    bin_path, idx_path, json_path = shard_paths(out_dir, split)
    starts: list[int] = []
    n_tokens = n_bytes = 0
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for batch in _batches(docs, batch_docs):
            encoded = tok.encode_batch(batch, add_bos=True)
            for ids in encoded:
                starts.append(n_tokens)
                n_tokens += len(ids)
            f.write(np.concatenate([np.asarray(ids, dtype=dtype) for ids in encoded]).tobytes())
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            fault_point(f"tokens:{split}.bin", bin_path)  # crash-harness hook: a half-written shard
        if not starts:
            raise DataError(f"no non-empty documents to write for split '{split}'; check the data spec")
    with atomic_path(idx_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(starts, dtype=np.int64))
    meta = {
        "split": split,
        "dtype": np.dtype(dtype).name,
        "n_tokens": n_tokens,
        "n_docs": len(starts),
        "n_bytes": n_bytes,
        "bos_id": tok.bos_id,
        "vocab_size": tok.vocab_size,
    }
    atomic_write_json(json_path, meta)
    return meta


def _batches(docs: Iterable, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        text = doc if isinstance(doc, str) else doc.text
        if text:
            batch.append(text)
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- reading
@dataclass
class Shard:
    """One split on disk: memory-mapped tokens, document start offsets, the index dict."""

    tokens: np.memmap
    doc_starts: np.ndarray
    meta: dict
    path: Path

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])


def load_shard(directory: str | os.PathLike, split: str, vocab_size: int | None = None) -> Shard:
    """Open `{split}.*` in `directory`, checking every file against the index, its recorded
    hash and every token id against the index's vocab_size (and `vocab_size`, the consumer's,
    when given)."""
    bin_path, idx_path, json_path = shard_paths(directory, split)
    hint = "re-run the tokenize stage to rewrite it"
    for p in (json_path, idx_path, bin_path):
        verify_path(p)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{json_path}: no such shard index; run the tokenize stage first") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: corrupt shard index ({e}); {hint}") from e
    dtype = np.dtype(meta["dtype"])
    expected = int(meta["n_tokens"]) * dtype.itemsize
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: missing token file; {hint}")
    size = bin_path.stat().st_size
    if size != expected or expected == 0:
        raise DataError(
            f"{bin_path}: truncated or corrupt: {size:,} bytes, expected {expected:,} "
            f"({meta['n_tokens']:,} {dtype.name} tokens); {hint}"
        )
    try:
        doc_starts = np.load(idx_path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{idx_path}: missing or corrupt document index ({e}); {hint}") from e
    if doc_starts.ndim != 1 or len(doc_starts) != int(meta["n_docs"]):
        raise DataError(f"{idx_path}: {doc_starts.shape} document offsets, expected {meta['n_docs']}; {hint}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(meta["n_tokens"]),))
    limits = [int(v) for v in (meta.get("vocab_size"), vocab_size) if v is not None]
    if limits:
        check_token_range(tokens, min(limits), bin_path, hint)
    return Shard(tokens=tokens, doc_starts=doc_starts.astype(np.int64), meta=meta, path=bin_path)


def check_token_range(
    tokens: np.ndarray, vocab_size: int, path: Path, hint: str, chunk: int = 1 << 24
) -> None:
    """Every id < vocab_size (ids are unsigned), in chunks so a huge memory map is never copied."""
    for start in range(0, len(tokens), chunk):
        block = np.asarray(tokens[start : start + chunk])
        if block.size and int(block.max()) >= vocab_size:
            pos = start + int(np.argmax(block >= vocab_size))
            raise DataError(
                f"{path}: token id {int(tokens[pos])} at position {pos:,} is outside the vocabulary "
                f"(size {vocab_size}); the shard does not belong to this tokenizer/model or is corrupt; {hint}"
            )


# ----------------------------------------------------------------------------- batching
def window_starts(shard: Shard, seq_len: int) -> np.ndarray:
    """BOS-aligned window starts: doc_start + k*seq_len inside each document, each with
    seq_len + 1 tokens available (inputs plus the shifted targets)."""
    ends = np.append(shard.doc_starts[1:], shard.n_tokens)
    lengths = ends - shard.doc_starts
    counts = -(-lengths // seq_len)  # ceil: windows starting inside each document
    starts = np.repeat(shard.doc_starts, counts) + seq_len * _ranges(counts)
    return starts[starts + seq_len + 1 <= shard.n_tokens]


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..counts[0]), [0..counts[1]), ..."""
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum()), dtype=np.int64) - offsets


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class TokenLoader:
    """Endless, resumable stream of (x, y) int64 batches [batch_size, seq_len], y = x shifted by one.

    Data parallel: with `world` > 1 every rank walks the same global order and takes rows
    [rank*batch_size, (rank+1)*batch_size) of each global batch of batch_size*world windows, so
    the position is the same on all ranks and a run resumes on a different number of ranks
    (keeping the global batch) exactly where it stopped.
    """

    def __init__(
        self,
        shard: Shard,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.shard, self.seq_len, self.batch_size = shard, seq_len, batch_size
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.starts = window_starts(shard, seq_len)
        if len(self.starts) == 0:
            raise DataError(
                f"{shard.path}: only {shard.n_tokens:,} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; lower seq_len or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, self.starts

    @property
    def n_windows(self) -> int:
        """Windows per epoch."""
        return len(self.starts)

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return self.starts
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = self.starts[rng.permutation(len(self.starts))], self.epoch
        return self._order

    def _next_starts(self) -> np.ndarray:
        picked: list[np.ndarray] = []
        need = self.batch_size * self.world
        while need:
            order = self._epoch_order()
            take = order[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        rows = np.concatenate(picked)
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _gather(self.shard.tokens, self._next_starts(), self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_windows:
            raise DataError(
                f"loader state {state} does not fit this shard ({self.n_windows} windows "
                f"per epoch at seq_len {self.seq_len}); was the data or seq_len changed?"
            )
        self.epoch, self.position = epoch, position


def iter_eval_windows(
    shard: Shard, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping contiguous windows from token 0, in order: every token predicted once.

    `max_tokens` caps the predicted tokens (rounded down to whole windows, at least one).
    The last batch may be smaller than batch_size.
    """
    n_windows = (shard.n_tokens - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise DataError(
            f"{shard.path}: only {shard.n_tokens:,} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}; lower seq_len or add validation data"
        )
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    for i in range(0, n_windows, batch_size):
        yield _gather(shard.tokens, starts[i : i + batch_size], seq_len)
