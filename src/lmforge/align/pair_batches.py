"""Preference pairs as training batches: chosen and rejected completions of one prompt packed as
two documents of one row (one forward for both, the attention mask keeping them apart), or as
2B right-padded rows; log-prob gather indices and counts computed on the host; a resumable,
shuffled loader that carries each pair's cached reference log-probs along.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.batches import ShuffledBatches
from ..model.attention import padded_length
from ..train.objectives.sft import IGNORE
from .preference import Pair


def pair_rows(pairs: Sequence[Pair]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) rows: every chosen, then every rejected."""
    return [(p.prompt + p.chosen, len(p.prompt)) for p in pairs] + [
        (p.prompt + p.rejected, len(p.prompt)) for p in pairs
    ]


def _target_keys(labels: torch.Tensor, seq_of: torch.Tensor, n_seqs: int) -> dict:
    """Host-computed gather indices for the log-prob objective: the flat positions that carry a
    label, their targets, which sequence each belongs to, and labelled tokens per sequence."""
    flat = labels.flatten()
    index = torch.nonzero(flat != IGNORE).squeeze(1)
    seq = seq_of.flatten()[index]
    return {
        "target_index": index,
        "targets": flat[index],
        "target_seq": seq,
        "seq_counts": torch.bincount(seq, minlength=n_seqs),
    }


def collate_rows(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-padded `input_ids`, `labels` (next-token targets on completion tokens only) and
    `lengths` (real tokens per row; a reward model reads its score at lengths - 1), plus the
    gather indices of `_target_keys` (each row is one sequence). Rows are padded to a multiple of
    128 tokens, so compiled kernels and the allocator see few distinct shapes."""
    T = padded_length(max(len(ids) for ids, _ in rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (row, plen) in enumerate(rows):
        t = torch.tensor(row, dtype=torch.long)
        ids[b, : len(row)] = t
        labels[b, plen - 1 : len(row) - 1] = t[plen:]
    lengths = torch.tensor([len(row) for row, _ in rows], dtype=torch.long)
    seq_of = torch.arange(len(rows))[:, None].expand(len(rows), T)
    return {
        "input_ids": ids,
        "labels": labels,
        "lengths": lengths,
        "n_tokens": int(lengths.sum()),
        **_target_keys(labels, seq_of, len(rows)),
    }


def collate_packed_pairs(pairs: Sequence[Pair], pad_id: int) -> dict:
    """B pairs as B rows, each `prompt+chosen` then `prompt+rejected` as two documents (own
    positions from 0, `doc_ids` 0 and 1, -1 on padding), so one forward of B rows of about twice
    the length replaces 2B padded rows. Sequence s of `target_seq` is chosen b for s = b and
    rejected b for s = B + b, the order the unpacked layout uses."""
    B = len(pairs)
    rows = [(p.prompt + p.chosen, p.prompt + p.rejected, len(p.prompt)) for p in pairs]
    T = padded_length(max(len(c) + len(r) for c, r, _ in rows))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    seq_of = torch.full((B, T), -1, dtype=torch.long)
    for b, (c, r, plen) in enumerate(rows):
        s = 0
        for d, seq in enumerate((c, r)):
            n, t = len(seq), torch.tensor(seq, dtype=torch.long)
            ids[b, s : s + n] = t
            labels[b, s + plen - 1 : s + n - 1] = t[plen:]
            pos[b, s : s + n] = torch.arange(n)
            doc[b, s : s + n] = d
            seq_of[b, s : s + n] = b + d * B
            s += n
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "doc_ids": doc,
        "n_tokens": sum(len(c) + len(r) for c, r, _ in rows),
        **_target_keys(labels, seq_of, 2 * B),
    }


def collate_pairs(
    pairs: Sequence[Pair],
    pad_id: int,
    ref: dict[bytes, tuple[float, float]] | None = None,
    *,
    packed: bool = False,
) -> dict:
    """A batch of B pairs -- 2B rows (chosen rows first), or with `packed` B rows holding chosen
    and rejected as two documents -- the margins, and the reference's cached log-probs [2B]
    (chosen first) when `ref` (key -> (chosen, rejected)) is given."""
    out = collate_packed_pairs(pairs, pad_id) if packed else collate_rows(pair_rows(pairs), pad_id)
    out["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    out["n_pairs"] = len(pairs)
    if ref is not None:
        vals = [ref[p.key()] for p in pairs]
        out["ref_logps"] = torch.tensor([v[0] for v in vals] + [v[1] for v in vals], dtype=torch.float32)
    return out


class PairLoader(ShuffledBatches):
    """Shuffled batches of pairs (chosen and rejected collated together -- as two documents of
    one row with `packed` -- with cached reference log-probs when given); resumable like every
    engine loader."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        batch_size: int,
        pad_id: int,
        *,
        seed: int,
        ref: dict[bytes, tuple[float, float]] | None = None,
        packed: bool = False,
    ):
        super().__init__(
            pairs,
            batch_size,
            lambda b: collate_pairs(b, pad_id, ref, packed=packed),
            seed=seed,
            empty="no preference pairs left after filtering; check the data and seq_len",
        )
