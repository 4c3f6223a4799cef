"""The engine's paged K/V cache: a pool of fixed-size blocks per layer, a block table per slot.

Why: the slot cache (kvcache.py) holds `max_batch` rows of the whole context whatever the
requests need, and a shared prefill copies the prompt's K/V into every sample's row. Here the
K/V of a slot live in blocks of `block_size` positions drawn from one pool
`[n_blocks, block_size, kv_heads, head_dim]` per layer; a slot's block table row lists its
blocks in position order (position p is column p % block_size of block table[slot, p //
block_size]), so memory follows what the requests reserve, not max_batch x context.

Design choices:
- **Reserved at admission, never grown.** A request gets the blocks for its prompt plus
  `max_tokens` (capped at the context) when it is admitted (`reserve`); a running request
  therefore never runs out of blocks mid-answer and nothing needs to be preempted. A request
  whose blocks are not free waits in the queue (the engine puts it back) until a finishing
  request returns its blocks (`release`). The cost: a request without `max_tokens` reserves up
  to the context.
- **Shared prefill by reference.** The n samples of one prompt (a GRPO group) point at the
  first sample's full prompt blocks (reference counted); only the last, partial prompt block is
  copied (copy-on-write done eagerly: every later write of a sample lands in its own blocks).
- **Compaction is a table edit.** `swap` exchanges two rows of the block table, no K/V moves.
- **Block 0 is scratch.** Unreserved table entries point at it, so writes that no query reads
  (the pad positions of a right-padded prefill, the padding rows of a bucketed decode step)
  land there instead of in another request's blocks.
- **Attention reads a gathered copy.** Each forward gathers the active rows' blocks into a
  `[B, kv_heads, k_len, head_dim]` tensor for SDPA: the very math of the slot cache, at the
  cost of one copy of the keys and values attended over per layer (the slot cache attends over
  views). The pool is token-major (`block_size` before `kv_heads`) so that copy is one
  `index_select` of whole blocks whose result is already that tensor (a transposed view); with
  head-major blocks it takes a second copy (measured ~2x slower on a CPU).

Duck-types `SlotCache` (`prefill`, `prefill_rows`, `decode`, `update`, `key_length`, `move`,
`swap`, `length`), so the model's own forward (LoRA-wrapped, imported HF families) and the fused
fast path (fastpath.py, through `update`) write into it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

SCRATCH = 0  # the block unreserved table entries point at


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def default_blocks(max_batch: int, context: int, block_size: int) -> int:
    """The pool that holds `max_batch` full contexts (the slot cache's capacity), rounded up to
    whole blocks, plus the scratch block."""
    return max_batch * blocks_for(context, block_size) + 1


class PagedCache:
    """Block pools, a block table per slot, reference counts and a free list."""

    paged = True

    def __init__(
        self, cfg, slots: int, context: int, device, dtype, block_size: int = 16, n_blocks: int | None = None
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        n_blocks = n_blocks or default_blocks(slots, context, block_size)
        if n_blocks < 2:
            raise ValueError(f"kv_blocks must be >= 2 (one is scratch), got {n_blocks}")
        shape = (n_blocks, block_size, cfg.kv_heads, cfg.head_dim)
        self.k_blocks = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v_blocks = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.device, self.context = torch.device(device), context
        self.block_size, self.n_blocks = block_size, n_blocks
        self.max_blocks = blocks_for(context, block_size)
        self.table = torch.full((slots, self.max_blocks), SCRATCH, dtype=torch.long, device=device)
        self.rows: list[list[int]] = [[] for _ in range(slots)]  # host copy of each slot's reserved entries
        self.refs = [0] * n_blocks
        self.peak = 0  # the most blocks in use at once
        self.free = list(range(n_blocks - 1, 0, -1))  # a stack: the lowest ids are used first
        self.length = 0  # the Transformer bumps this; positions are always passed explicitly
        self._mode: tuple[Any, ...] = ()
        self._write: tuple[torch.Tensor, torch.Tensor] = (self.table[:0, 0], self.table[:0, 0])
        self._read: tuple[torch.Tensor, int] | None = None

    # -- block accounting
    @property
    def usable_blocks(self) -> int:
        return self.n_blocks - 1

    def blocks_used(self) -> int:
        return self.usable_blocks - len(self.free)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_blocks, *self.v_blocks))

    def blocks_needed(self, tokens: int, shared: int = 0) -> int:
        return blocks_for(min(tokens, self.context), self.block_size) - shared // self.block_size

    def reserve(self, slot: int, tokens: int, shared: int = 0) -> bool:
        """Blocks for positions 0..tokens-1 of `slot` (capped at the context), of which the full
        blocks of the first `shared` positions will come from another slot (`move`); False, and
        nothing taken, when the pool has not enough free blocks."""
        assert not self.rows[slot], f"slot {slot} already holds blocks"
        skip = shared // self.block_size
        need = self.blocks_needed(tokens, shared)
        if need > len(self.free):
            return False
        got = [self.free.pop() for _ in range(need)]
        for b in got:
            self.refs[b] = 1
        self.rows[slot] = [SCRATCH] * skip + got
        self.peak = max(self.peak, self.blocks_used())
        self.table[slot, skip : skip + need] = torch.tensor(got, dtype=torch.long).to(self.device)
        return True

    def release(self, slot: int) -> None:
        """Give back the blocks of `slot` (a shared block when its last user lets go)."""
        for b in self.rows[slot]:
            if b != SCRATCH:
                self.refs[b] -= 1
                if self.refs[b] == 0:
                    self.free.append(b)
        self.rows[slot] = []
        self.table[slot].fill_(SCRATCH)

    def move(self, src: int, dst: int, n: int) -> None:
        """`dst` gets the first n positions of `src` (identical prompts): the full blocks by
        reference, the partial last block by copy. `dst` must hold blocks for n positions."""
        bs = self.block_size
        full, rest = divmod(n, bs)
        src_row, dst_row = self.rows[src], self.rows[dst]
        assert len(dst_row) >= full + (rest > 0), f"slot {dst} holds too few blocks for {n} positions"
        for j in range(full):
            old, b = dst_row[j], src_row[j]
            if old != SCRATCH:  # a block of its own: given back for the shared one
                self.refs[old] -= 1
                if self.refs[old] == 0:
                    self.free.append(old)
            dst_row[j] = b
            self.refs[b] += 1
        if full:
            self.table[dst, :full] = self.table[src, :full]
        if rest:
            a, b = src_row[full], dst_row[full]
            for t in (*self.k_blocks, *self.v_blocks):
                t[b, :rest] = t[a, :rest]

    def swap(self, a: int, b: int, n_a: int = 0, n_b: int = 0) -> None:
        """Exchange the contents of slots a and b: their block table rows (no K/V moves)."""
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.table[[a, b]] = self.table[[b, a]]

    # -- what the next forward writes and reads (set once per forward, used by every layer)
    def _index(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and in-block offsets of positions `pos` of slots `rows` (broadcast)."""
        return self.table[rows, pos // self.block_size], pos % self.block_size

    def _gather_from(self, rows, k_len: int) -> None:
        self._read = (self.table[rows, : blocks_for(k_len, self.block_size)], k_len)

    def prefill(self, slot: int, n: int, start: int = 0) -> PagedCache:
        """The next forward writes positions start..start+n-1 of `slot`."""
        self._mode = ("prefill", slot, start, start + n)
        pos = torch.arange(start, start + n, device=self.device)
        self._write = self._index(torch.tensor([slot], device=self.device)[:, None], pos[None])
        self._read = None
        if start:
            self._gather_from(slice(slot, slot + 1), start + n)
        return self

    def prefill_rows(self, slots: torch.Tensor, n: int) -> PagedCache:
        """The next forward writes positions 0..n-1 of each of `slots` (one batch row per slot)."""
        self._mode = ("rows", slots, n)
        self._write = self._index(slots[:, None], torch.arange(n, device=self.device)[None])
        self._read = None
        return self

    def decode(self, rows: slice, pos: torch.Tensor, k_len: int) -> PagedCache:
        """The next forward writes position pos[r] of slot r for r in `rows` (slots 0..B-1) and
        attends over keys 0..k_len-1."""
        self._mode = ("decode", rows, pos, k_len)
        r = torch.arange(rows.start or 0, rows.stop, device=self.device)
        self._write = self._index(r[:, None], pos.reshape(-1, 1))
        self._gather_from(rows, k_len)
        return self

    def key_length(self, n_new: int) -> int:
        mode = self._mode
        return mode[2] if mode[0] == "rows" else mode[3]

    def _gathered(self, pool: torch.Tensor) -> torch.Tensor:
        assert self._read is not None
        idx, k_len = self._read
        B, nb = idx.shape
        _, bs, kv, d = pool.shape
        # one copy: [B * nb, bs, kv, d] is [B, nb * bs, kv, d] as it stands, then a view [B, kv, .., d]
        rows = pool.index_select(0, idx.reshape(-1))
        return rows.view(B, nb * bs, kv, d).transpose(1, 2)[:, :, :k_len]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] where the mode says; the keys and values to
        attend over (the fresh ones for a prefill from position 0, else gathered)."""
        blk, off = self._write
        kp, vp = self.k_blocks[layer], self.v_blocks[layer]
        kp[blk, off] = k.transpose(1, 2)  # [B, T] indices: [B, T, kv, d]
        vp[blk, off] = v.transpose(1, 2)
        if self._read is None:
            return k, v
        return self._gathered(kp), self._gathered(vp)
