"""The engine's K/V cache: one preallocated row per slot, written from column 0.

Why a slot row per request: a token's column is then its RoPE position, a request joins or
leaves the running batch without touching the others' rows, and the buffers never move, which
is what a CUDA graph (static_decode.py) needs: fixed addresses, overwritten in place. The class
duck-types `model.transformer.KVCache` (`update`, `length`), so a model called through its own
forward (LoRA-wrapped, imported HF families) writes into it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.resources import MemoryEstimate, check_fits, kv_cache_bytes
from .paged import PagedCache, default_blocks

KV_CACHES = ("slot", "paged")


class SlotCache:
    """K/V buffers with one row per slot. Duck-types `model.transformer.KVCache` (`update`,
    `length`): before each forward the engine says which rows and positions are written."""

    def __init__(self, cfg, slots: int, context: int, device, dtype):
        shape = (slots, cfg.kv_heads, context, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.context, self.device = context, torch.device(device)
        self.length = 0  # the Transformer bumps this; positions are always passed explicitly
        self._mode: tuple[Any, ...] = ()  # what the next forward writes: set by prefill/decode

    def reserve(self, slot: int, tokens: int, shared: int = 0) -> bool:
        """Every slot owns a whole row: nothing to reserve (see paged.PagedCache)."""
        return True

    def release(self, slot: int) -> None:
        """Nothing to give back: the row is the slot's."""

    def prefill(self, slot: int, n: int, start: int = 0) -> SlotCache:
        """The next forward writes positions start..start+n-1 of `slot` (a prompt, or a chunk of
        one whose first `start` positions are already in the cache)."""
        self._mode = ("prefill", slot, start, start + n)
        return self

    def prefill_rows(self, slots: torch.Tensor, n: int) -> SlotCache:
        """The next forward writes positions 0..n-1 of each of `slots` (right-padded prompts, one
        batch row per slot)."""
        self._mode = ("rows", slots, n)
        return self

    def decode(self, rows: slice, pos: torch.Tensor, k_len: int) -> SlotCache:
        self._mode = ("decode", rows, pos, k_len)
        return self

    def key_length(self, n_new: int) -> int:
        """Key columns the next forward attends over: the prompt (prefill) or `k_len` (decode).
        A model that builds its own attention masks (the generic path) sizes them by it."""
        mode = self._mode
        return mode[2] if mode[0] == "rows" else mode[3]  # prefill: its end; decode: k_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self._mode
        if mode[0] == "prefill":
            _, slot, start, end = mode
            self.k[layer][slot, :, start:end] = k[0]
            self.v[layer][slot, :, start:end] = v[0]
            if start == 0:
                return k, v
            return self.k[layer][slot : slot + 1, :, :end], self.v[layer][slot : slot + 1, :, :end]
        if mode[0] == "rows":
            _, slots, n = mode
            self.k[layer][slots, :, :n] = k
            self.v[layer][slots, :, :n] = v
            return k, v
        _, rows, pos, k_len = mode  # rows: slice(0, B) (the engine keeps active slots packed)
        kc, vc = self.k[layer][rows], self.v[layer][rows]
        b = torch.arange(k.shape[0], device=k.device)
        kc[b, :, pos] = k[:, :, 0]
        vc[b, :, pos] = v[:, :, 0]
        return kc[:, :, :k_len], vc[:, :, :k_len]

    def move(self, src: int, dst: int, n: int) -> None:
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]

    def swap(self, a: int, b: int, n_a: int, n_b: int) -> None:
        """Exchange the first n_a columns of row a with the first n_b of row b."""
        for t in (*self.k, *self.v):
            held = t[a, :, :n_a].clone()
            t[a, :, :n_b] = t[b, :, :n_b]
            t[b, :, :n_a] = held


def make_cache(
    kind: str, cfg, slots: int, context: int, param: torch.Tensor, block_size: int, kv_blocks: int | None
) -> SlotCache | PagedCache:
    """The engine's K/V cache (`kind` "slot" or "paged") on the device and in the dtype of
    `param`, refused before allocation when it cannot fit the device."""
    if kind == "paged":
        kv_blocks = kv_blocks or default_blocks(slots, context, block_size)
        tokens, what = kv_blocks * block_size, "--kv-blocks x the block size"
    else:
        tokens, what = slots * context, "--max-batch x the context"
    kv = kv_cache_bytes(cfg, tokens, param.element_size())
    check_fits(MemoryEstimate().add("KV cache", kv, what), param.device, "serve engine")
    if kind == "paged":
        return PagedCache(cfg, slots, context, param.device, param.dtype, block_size, kv_blocks)
    return SlotCache(cfg, slots, context, param.device, param.dtype)
