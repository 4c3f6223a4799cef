"""A decode step with fixed shapes, replayed as a CUDA graph: no Python or launch overhead per token.

Why: a 124M model on a modern GPU streams its weights in ~0.05 ms, but an eager decode step
launches a few hundred kernels from Python (~4 ms), so eager decoding runs at ~1% of what the
memory allows. A CUDA graph records the step's kernels once and replays them with one launch.
A graph needs fixed shapes and fixed addresses, so this module:

- works on the engine's preallocated slot cache (`kvcache.SlotCache`, fixed addresses) and on
  fixed input buffers (token ids and positions) that are overwritten before each replay;
- rounds the running batch B up to a **batch bucket** (powers of two up to `max_batch`) and the
  longest key length up to a **key bucket** (powers of two from 64 up to the context); one graph
  per (batch bucket, key bucket) pair, captured the first time it is needed. Padding rows are
  free slots (the engine keeps running slots packed at rows 0..B-1): they read token 0 at
  the last position and write their K/V into the last column of a row that is free or still
  being prefilled in chunks: no prompt reaches that column, and a decode step overwrites it
  before any query reads it;
- masks keys by position (key j is visible to a row iff j <= its position), so rows of
  different lengths share a step and keys past a row's length, stale or padding, never count;
- reads nothing back to the host inside the step (`FastDecoder.forward(static=True)`).

On CPU (or with `graphs=False`) the very same bucketed step runs eagerly, so everything but
the capture is tested without a GPU. The engine uses it on CUDA by default (`decode="auto"`);
on CPU its default stays the eager exact-length step, which is faster there (no padding).
"""

from __future__ import annotations

import torch

from .fastpath import FastDecoder

MIN_KEY_BUCKET = 64
DECODE_MODES = ("auto", "eager", "static", "graph")


def static_decoder(decode: str, fast: FastDecoder | None, cache, max_batch: int) -> StaticDecode | None:
    """The engine's decode step for `decode`: None = the eager exact-length step. `auto`: CUDA
    graphs on CUDA; on CPU the eager step, which is faster there (no padding)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r} is invalid: one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        decode = "graph" if cache.device.type == "cuda" and fast is not None else "eager"
    if decode == "eager":
        return None
    if fast is None:
        raise ValueError(
            f"decode={decode!r} needs the fused fast path (a plain lmforge/Llama-family model "
            "loaded with fast_path=True); use decode='eager' for this model"
        )
    return StaticDecode(fast, cache, max_batch, graphs=decode == "graph")


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit` itself."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class StaticDecode:
    """`step(last_tokens, positions)` -> logits [B, V] (float32) for slots 0..B-1 of `cache`."""

    def __init__(self, fast: FastDecoder, cache, max_batch: int, *, graphs: bool):
        self.fast, self.cache = fast, cache
        dev = cache.device
        if graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graphs = graphs
        self.batch_buckets = buckets(max_batch)
        self.key_buckets = buckets(cache.context, min(MIN_KEY_BUCKET, cache.context))
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.keys = torch.arange(cache.context, device=dev)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    def bucket(self, batch: int, k_len: int) -> tuple[int, int]:
        bb = next(b for b in self.batch_buckets if b >= batch)
        kb = next(k for k in self.key_buckets if k >= k_len)
        return bb, kb

    def _step(self, bb: int, kb: int) -> torch.Tensor:
        pos = self.pos[:bb]
        mask = (self.keys[:kb][None, :] <= pos[:, None])[:, None, None, :]
        logits = self.fast.forward(self.ids[:bb], pos[:, None], self.cache, k_len=kb, mask=mask, static=True)
        return logits.float()

    def _capture(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm up on a side stream (lazy initialisation, autotuning), then record; the warm-up
        # runs compute exactly the step about to be replayed, so their cache writes are harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._step(*key)
        self._captured[key] = (graph, out)
        return graph, out

    @torch.no_grad()
    def step(self, last: torch.Tensor, pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """`last` [B] token ids and `pos` [B] positions of slots 0..B-1 (on the cache's device);
        `k_len` = 1 + the largest position (known on the host: no read-back). The returned
        tensor is overwritten by the next step: use it before calling again."""
        b = last.shape[0]
        bb, kb = self.bucket(b, k_len)
        self.ids[:b, 0].copy_(last)
        self.pos[:b].copy_(pos)
        if bb > b:
            self.ids[b:bb].zero_()
            self.pos[b:bb].fill_(self.cache.context - 1)
        if not self.graphs:
            return self._step(bb, kb)[:b]
        graph, out = self._captured.get((bb, kb)) or self._capture((bb, kb))
        graph.replay()
        return out[:b]

    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._captured)
