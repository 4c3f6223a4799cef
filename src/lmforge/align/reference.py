"""The frozen reference of DPO-style training: its log-probs computed once and cached on disk.

DPO needs log pi_ref(chosen|x) and log pi_ref(rejected|x) for every pair it sees; the reference
never changes, so scoring each pair once and keeping two floats per pair replaces a second full
model in memory (and its forward pass every step). The cache is `ref_logps.safetensors` in the
stage folder: `keys` uint8 [N, 16] (a hash of the *tokenised* pair, so a change of tokenizer,
template or truncation misses the cache instead of reusing stale numbers), `chosen` and
`rejected` float32 [N]. No pickle. An interrupted stage reuses what was already scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..runs import atomic_path
from ..train.objectives.preference import completion_logps
from .pair_batches import collate_pairs
from .preference import Pair

CACHE_FILE = "ref_logps.safetensors"
RefTable = dict[bytes, tuple[float, float]]


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, device, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logp, rejected logp, chosen tokens, rejected tokens) per pair, summed over the
    completion; the model is run in eval mode, `batch_size` pairs at a time, in order."""
    was = model.training
    model.eval()
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i : i + batch_size], pad_id)
        lp, n = completion_logps(model, b["input_ids"].to(device), b["labels"].to(device))
        k = lp.shape[0] // 2
        for j, t in enumerate((lp[:k], lp[k:], n[:k], n[k:])):
            outs[j].append(t.float().cpu())
    model.train(was)
    if not outs[0]:
        return tuple(torch.zeros(0) for _ in range(4))  # type: ignore[return-value]
    return tuple(torch.cat(o) for o in outs)  # type: ignore[return-value]


def load_cache(path: Path) -> RefTable:
    if not path.exists():
        return {}
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable reference cache ({e}); delete it to recompute") from None
    keys = t["keys"].numpy()
    return {
        bytes(k): (float(c), float(r)) for k, c, r in zip(keys, t["chosen"].tolist(), t["rejected"].tolist())
    }


def portable_note(note: str, path: Path) -> str:
    """`note` (the reference model's folder) relative to the run directory holding the cache at
    `path` when it lies inside it, so identical runs under two roots write identical files;
    a folder outside the run is kept as given."""
    run_dir = Path(os.path.realpath(path)).parent.parent
    ref = Path(os.path.realpath(note)) if note else None
    if ref is not None and ref.is_relative_to(run_dir):
        return ref.relative_to(run_dir).as_posix()
    return note


def save_cache(path: Path, table: RefTable, note: str = "") -> None:
    note = portable_note(note, path)
    keys = list(table)
    tensors = {
        "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 16),
        "chosen": torch.tensor([table[k][0] for k in keys], dtype=torch.float32),
        "rejected": torch.tensor([table[k][1] for k in keys], dtype=torch.float32),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "lmforge-ref-logps", "reference": note})
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """safetensors writes `__metadata__` in hash-map order, which varies from run to run; put
    its keys in sorted order (same length, tensors untouched) so identical runs write
    identical files."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # always equal: the same characters, reordered
            f.seek(8)
            f.write(text.ljust(n, b" "))


def precompute_reference(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    path: Path,
    pad_id: int,
    device,
    *,
    batch_size: int = 16,
    note: str = "",
    log: Callable[[str], None] = print,
) -> RefTable:
    """Score every pair not yet in the cache at `path` with `model`, save, return the table
    (rounded to float32, the same numbers the file holds)."""
    table = load_cache(path)
    todo = list({p.key(): p for p in pairs if p.key() not in table}.values())
    if todo:
        c, r, _, _ = pair_logps(model, todo, pad_id, device, batch_size)
        for p, a, b in zip(todo, c.tolist(), r.tolist()):
            table[p.key()] = (a, b)
        save_cache(path, table, note)
    log(
        f"reference log-probs: {len(todo)} pair(s) scored, {len(pairs) - len(todo)} from the cache {path.name}"
    )
    return table
