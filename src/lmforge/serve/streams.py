"""The server-sent-event bodies of `lmforge serve`'s streaming answers (`stream: true`).

Kept apart from the routes (`routes.py`) because they are the only part that runs after the
route has returned: each is an async generator that the response drains, and its `finally`
frees the engine slots whether the answer ran to the end or the client went away.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .engine import Engine
from .protocol import ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs, error_body, usage
from .request import Chunk
from .request import Request as GenRequest


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def merged(reqs: Sequence[GenRequest]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from several running requests, as they arrive."""
    q: asyncio.Queue[tuple[int, Chunk]] = asyncio.Queue()

    async def pump(i: int, r: GenRequest) -> None:
        async for c in r:
            await q.put((i, c))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            i, c = await q.get()
            if c.finish_reason is not None:
                left -= 1
            yield i, c
    finally:
        for t in tasks:
            t.cancel()


async def chat_stream(
    engine: Engine,
    reqs: list[GenRequest],
    cid: str,
    created: int,
    body: ChatRequest,
    citations: list | None,
) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
    try:
        for i in range(len(reqs)):
            first: dict[str, Any] = {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
            }
            if citations is not None and i == 0:
                first["citations"] = citations
            yield sse(first)
        n_out = 0
        async for i, c in merged(reqs):
            n_out += len(c.token_ids)
            if c.finish_reason == "error":
                yield sse(error_body(f"generation failed: {c.error}", "server_error"))
                break
            if c.text or c.logprobs:
                yield sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"content": c.text},
                                "finish_reason": None,
                                "logprobs": chat_logprobs(c.logprobs, engine.tok.decode),
                            }
                        ],
                    }
                )
            if c.finish_reason is not None:
                yield sse(
                    {
                        **base,
                        "choices": [
                            {"index": i, "delta": {}, "finish_reason": c.finish_reason, "logprobs": None}
                        ],
                    }
                )
        if body.include_usage:
            n_out = sum(len(r.out_ids) for r in reqs)
            yield sse({**base, "choices": [], "usage": usage(reqs[0].prompt_tokens, n_out)})
        yield b"data: [DONE]\n\n"
    finally:  # client gone (the response task is cancelled) or done: free the slots
        for r in reqs:
            r.cancel()


async def completion_stream(
    engine: Engine,
    reqs: list[GenRequest],
    cid: str,
    created: int,
    body: CompletionRequest,
    echo: list[str],
) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "text_completion", "created": created, "model": engine.name}
    try:
        for i, e in enumerate(echo):
            if e:
                yield sse(
                    {
                        **base,
                        "choices": [{"index": i, "text": e, "finish_reason": None, "logprobs": None}],
                    }
                )
        offsets = [len(e) for e in echo]  # text_offset of the next token, per choice
        async for i, c in merged(reqs):
            if c.finish_reason == "error":
                yield sse(error_body(f"generation failed: {c.error}", "server_error"))
                break
            if c.text or c.logprobs or c.finish_reason is not None:
                lps = completion_logprobs(c.logprobs, engine.tok.decode, offsets[i])
                if lps is not None:
                    offsets[i] += sum(len(t) for t in lps["tokens"])
                yield sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": i,
                                "text": c.text,
                                "finish_reason": c.finish_reason,
                                "logprobs": lps,
                            }
                        ],
                    }
                )
        if body.include_usage:
            yield sse(
                {
                    **base,
                    "choices": [],
                    "usage": usage(sum(r.prompt_tokens for r in reqs), sum(len(r.out_ids) for r in reqs)),
                }
            )
        yield b"data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()
