"""The generation service: continuous batching over a slot or paged KV cache, one worker thread.

Why not just call `model.generate.generate` per request? A server sees requests arrive one by
one, with different prompt lengths, sampling settings and budgets. This engine keeps up to
`max_batch` requests *in flight* in fixed slots and runs one decode step for all of them at a
time; a request that finishes frees its slot at once and a waiting one takes it on the next
step (continuous batching), so short answers never wait for long ones.

Design choices:
- **Slot cache, no padding.** Each slot owns a row of a pre-allocated K/V buffer
  `[max_batch, n_kv_heads, context, head_dim]` and writes its tokens from column 0, so a token's
  column is its RoPE position. A decode step feeds each active row its last token at its own
  position and masks the keys past each row's length; rows of equal length need no mask at all.
  The model's attention only calls `cache.update(layer, k, v)`, so the `Transformer` of
  model/transformer.py runs unchanged (lmforge models, imported HF Llama/Mistral/Qwen2 models
  and models with LoRA layers patched in alike).
- **Or a paged cache** (`kv_cache="paged"`, paged.py): K/V in blocks of `block_size` positions
  from a pool of `kv_blocks`, each request reserving at admission the blocks its prompt +
  `max_tokens` need (a request whose blocks are not free waits in the queue); the samples of a
  shared prefill point at the prompt's blocks instead of copying them. Same tokens as the slot
  cache (tested); on a CPU it decodes ~0.8-0.95x as fast (it gathers the blocks it attends over:
  benchmarks/RESULTS.md), so `slot` stays the default. Use it when the requests' lengths are
  far below `max_batch` x the context (set `kv_blocks` to what they need and raise `max_batch`)
  or for RL groups (n samples hold the prompt once). CUDA graphs (`decode="graph"`) are
  slot-only: `graph` with `paged` is refused and `auto` runs the eager step.
- **Prefill per request** (one forward over the prompt into its slot), then the first token is
  sampled and streamed at once: time-to-first-token is one prompt forward. Identical prompts
  admitted together (the n samples of a GRPO group, `n` on the server) share one prefill: the
  others copy its K/V rows, or share its blocks (`share_prefill`). A prompt longer than `prefill_chunk` tokens is
  prefilled a chunk per step, with a decode step of the running requests between chunks, so a
  long prompt does not stall the others (prefill.py).
- **Decode step** (`decode=`): `eager` runs the exact-length step (the CPU default: no padding);
  `graph` (the CUDA default) replays a fixed-shape, bucketed step as a CUDA graph and `static`
  runs that same step eagerly (static_decode.py; how CPU tests check the graph's math).
- **Sampling per row, on the device** (sampling.py): logit_bias, repetition penalty (HF/CTRL
  style over prompt + generated tokens), OpenAI presence/frequency penalties (over generated
  tokens only), temperature (0 = greedy), top-k, top-p, per-request seeds (a `torch.Generator`
  per request, so a seeded request gives the same tokens whatever else is in the batch, up to
  float rounding); one read-back per step; optional log-probabilities with top alternatives.
  A row whose distribution is not finite ends its own request with an error, not the batch.
- **Stops**: stop token ids (the tokenizer's eos and chat end-of-turn by default), stop strings
  (matched on the decoded text; text that might be the start of a stop string is held back, so
  a streamed answer never shows half a stop string), `max_tokens`, and the context limit.
- **Bounded**: at most `max_batch` running and `max_queue` waiting requests; `submit` raises
  `EngineFull` beyond that (the server turns it into a 503). A cancelled request (client gone)
  frees its slot at the next step. An exception while decoding fails the requests in flight,
  not the engine.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import LMForgeError
from .admission import (  # noqa: F401  (FINISH_* re-exported)
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Admission,
    _Partial,
    _Slot,
)
from .fastpath import FastDecoder, self_check
from .kvcache import KV_CACHES, SlotCache, make_cache
from .paged import PagedCache
from .request import Chunk, Completion, GenParams, Request, TokenLogprob  # noqa: F401  (re-exported)
from .sampling import pick_tokens
from .static_decode import static_decoder


class EngineFull(LMForgeError):
    """The wait queue is full; retry later (HTTP 503)."""


class EngineClosed(LMForgeError):
    """The engine was shut down."""


class Engine(Admission):
    """Batched generation around a `Transformer` and an `LMTokenizer`.

    >>> eng = Engine.from_pretrained("runs/tiny/pretrain/model")
    >>> with eng:
    ...     print(eng.complete("The function", GenParams(max_tokens=20, temperature=0)).text)
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        chat_format=None,
        name: str = "lmforge",
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        fast_path: bool = False,
        decode: str = "auto",
        share_prefill: bool = True,
        prefill_chunk: int | None = 512,
        kv_cache: str = "slot",
        block_size: int = 16,
        kv_blocks: int | None = None,
    ):
        """`tokenizer` may be None for callers that pass token ids and stop ids only (RL
        rollouts): completions then carry no text. `prefill_chunk`: prompts longer than this
        are prefilled in chunks between decode steps (None: always in one forward).
        `kv_cache`: "slot" (a row of the whole context per slot) or "paged" (blocks of
        `block_size` positions from a pool of `kv_blocks`, reserved per request: paged.py;
        None = the slot cache's capacity, rounded up to whole blocks, plus one scratch block)."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache={kv_cache!r} is invalid: one of {', '.join(KV_CACHES)}")
        if kv_cache == "paged" and decode == "graph":
            raise ValueError(
                "decode='graph' (CUDA graphs) needs kv_cache='slot'; with the paged cache use "
                "decode='eager' or 'static'"
            )
        self.model = model.eval()
        self.tok = tokenizer
        self.chat_format = chat_format
        self.name = name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.vocab = model.cfg.vocab_size
        if stop_token_ids is None:
            if tokenizer is None:
                raise ValueError("an engine without a tokenizer needs stop_token_ids")
            stop_token_ids = sorted(
                {i for i in (tokenizer.eos_id, tokenizer.end_id) if i is not None}
                | set(getattr(chat_format, "stop_ids", []) or [])
            )
        self.default_stop_ids = set(stop_token_ids)
        self.cache = make_cache(kv_cache, model.cfg, max_batch, self.context, p, block_size, kv_blocks)
        self.fast = None
        if fast_path:  # fused weights and a lean forward (fastpath.py); it changes `model` in place
            fast = FastDecoder.build(model)
            if fast is not None and self_check(
                model, fast, lambda: SlotCache(model.cfg, 1, 16, self.device, self.dtype)
            ):
                self.fast = fast
        if kv_cache == "paged" and decode == "auto":
            decode = "eager"  # CUDA graphs are slot-cache only (static_decode.py)
        self.static = static_decoder(decode, self.fast, self.cache, max_batch)
        self.share_prefill = share_prefill
        self.prefill_chunk = prefill_chunk
        self.partial: list[_Partial] = []  # long prompts being prefilled, oldest first
        decode_text = tokenizer.decode if tokenizer is not None else lambda ids, skip_special: ""
        self._text_of = functools.partial(decode_text, skip_special=True)
        self._piece = functools.cache(lambda t: decode_text([t], skip_special=True))  # JSON mode
        self.slots: list[_Slot | None] = [None] * max_batch
        self.seen = torch.zeros(max_batch, self.vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(max_batch, self.vocab, dtype=torch.float32, device=self.device)
        self.waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        # prefill_shared: prompts whose K/V were copied from an identical prompt's;
        # kv_waits: admissions put back in the queue because the paged cache had no free blocks
        self.counters = dict.fromkeys(
            ("submitted", "completed", "cancelled", "rejected", "errors", "generated_tokens")
            + ("prompt_tokens", "prefill_shared", "kv_waits"),
            0,
        )

    # -- construction
    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        adapter: str | Path | None = None,
        merge: bool = False,
        device: str = "cpu",
        dtype: str | None = None,
        name: str | None = None,
        **kw,
    ) -> Engine:
        from .loading import load_for_inference

        model, tok, fmt, label = load_for_inference(
            folder, adapter=adapter, merge=merge, device=device, dtype=dtype
        )
        kw.setdefault("fast_path", True)  # the engine owns this model object, so it may fuse weights
        return cls(model, tok, chat_format=fmt, name=name or label, **kw)

    # -- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._threads = torch.get_num_threads()  # the worker uses the caller's torch thread count
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API
    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids for the next assistant turn of `messages` (the model's chat template)."""
        if self.chat_format is None:
            raise LMForgeError(f"model {self.name!r} has no chat template; use plain completions")
        return self.chat_format.prompt_ids(messages)

    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            raise LMForgeError(f"engine {self.name!r} has no tokenizer: pass token ids")
        bos = self.tok.bos_id is not None
        return self.tok.encode(text, add_bos=bos)

    def check_prompt(self, prompt_ids: Sequence[int], params: GenParams) -> int:
        """The number of new tokens this request may produce; ValueError if it cannot run."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.context:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context is {self.context} tokens "
                f"(at least one must be left to generate); shorten the prompt"
            )
        room = self.context - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.context} tokens; lower max_tokens to at most {room}"
            )
        bad = [i for i in prompt_ids if not 0 <= int(i) < self.vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {self.vocab}")
        bad = [i for i in (params.logit_bias or {}) if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(
                f"logit_bias: token id {bad[0]} is out of range for a vocabulary of {self.vocab}"
            )
        max_new = params.max_tokens or room
        if isinstance(self.cache, PagedCache):
            need, have = self.cache.blocks_needed(n + max_new), self.cache.usable_blocks
            if need > have:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({max_new}) needs {need} K/V blocks of "
                    f"{self.cache.block_size} positions but the pool has {have}; lower max_tokens "
                    f"or raise kv_blocks"
                )
        return max_new

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: GenParams | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        stream_text: bool = True,
    ) -> Request:
        """Queue a prompt. `stream_text=False`: the chunks before the last carry token ids only
        and the text comes whole in the last one (no decoding per token: batch clients)."""
        params = (params or GenParams()).validate()
        hidden = int(getattr(self.model, "n_virtual", 0)) if len(prompt_ids) else 0
        if hidden:  # a prompt-tuned model: placeholders at the virtual tokens' positions come first
            prompt_ids = self.model.virtual_prefix(prompt_ids)  # type: ignore[operator]
        max_new = self.check_prompt(prompt_ids, params)
        if self.tok is None and (params.stop or params.json_object):
            raise ValueError("stop strings and JSON mode need an engine with a tokenizer")
        stops = set() if params.ignore_eos else set(self.default_stop_ids)
        stops |= {int(i) for i in params.stop_token_ids}
        req = Request([int(i) for i in prompt_ids], params, stops, max_new, loop, device=self.device)
        req.stream_text = stream_text
        req.hidden = hidden
        with self._cv:
            if self._stop:
                raise EngineClosed("the engine is shut down")
            if self._thread is None:
                self.start()
            free = sum(s is None for s in self.slots)
            if len(self.waiting) >= self.max_queue + free:
                self.counters["rejected"] += 1
                raise EngineFull(
                    f"server busy: {self.max_batch} requests running and {len(self.waiting)} "
                    f"waiting (max_queue={self.max_queue}); retry later"
                )
            self.waiting.append(req)
            self.counters["submitted"] += 1
            self._cv.notify_all()
        return req

    def complete(self, prompt: str | Sequence[int], params: GenParams | None = None) -> Completion:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.submit(ids, params).result()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: GenParams | Sequence[GenParams] | None = None,
    ) -> list[Completion]:
        """Run many prompts through the batch at once (blocking); `params` is one for all or one
        per prompt. The requests are queued together, so identical prompts that fit in the
        free slots (the n samples of an RL group) share one prefill."""
        each = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(each)} GenParams")
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        with self.batch():
            reqs = [self.submit(x, p, stream_text=False) for x, p in zip(ids, each)]
        return [r.result() for r in reqs]

    def batch(self) -> threading.Condition:
        """`with engine.batch(): submit(...) ...`: the worker admits none of the requests before
        all are queued, so identical prompts among them share one prefill (re-entrant)."""
        return self._cv

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": sum(s is not None for s in self.slots),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                **self.counters,
                **self._kv_stats(),
            }

    def _kv_stats(self) -> dict:
        if not isinstance(self.cache, PagedCache):
            return {}
        c = self.cache
        return {"kv_blocks": c.usable_blocks, "kv_blocks_used": c.blocks_used(), "kv_blocks_peak": c.peak}

    # -- the worker
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self._threads)
        while True:
            with self._cv:
                while not self._stop and not self.waiting and all(s is None for s in self.slots):
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
                admit = []
                for i, s in enumerate(self.slots):
                    if s is None and self.waiting:  # reserve the slot now, so capacity is exact
                        req = self.waiting.popleft()
                        self.slots[i] = _Slot(req, 0, -1)
                        admit.append((i, req))
            if admit:
                self._prefill_all(admit)
            if self.partial:
                self._prefill_next_chunk()
            try:
                if any(s is not None and not s.prefilling for s in self.slots):
                    self._decode_step()
            except Exception as e:  # a bug or out-of-memory: fail what is in flight, keep serving
                self.counters["errors"] += 1
                msg = f"{type(e).__name__}: {e}"
                self.partial.clear()
                for i, s in enumerate(self.slots):
                    if s is not None:
                        self._finish(i, FINISH_ERROR, error=msg)
        # shutting down: tell everybody
        with self._cv:
            pending = list(self.waiting)
            self.waiting.clear()
        for i, s in enumerate(self.slots):
            if s is not None:
                self._finish(i, FINISH_CANCELLED, error="engine shut down")
        for req in pending:
            req._push(Chunk("", [], FINISH_CANCELLED, error="engine shut down"))

    def _decode_step(self) -> None:
        active = [i for i, s in enumerate(self.slots) if s is not None and not s.prefilling]
        for i in active:  # drop cancelled requests before spending compute on them
            if self._slot(i).req.cancelled.is_set():
                self._finish(i, FINISH_CANCELLED)
        self._compact()
        active = [i for i, s in enumerate(self.slots) if s is not None and not s.prefilling]
        if not active:
            return
        lengths = [self._slot(i).length for i in active]
        B = len(active)
        rows = slice(0, B)
        pos = torch.tensor(lengths, device=self.device)
        k_len = max(lengths) + 1
        inp = torch.tensor([[self._slot(i).last] for i in active], device=self.device)
        mask = None
        if self.static is None and min(lengths) != max(lengths):
            mask = (torch.arange(k_len, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        if self.static is not None:
            logits = self.static.step(inp[:, 0], pos, k_len)
        elif self.fast is not None:
            logits = self.fast.forward(inp, pos[:, None], self.cache, k_len=k_len, mask=mask).float()
        else:
            logits = self.model(
                inp, position_ids=pos[:, None], attn_mask=mask, cache=self.cache.decode(rows, pos, k_len)
            )[:, -1].float()
        for i in active:
            self._slot(i).length += 1
        self._pick(logits, active)

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Sample one token per row of `logits` [B, V] (rows = their slots) and accept it. A row
        whose logits or distribution are not finite ends its own request with an error."""
        reqs = [self._slot(i).req for i in rows]
        pen = any(r.penalized for r in reqs)
        idx = torch.tensor(rows, device=self.device) if pen else None
        seen, counts = (self.seen[idx], self.counts[idx]) if pen else (None, None)
        toks, errs, lps = pick_tokens(logits[:, : self.vocab], reqs, seen, counts, self._piece)
        for n, i in enumerate(rows):
            if errs[n]:
                self.counters["errors"] += 1
                self._finish(i, FINISH_ERROR, error=f"sampling failed: {errs[n]}")
                continue
            try:
                self._accept(i, toks[n], lps[n])
            except Exception as e:  # e.g. the tokenizer cannot decode: only this request ends
                self.counters["errors"] += 1
                if self.slots[i] is not None:
                    self._finish(i, FINISH_ERROR, error=f"{type(e).__name__}: {e}")

    def _accept(self, i: int, tok: int, lp: TokenLogprob | None = None) -> None:
        s = self._slot(i)
        req = s.req
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if tok in req.stop_ids:
            req.stop_token = tok
            self._finish(i, FINISH_STOP)
            return
        s.last = tok
        req.out_ids.append(tok)
        lps = None
        if lp is not None:
            req.out_logprobs.append(lp)
            lps = [lp]
        if req.penalized:
            self.seen[i, tok] = True
            self.counts[i, tok] += 1
        self.counters["generated_tokens"] += 1
        text_now = req.stream_text or bool(req.params.stop)  # stop strings are matched as text comes
        if (text_now and req.update_text(self._text_of)) or (req.json and req.json.done):
            self._finish(i, FINISH_STOP, ids=[tok], lps=lps)  # a stop string, or the JSON closed
        elif len(req.out_ids) >= req.max_new or s.length + 1 >= self.context:
            self._finish(i, FINISH_LENGTH, ids=[tok], lps=lps)
        else:
            req._push(Chunk(req.ready_text() if text_now else "", [tok], logprobs=lps))

    def _finish(
        self,
        i: int,
        reason: str,
        error: str | None = None,
        ids: list[int] | None = None,
        lps: list[TokenLogprob] | None = None,
    ) -> None:
        s = self._slot(i)
        self.slots[i] = None
        self.cache.release(i)
        req = s.req
        if reason == FINISH_CANCELLED:
            self.counters["cancelled"] += 1
        elif reason != FINISH_ERROR:
            self.counters["completed"] += 1
        if reason in (FINISH_STOP, FINISH_LENGTH) and not (req.stream_text or req.params.stop):
            req.text = self._text_of(req.out_ids)  # decoded once, at the end
        rest = req.text[req.sent :] if reason in (FINISH_STOP, FINISH_LENGTH) else ""
        req.sent = len(req.text)
        req._push(Chunk(rest, ids or [], reason, error=error, logprobs=lps))
        with self._cv:
            self._cv.notify_all()
