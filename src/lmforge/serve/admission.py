"""How requests enter the engine's running batch: prompt prefill and the slot layout.

A mixin of `engine.Engine` (kept apart so each file stays readable): the prompts admitted in one
worker round are prefilled together (prefill.py: several right-padded prompts per forward);
identical prompts among them share one prefill (the others copy its K/V rows, or with the paged
cache point at its blocks); a request the paged cache has no blocks for goes back to the front
of the queue (`_requeue`) and is admitted when finishing requests have given blocks back;
a prompt longer than `prefill_chunk` is prefilled a chunk per worker step, with a decode step of
the running requests between chunks (`_prefill_next_chunk`), so one long prompt delays the
others by a chunk's forward, not a whole prompt's. `_compact` keeps the decoding slots at rows
0..B-1, then the prompts still being prefilled, then the free slots, so a decode step works on
views of the cache (a paged cache swaps block table rows instead of K/V).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from .fastpath import FastDecoder
from .kvcache import SlotCache
from .paged import PagedCache
from .prefill import prefill, prefill_chunk
from .request import Request, TokenLogprob

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


@dataclass
class _Slot:
    req: Request
    length: int  # tokens in the cache for this slot
    last: int  # the token to feed next
    prefilling: bool = False  # its prompt is still being prefilled in chunks (not decoded yet)


@dataclass
class _Partial:
    """A long prompt being prefilled in chunks into `slot`, and the slots of identical prompts
    that copy its K/V when it is done (shared prefill)."""

    slot: int
    req: Request
    copies: list[tuple[int, Request]]


class Admission:
    """Prefill and slot layout for `Engine` (its state, declared here for the type checker)."""

    slots: list[_Slot | None]
    partial: list[_Partial]
    cache: SlotCache | PagedCache
    waiting: deque[Request]
    _cv: threading.Condition
    fast: FastDecoder | None
    model: torch.nn.Module
    device: torch.device
    share_prefill: bool
    prefill_chunk: int | None
    seen: torch.Tensor
    counts: torch.Tensor
    counters: dict[str, int]

    def _finish(
        self,
        i: int,
        reason: str,
        error: str | None = None,
        ids: list[int] | None = None,
        lps: list[TokenLogprob] | None = None,
    ) -> None:
        raise NotImplementedError

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> None:
        raise NotImplementedError

    def _prefill_all(self, admit: list[tuple[int, Request]]) -> None:
        """Prompt forwards for the requests just given slots, batched (prefill.py), then each
        one's first token. An identical prompt in the same round (the n samples of one GRPO
        prompt, `n` > 1 on the server) copies the first one's K/V instead (`share_prefill`)."""
        firsts: list[tuple[int, Request]] = []
        copies: list[tuple[int, Request, int]] = []
        src_of: dict[tuple[int, ...], int] = {}
        long_of: dict[tuple[int, ...], _Partial] = {}
        chunk = self.prefill_chunk
        back: list[Request] = []  # no K/V blocks for these (paged cache): back to the queue, in order
        for i, req in admit:
            key = tuple(req.prompt_ids)
            long = chunk is not None and len(key) > chunk
            shared = self.share_prefill and key in (long_of if long else src_of)
            if req.cancelled.is_set():
                self._finish(i, FINISH_CANCELLED)
            elif back or not self.cache.reserve(i, len(key) + req.max_new, len(key) if shared else 0):
                self.slots[i] = None
                back.append(req)
            elif long:  # prefilled in chunks between decode steps
                self.slots[i] = _Slot(req, 0, -1, prefilling=True)
                if shared:
                    long_of[key].copies.append((i, req))
                else:
                    long_of[key] = _Partial(i, req, [])
                    self.partial.append(long_of[key])
            elif shared:
                copies.append((i, req, src_of[key]))
            else:
                src_of[key] = i
                firsts.append((i, req))
        if back:
            self._requeue(back)
        try:
            jobs = [(i, req.prompt_ids) for i, req in firsts]
            logits = dict(
                zip([i for i, _ in firsts], prefill(self.fast, self.model, self.cache, jobs, self.device))
            )
            for i, req, src in copies:
                self.cache.move(src, i, len(req.prompt_ids))
                self.counters["prefill_shared"] += 1
        except Exception as e:  # the forward failed: these requests end, the running ones go on
            self.counters["errors"] += 1
            for i, _ in firsts + [(i, r) for i, r, _ in copies]:
                self._finish(i, FINISH_ERROR, error=f"{type(e).__name__}: {e}")
            return
        self._first_tokens([(i, req, logits[src]) for i, req, src in [(i, r, i) for i, r in firsts] + copies])

    def _prefill_next_chunk(self) -> None:
        """One chunk of the oldest long prompt; when it is the last, its first token (and the
        copies' K/V and first tokens)."""
        part = self.partial[0]
        s = self._slot(part.slot)
        ids = part.req.prompt_ids
        end = min(len(ids), s.length + (self.prefill_chunk or len(ids)))
        try:
            logits = prefill_chunk(
                self.fast, self.model, self.cache, part.slot, ids[s.length : end], s.length, self.device
            )
        except Exception as e:  # the forward failed: this prompt (and its copies) end
            self.counters["errors"] += 1
            self.partial.pop(0)
            for i, _ in [(part.slot, part.req), *part.copies]:
                self._finish(i, FINISH_ERROR, error=f"{type(e).__name__}: {e}")
            return
        s.length = end
        if end < len(ids):
            return
        self.partial.pop(0)
        for i, req in part.copies:
            self.cache.move(part.slot, i, end)
            self.counters["prefill_shared"] += 1
        ready = []
        for i, req in [(part.slot, part.req), *part.copies]:
            if req.cancelled.is_set():
                self._finish(i, FINISH_CANCELLED)
            else:
                ready.append((i, req, logits))
        self._first_tokens(ready)

    def _requeue(self, reqs: list[Request]) -> None:
        """Requests admitted to a slot whose K/V blocks were not free: first in the queue again,
        admitted when finishing requests have given blocks back."""
        with self._cv:
            self.waiting.extendleft(reversed(reqs))
            self.counters["kv_waits"] += len(reqs)

    def _first_tokens(self, ready: list[tuple[int, Request, torch.Tensor]]) -> None:
        """The first token of each prefilled request (slot, request, last-position logits [V]),
        sampled in one step; if that step raises, one request at a time, so a request whose
        sampling fails ends alone."""
        for i, req, _ in ready:
            n = len(req.prompt_ids)
            if req.penalized:
                self.seen[i].zero_()
                self.seen[i, torch.tensor(req.prompt_ids[req.hidden :], device=self.device)] = True
                self.counts[i].zero_()
            self.slots[i] = _Slot(req, n, -1)
            self.counters["prompt_tokens"] += n
        if not ready:
            return
        try:
            self._pick(torch.stack([x for *_, x in ready]), [i for i, *_ in ready])
            return
        except Exception:  # noqa: BLE001  (retried row by row below: nothing was accepted yet)
            pass
        for i, _, x in ready:
            try:
                self._pick(x[None], [i])
            except Exception as e:  # its sampling failed: only this request ends
                self.counters["errors"] += 1
                if self.slots[i] is not None:
                    self._finish(i, FINISH_ERROR, error=f"{type(e).__name__}: {e}")

    def _slot(self, i: int) -> _Slot:
        s = self.slots[i]
        assert s is not None, f"slot {i} is free"  # callers pass running slots only
        return s

    def _compact(self) -> None:
        """Move slots so the decoding rows are 0..B-1, then the prompts being prefilled, then
        the free ones: every decode step works on views (no gathers)."""
        order = lambda s: 2 if s is None else int(s.prefilling)  # noqa: E731
        while True:
            ranks = [order(s) for s in self.slots]
            lo = next((i for i in range(len(ranks)) if ranks[i] > min(ranks[i:])), None)
            if lo is None:
                return
            hi = max(j for j in range(lo, len(ranks)) if ranks[j] == min(ranks[lo:]))
            a, b = self.slots[lo], self._slot(hi)
            self.cache.swap(lo, hi, 0 if a is None else a.length, b.length)  # a free: a move
            self.seen[[lo, hi]] = self.seen[[hi, lo]]
            self.counts[[lo, hi]] = self.counts[[hi, lo]]
            self.slots[lo], self.slots[hi] = b, a
            for part in self.partial:  # the prompts being prefilled follow their slots
                part.slot = {lo: hi, hi: lo}.get(part.slot, part.slot)
                part.copies = [({lo: hi, hi: lo}.get(i, i), r) for i, r in part.copies]
