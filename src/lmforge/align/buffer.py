"""The rollout buffer: prompt + completion rows, completion-aligned indices, and the
micro-batches cut from it (one function for the no-grad behaviour pass and the update, so
their shapes match); plain-list (de)serialisation for checkpoints (no pickle); and the
adapters-off view of a LoRA policy that serves as its own frozen reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


# ----------------------------------------------------------------------------- references
@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Run a LoRA/QLoRA policy as its frozen base model: the reference for KL, with no copy."""
    from ..peft.lora import LoraLinear

    mods = [m for m in model.modules() if isinstance(m, LoraLinear) and not m.merged]
    for m in mods:
        m.merged = True  # LoraLinear.forward returns the base layer's output when merged
    try:
        yield model
    finally:
        for m in mods:
            m.merged = False


# ----------------------------------------------------------------------------- the buffer
def micro_batch(buf: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of the buffer, trimmed to the longest sequence / completion among them. The same
    function builds the no-grad behaviour pass and the training pass, so their shapes match."""
    end = int(buf["seq_end"][rows].max())
    L = max(1, int(buf["mask_len"][rows].max()))
    out = {"input_ids": buf["input_ids"][rows, :end]}
    for k in ("idx", "targets", "mask", "advantages", "old_logp", "ref_logp", "old_values", "returns"):
        if k in buf:
            out[k] = buf[k][rows, :L] if buf[k].dim() == 2 else buf[k][rows]
    return out


def build_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows and completion-aligned gather indices."""
    N = len(completions)
    ends = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T, L = max(ends), max(1, max(len(c) for c in completions))
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    idx = torch.zeros((N, L), dtype=torch.long)
    targets = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros((N, L))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        k = len(c)
        if k:
            idx[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
            targets[i, :k] = torch.tensor(list(c))
            mask[i, :k] = 1.0
    return {
        "input_ids": ids,
        "idx": idx,
        "targets": targets,
        "mask": mask,
        "seq_end": torch.tensor(ends),
        "mask_len": mask.sum(1).long(),
    }  # mask_len: completion lengths


def to_state(buf: dict[str, torch.Tensor]) -> dict:
    return {
        k: {
            "dtype": str(v.dtype).removeprefix("torch."),
            "shape": list(v.shape),
            "data": v.reshape(-1).tolist(),
        }
        for k, v in buf.items()
    }


def from_state(state: dict) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
        for k, v in state.items()
    }
