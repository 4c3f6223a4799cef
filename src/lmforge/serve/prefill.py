"""Prompt forwards into the engine's slot cache, several prompts per forward.

Why: requests admitted together (a batch from `Engine.generate`, a burst of server requests,
the groups of an RL step) would otherwise be prefilled one forward each: on a GPU each forward
is launch-bound, so 256 prompts cost 256 times the latency of one; on a CPU the per-forward
overhead adds up the same way. Here prompts are right-padded into one batch per chunk of at
most `max_tokens` padded tokens. Right padding is exact under causal attention: a real token
never attends to the pad tokens after it, and the logits are read at each row's last real
token. The pad tokens do write K/V into their slot's columns past the prompt; those columns
are overwritten by the decode step that reaches them before any query may see them (keys past
a row's position are masked, or beyond `k_len`).

Models without the fused fast path (LoRA-wrapped, quantised: an RL policy, a model being
tuned) are batched the same way through their own `hidden_states`, the LM head applied to each
row's last real position only; a model whose mixture-of-experts routing has a capacity limit
(pad tokens could then take a real token's expert slot) or that is not an lmforge `Transformer`
is prefilled one prompt at a time.

Chunked prefill (`prefill_chunk`): the engine prefills a prompt longer than its `prefill_chunk`
a chunk per worker step, with a decode step of the running requests between chunks, so a long
prompt delays the others by one chunk's forward, not by the whole prompt's. A chunk's queries
attend causally to the cached keys of the chunks before it (and, for a sliding-window layer, to
the window's band of them), which is exactly what the one-shot forward computes (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.transformer import Transformer

DEFAULT_MAX_TOKENS = 8192  # padded prompt tokens per forward: bounds the activation memory


def _chunks(jobs: Sequence[tuple[int, list[int]]], max_tokens: int):
    group: list[tuple[int, list[int]]] = []
    longest = 0
    for job in jobs:
        n = max(longest, len(job[1]))
        if group and n * (len(group) + 1) > max_tokens:
            yield group
            group, n = [], len(job[1])
        group.append(job)
        longest = n
    if group:
        yield group


def _batchable(model) -> bool:
    cfg = getattr(model, "cfg", None)
    moe_capped = bool(getattr(cfg, "n_experts", 0)) and getattr(cfg, "capacity_factor", None) is not None
    return isinstance(model, Transformer) and not moe_capped


def _padded(group: Sequence[tuple[int, list[int]]], device):
    """Right-padded ids [B, T], the slots [B], each row's last real position [B], and T."""
    T = max(len(ids) for _, ids in group)
    x = torch.zeros(len(group), T, dtype=torch.long)
    for r, (_, ids) in enumerate(group):
        x[r, : len(ids)] = torch.tensor(ids)
    slots = torch.tensor([s for s, _ in group], device=device)
    last = torch.tensor([len(ids) - 1 for _, ids in group], device=device)
    return x.to(device), slots, last, T


@torch.no_grad()
def prefill(
    fast, model, cache, jobs: Sequence[tuple[int, list[int]]], device, max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[torch.Tensor]:
    """Write each job's prompt (slot, token ids) into `cache`; its last position's logits
    [V] (float32) per job, in order."""
    out: list[torch.Tensor] = []
    if fast is None and _batchable(model):
        for group in _chunks(jobs, max_tokens):
            x, slots, last, T = _padded(group, device)
            h = model.hidden_states(
                x, position_ids=torch.arange(T, device=device), cache=cache.prefill_rows(slots, T)
            )
            out.extend(model.lm_head(h[torch.arange(len(group), device=device), last]).float().unbind(0))
        return out
    if fast is None:
        for slot, ids in jobs:
            n = len(ids)
            x = torch.tensor([ids], device=device)
            logits = model(x, position_ids=torch.arange(n, device=device), cache=cache.prefill(slot, n))
            out.append(logits[0, -1].float())
        return out
    for group in _chunks(jobs, max_tokens):
        x, slots, last, T = _padded(group, device)
        pos = torch.arange(T, device=device)[None].expand(len(group), T)
        logits = fast.forward(x, pos, cache, slot=slots, last=last).float()
        out.extend(logits.unbind(0))
    return out


@torch.no_grad()
def prefill_chunk(fast, model, cache, slot: int, ids: list[int], start: int, device) -> torch.Tensor:
    """Write the prompt chunk `ids` at positions start.. of `slot` (positions before `start` are
    already in the cache); the logits [V] (float32) of its last position."""
    n = len(ids)
    x = torch.tensor([ids], device=device)
    pos = torch.arange(start, start + n, device=device)
    if fast is not None:
        return fast.forward(x, pos[None], cache, slot=slot, start=start)[0].float()
    return model(x, position_ids=pos, cache=cache.prefill(slot, n, start))[0, -1].float()
