"""What a caller hands the engine and gets back: `GenParams` (validated sampling settings),
`Request` (iterate it, or `async for` it, to receive `Chunk`s; `cancel()` it), `Completion`."""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .json_mode import JsonPrefix


# ----------------------------------------------------------------------------- parameters
@dataclass
class GenParams:
    """Per-request generation settings (OpenAI names where there is one)."""

    max_tokens: int | None = None  # None: until a stop or the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    # {token id: added to its logit}, OpenAI's range [-100, 100]; applied before penalties and sampling
    logit_bias: dict[int, float] | None = None
    # None: off; n >= 0: the chosen token's log-probability and the n most likely alternatives,
    # under the model's distribution after logit_bias and penalties, before temperature/top-k/top-p
    logprobs: int | None = None
    json_object: bool = False  # JSON mode: the answer is one JSON object (constrained decoding)

    def validate(self) -> GenParams:
        """Raise ValueError naming the field and the allowed range."""

        def bad(name, value, rule):
            raise ValueError(f"{name}={value!r} is invalid: {rule}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not _finite(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", self.temperature, "must be a number in [0, 100] (0 = greedy)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad("top_k", self.top_k, "must be an integer >= 1 (0 or null = off)")
        if not _finite(self.repetition_penalty) or not MIN_PENALTY <= self.repetition_penalty <= 10:
            bad(
                "repetition_penalty",
                self.repetition_penalty,
                f"must be in [{MIN_PENALTY:g}, 10] (1 = off; a smaller divisor overflows float32 logits)",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -2 <= v <= 2:
                bad(name, v, "must be in [-2, 2] (0 = off)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "must be at most 8 non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "must be an integer")
        if self.logit_bias is not None:
            self._check_bias(bad)
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= 20
        ):
            bad("logprobs", self.logprobs, "must be an integer in [0, 20] (alternatives per token) or None")
        return self

    def _check_bias(self, bad) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict) or len(bias) > MAX_BIAS:
            bad("logit_bias", bias, f"must map at most {MAX_BIAS} token ids to numbers")
            return
        clean = {}
        for k, v in bias.items():
            try:
                tid = int(k)  # JSON object keys are strings
            except (TypeError, ValueError):
                tid = -1
            if tid < 0 or isinstance(k, bool) or str(tid) != str(k).strip():
                bad("logit_bias", k, "keys must be token ids (integers >= 0)")
            if not _finite(v) or not -100 <= v <= 100:
                bad(f"logit_bias[{k}]", v, "must be a number in [-100, 100]")
            clean[tid] = float(v)
        self.logit_bias = clean or None


MIN_PENALTY = 1e-4  # repetition_penalty divides logits: 5e-324 is 0 in float32 (inf logits, NaN softmax)
MAX_BIAS = 300  # logit_bias entries, as OpenAI


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Chunk:
    """One streamed piece of a request's output. `finish_reason` is set on the last one.
    `logprobs` (when the request asked for them) has one entry per id in `token_ids`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None  # time to first token, from submit
    total_s: float = 0.0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_token_id: int | None = None  # the stop token that ended it (not part of token_ids)


# ----------------------------------------------------------------------------- requests
class Request:
    """A submitted prompt; iterate it (or `async for`) to receive `Chunk`s; `cancel()` to stop."""

    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(
        self,
        prompt_ids: list[int],
        params: GenParams,
        stop_ids: set[int],
        max_new: int,
        loop: asyncio.AbstractEventLoop | None,
        device: torch.device | str = "cpu",
    ):
        with Request._ids_lock:
            Request._ids += 1
            self.id = Request._ids
        self.prompt_ids = prompt_ids  # what the cache holds: the placeholders of `hidden` first
        self.hidden = 0  # leading prompt ids that are not the user's (a prompt-tuned model's virtual tokens)
        self.params = params
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.loop = loop
        self._q: queue.Queue | None = None if loop else queue.Queue()
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop else None
        self.cancelled = threading.Event()
        self.done = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        # decoding state, owned by the worker
        self.out_ids: list[int] = []
        self.sent = 0  # characters of decoded text already emitted
        self.text = ""
        self.stream_text = True  # False: text decoded once at the end (Engine.submit)
        self._window: tuple[int, int, str] = (0, 0, "")  # update_text's decoding state
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token that ended it, when one did
        self.penalized = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        # on the model's device, so a seeded row's noise is drawn there (no host work per token)
        seed = params.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.out_logprobs: list[TokenLogprob] = []
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values) on the device
        self.json = JsonPrefix() if params.json_object else None

    def cancel(self) -> None:
        self.cancelled.set()

    # -- output text (called from the worker thread)
    def update_text(self, decode: Callable[[list[int]], str]) -> bool:
        """Decode the output after a new token; True when a stop string ends it (cut before it).

        Incremental, so a token costs O(1) and not O(length): the text of the tokens before
        `read` is final, and only the window from `prefix` (the token run before `read`, context
        for decoders that treat a first token differently) is decoded again. The window moves
        on when the new text does not end in a replacement character (an incomplete UTF-8
        sequence, completed by a later token). For byte-level BPE this equals decoding all
        tokens (tested against the full decode)."""
        prefix, read, done = self._window
        head = decode(self.out_ids[prefix:read]) if read > prefix else ""
        new = decode(self.out_ids[prefix:])[len(head) :]
        text = done + new
        if new and not new.endswith("\ufffd"):
            self._window = (read, len(self.out_ids), text)
        stops = self.params.stop
        at = _find_stop(text, stops, max(0, self.sent - _longest(stops)))
        self.text = text if at is None else text[:at]
        return at is not None

    def ready_text(self) -> str:
        """The new text that can be streamed now: held back are a suffix that may begin a stop
        string and a possibly incomplete UTF-8 sequence (replacement characters at the end)."""
        text = self.text
        safe = len(text) - _held_back(text, self.params.stop)
        tail = len(text) - len(text.rstrip("\ufffd"))
        if tail:
            safe = min(safe, len(text) - tail)
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent : safe], safe
        return out

    # -- delivery (called from the worker thread)
    def _push(self, chunk: Chunk) -> None:
        if chunk.finish_reason is not None:
            self.done = True
            self.finished_at = time.perf_counter()
        if self.loop is None:
            assert self._q is not None  # a request without a loop is consumed synchronously
            self._q.put(chunk)
            return
        assert self._aq is not None
        try:
            self.loop.call_soon_threadsafe(self._aq.put_nowait, chunk)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancel()

    # -- consumption
    def __iter__(self) -> Iterator[Chunk]:
        if self._q is None:
            raise RuntimeError("this request was submitted with an event loop: use `async for`")
        while True:
            chunk = self._q.get()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[Chunk]:
        if self._aq is None:
            raise RuntimeError("submit(..., loop=asyncio.get_running_loop()) to consume asynchronously")
        while True:
            chunk = await self._aq.get()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Block until finished (synchronous requests) and return the whole completion."""
        texts: list[str] = []
        ids: list[int] = []
        last: Chunk | None = None
        for chunk in self:
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None  # the iteration ends with the finishing chunk
        return self._completion("".join(texts), ids, last)

    async def aresult(self) -> Completion:
        texts: list[str] = []
        ids: list[int] = []
        last: Chunk | None = None
        async for chunk in self:
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None  # the iteration ends with the finishing chunk
        return self._completion("".join(texts), ids, last)

    @property
    def prompt_tokens(self) -> int:
        """The user's prompt tokens (what usage reports), without hidden placeholders."""
        return len(self.prompt_ids) - self.hidden

    def _completion(self, text: str, ids: list[int], last: Chunk) -> Completion:
        assert last.finish_reason is not None  # the last chunk of a request
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        ids = list(self.out_ids) if self.done else ids
        return Completion(
            text=text,
            token_ids=ids,
            finish_reason=last.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(ids),
            ttft_s=ttft,
            total_s=(self.finished_at or time.perf_counter()) - self.submitted,
            error=last.error,
            logprobs=list(self.out_logprobs) if self.params.logprobs is not None else None,
            stop_token_id=self.stop_token,
        )


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [j for j in (text.find(s, start) for s in stops) if j >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
