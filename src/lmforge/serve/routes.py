"""The routes of `lmforge serve` (`server.py` builds the app around them).

Module-level functions on an `APIRouter` rather than closures inside `create_app`, so each can be
read and tested alone; what a route needs from the server it gets from the app's state
(`request.app.state`: the engine, the API key, the retriever), set once by `create_app`.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine, EngineClosed, EngineFull
from .http import ApiError
from .protocol import ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs, new_id, now, usage
from .rag.query import augment_messages, retrieve_and_fit
from .request import Completion, GenParams
from .request import Request as GenRequest
from .streams import chat_stream, completion_stream

router = APIRouter()


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def auth(request: Request) -> None:
    api_key: str | None = request.app.state.api_key
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
        )


def check_model(engine: Engine, name: str) -> None:
    if name != engine.name:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {engine.name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


async def submit_all(
    engine: Engine,
    prompts: list[list[int]],
    params: GenParams,
    n: int,
    loop: asyncio.AbstractEventLoop,
) -> list[GenRequest]:
    reqs: list[GenRequest] = []
    try:
        with engine.batch():  # the n samples of a prompt are admitted together: one prefill
            for ids in prompts:
                for j in range(n):
                    p = params
                    if n > 1 and params.seed is not None:
                        p = replace(params, seed=params.seed + j)
                    reqs.append(engine.submit(ids, p, loop=loop))
    except EngineFull as e:
        for r in reqs:
            r.cancel()
        raise ApiError(503, str(e), "server_busy", code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineClosed as e:
        raise ApiError(503, str(e), "server_busy", code="shutting_down") from None
    except ValueError as e:
        for r in reqs:
            r.cancel()
        # OpenAI's code for a prompt that does not fit: the web page drops old turns on it
        long = any(len(ids) + (params.max_tokens or 1) > engine.context for ids in prompts)
        raise ApiError(
            400,
            str(e),
            param="messages" if "prompt" in str(e) else None,
            code="context_length_exceeded" if long else "invalid_value",
        ) from None
    return reqs


async def collect(request: Request, reqs: list[GenRequest]) -> list[Completion]:
    """Whole answers, cancelling them if the client goes away first."""

    async def wait_disconnect() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    gather = asyncio.ensure_future(asyncio.gather(*(r.aresult() for r in reqs)))
    watch = asyncio.ensure_future(wait_disconnect())
    either: set[asyncio.Future[Any]] = {gather, watch}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not gather.done():
        for r in reqs:
            r.cancel()
        gather.cancel()
        gather.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise ApiError(499, "client disconnected")
    results = gather.result()
    for res in results:
        if res.finish_reason == "error":
            raise ApiError(500, f"generation failed: {res.error}", "server_error")
    return results


# ---------------------------------------------------------------------------- routes
@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    return {
        "status": "ok",
        "model": engine.name,
        "rag": request.app.state.retriever is not None,
        **engine.stats(),
    }


@router.get("/v1/models", dependencies=[Depends(auth)])
async def models(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": engine.name,
                "object": "model",
                "created": now(),
                "owned_by": "lmforge",
                "context_length": engine.context,
            }
        ],
    }


@router.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
async def model_info(model_id: str, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    check_model(engine, model_id)
    return {"id": engine.name, "object": "model", "created": now(), "owned_by": "lmforge"}


@router.post("/v1/chat/completions", dependencies=[Depends(auth)])
async def chat(body: ChatRequest, request: Request) -> Any:
    engine = engine_of(request)
    retriever = request.app.state.retriever
    check_model(engine, body.model)
    messages = [m.as_dict() for m in body.messages]
    if body.rag_k is not None and retriever is None:
        raise ApiError(
            400,
            "retrieval is not enabled on this server; start it with --rag-index DIR",
            param="rag",
            code="rag_disabled",
        )
    if engine.chat_format is None:
        raise ApiError(
            400,
            f"model {engine.name!r} has no chat template; use /v1/completions",
            code="no_chat_template",
        )
    ids, citations = await _chat_prompt(engine, retriever, messages, body)
    loop = asyncio.get_running_loop()
    reqs = await submit_all(engine, [ids], body.gen_params(body.budget), body.n, loop)
    cid, created = new_id("chatcmpl"), now()
    if body.stream:
        return StreamingResponse(
            chat_stream(engine, reqs, cid, created, body, citations),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await collect(request, reqs)
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": engine.name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": chat_logprobs(r.logprobs, engine.tok.decode),
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(len(ids), sum(r.completion_tokens for r in results)),
    }
    if citations is not None:
        out["citations"] = citations
    return out


@router.post("/v1/completions", dependencies=[Depends(auth)])
async def completions(body: CompletionRequest, request: Request) -> Any:
    engine = engine_of(request)
    check_model(engine, body.model)
    if body.rag_k is not None:
        raise ApiError(400, "rag is available on /v1/chat/completions only", param="rag")
    prompts = [
        (await run_in_threadpool(engine.encode, p)) if isinstance(p, str) else list(p)
        for p in body.prompt_list
    ]
    loop = asyncio.get_running_loop()
    reqs = await submit_all(engine, prompts, body.gen_params(body.max_tokens), body.n, loop)
    cid, created = new_id("cmpl"), now()
    echo = [
        (p if isinstance(p, str) else engine.tok.decode(p)) if body.echo else ""
        for p in body.prompt_list
        for _ in range(body.n)
    ]
    if body.stream:
        return StreamingResponse(
            completion_stream(engine, reqs, cid, created, body, echo),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await collect(request, reqs)
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": engine.name,
        "choices": [
            {
                "index": i,
                "text": echo[i] + r.text,
                "finish_reason": r.finish_reason,
                "logprobs": completion_logprobs(r.logprobs, engine.tok.decode, len(echo[i])),
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(sum(len(p) for p in prompts) * body.n, sum(r.completion_tokens for r in results)),
    }


# ---------------------------------------------------------------------- chat prompts
async def _chat_prompt(
    engine: Engine, retriever: Any, messages: list[dict], body: ChatRequest
) -> tuple[list[int], list | None]:
    """The conversation's prompt ids (with retrieved sources when the request asks for them) and
    the citations (None without retrieval); a template that refuses the conversation is a 400."""
    try:
        if body.rag_k is not None:
            ids, citations = await run_in_threadpool(_rag_prompt, engine, retriever, messages, body)
            return ids, citations
        return await run_in_threadpool(engine.encode_chat, messages), None
    except ApiError:
        raise
    except Exception as e:  # DataError from a template that refuses this conversation
        raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from None


def _rag_prompt(
    engine: Engine, retriever: Any, messages: list[dict], body: ChatRequest
) -> tuple[list[int], list]:
    """Prompt ids with the retrieved sources in the system message, as many of the top-k as fit
    the context next to the answer (`rag.query.retrieve_and_fit`, the CLI's rule), and their citations."""
    assert body.rag_k is not None  # only called for "rag" requests
    need = body.budget or min(64, engine.context // 4)
    ids, hits = retrieve_and_fit(
        retriever,
        _last_user(messages),
        body.rag_k,
        lambda h: engine.encode_chat(augment_messages(messages, h)),
        engine.context,
        need,
    )
    return ids, [h.citation() for h in hits]


def _last_user(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            content: str = m["content"]
            return content
    raise ApiError(400, "rag needs a user message to use as the search query", param="messages")
