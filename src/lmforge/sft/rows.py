"""Training rows for SFT: conversations (`chat.Example`) packed into `seq_len` rows as separate
documents, or one per row batched by a token budget; collation to tensors with everything the
objective needs computed on the host (target positions, counts, document ids), so a training step
never reads the device back; and the held-out assistant loss.

Packing concatenates whole conversations greedily until the row is full; every conversation is
its own document (`doc_ids`), so attention never crosses from one into another, and positions
restart at 0 per document, as if each were alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..chat import Example
from ..data.batches import ShuffledBatches, TokenBudgetBatches
from ..errors import DataError
from ..model.attention import padded_length
from ..train.objectives.sft import IGNORE, SFTObjective


@dataclass
class Row:
    """One training row: token ids, next-token targets (IGNORE where no loss), position ids and
    segment ids (which example each token belongs to)."""

    ids: list[int]
    labels: list[int]
    pos: list[int]
    seg: list[int]


def example_row(ex: Example, seg: int = 0) -> Row:
    labels = [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])] + [IGNORE]
    return Row(list(ex.ids), labels, list(range(len(ex))), [seg] * len(ex))


def pack(examples: Sequence[Example], seq_len: int) -> list[Row]:
    """Best-fit-decreasing packing of examples into rows of <= seq_len tokens."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        if n > seq_len:
            raise DataError(
                f"example of {n} tokens does not fit seq_len {seq_len}; encode with max_len=seq_len"
            )
        best = -1
        for b, f in enumerate(free):
            if f >= n and (best < 0 or f < free[best]):
                best = b
        if best < 0:
            bins.append([i])
            free.append(seq_len - n)
        else:
            bins[best].append(i)
            free[best] -= n
    rows = []
    for members in bins:
        r = Row([], [], [], [])
        for s, i in enumerate(sorted(members)):
            er = example_row(examples[i], s)
            r.ids += er.ids
            r.labels += er.labels
            r.pos += er.pos
            r.seg += er.seg  # noqa: E702
        rows.append(r)
    return rows


def collate(rows: Sequence[Row], pad_id: int, *, packed: bool) -> dict:
    """Right-padded tensors plus what the objective needs without reading the device back:
    `target_index` (flat positions that carry a target), `targets` (those targets) and
    `n_targets` (a host int). Packed rows get `position_ids` and `doc_ids` (the example of each
    token, -1 for padding), from which the model builds its document mask (`DocumentMask`), and
    are padded to a multiple of 128 tokens (few distinct shapes for the compiled kernel; the pad
    is its own document). Unpacked rows need no mask (right padding is invisible to causal
    attention) and no rounding: with many short rows per token-budget batch it cost ~20% more
    peak memory on an H200 and no speed (benchmarks/RESULTS.md)."""
    T = max(len(r.ids) for r in rows)
    if packed:
        T = padded_length(T)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        labels[b, :n] = torch.tensor(r.labels)
        pos[b, :n] = torch.tensor(r.pos)
        seg[b, :n] = torch.tensor(r.seg)
    flat = labels.flatten()
    index = torch.nonzero(flat != IGNORE).squeeze(1)
    out = {
        "input_ids": ids,
        "labels": labels,
        "target_index": index,
        "targets": flat[index],
        "n_targets": int(index.numel()),
        "n_tokens": sum(len(r.ids) for r in rows),
    }
    if packed:
        out["position_ids"] = pos
        out["doc_ids"] = seg
    return out


_NO_ROWS = "no training examples left after filtering; check the data and seq_len"


class RowLoader(ShuffledBatches):
    """Shuffled batches of SFT rows (packed or one example per row), `batch_size` rows each."""

    def __init__(self, rows: Sequence[Row], batch_size: int, pad_id: int, *, packed: bool, seed: int):
        super().__init__(
            rows, batch_size, lambda b: collate(b, pad_id, packed=packed), seed=seed, empty=_NO_ROWS
        )


def row_loader(
    rows: Sequence[Row], batch_size: int, seq_len: int, pad_id: int, *, packed: bool, seed: int
) -> RowLoader | TokenBudgetBatches:
    """The SFT training loader: packed rows `batch_size` at a time; unpacked rows by a budget of
    `batch_size x seq_len` tokens, so both carry about the same number of tokens per step."""
    if packed:
        return RowLoader(rows, batch_size, pad_id, packed=True, seed=seed)
    return TokenBudgetBatches(
        rows,
        [len(r.ids) for r in rows],
        batch_size * seq_len,
        lambda b: collate(b, pad_id, packed=False),
        seed=seed,
        empty=_NO_ROWS,
    )


@torch.no_grad()
def assistant_loss(model, examples: Sequence[Example], pad_id: int, device, batch_size: int = 16) -> float:
    """Mean loss per assistant token over `examples` (unpacked, in order)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = [example_row(e) for e in examples]
    obj = SFTObjective()
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i : i + batch_size], pad_id, packed=False)
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        loss, n, _ = obj(model, b)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)
