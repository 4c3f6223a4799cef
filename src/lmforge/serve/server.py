"""`lmforge serve`: an OpenAI-compatible HTTP server around the generation `Engine`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events ending in `data: [DONE]`), `GET /health`, and the web chat
page at `/`. The official `openai` Python client works against it unchanged
(`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`).

Behaviour under bad input and load, by design:
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a
  malformed body or an invalid value (the message names the field), 401 for a missing or wrong
  API key (only when one is configured), 404 for an unknown model or route, 413 for a body over
  `max_body_bytes`, 503 with `Retry-After` when the engine's queue is full, 500 if decoding fails.
- A client that disconnects (mid-stream or while waiting for a whole answer) cancels its
  request, which frees its engine slot at the next decode step.
- Binds 127.0.0.1 unless told otherwise; the API key is compared in constant time.

The HTTP plumbing (the error type, the body-size middleware, running the app) is in `http.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Chunk, Engine, EngineClosed, EngineFull

# ServerThread and make_server are re-exported: callers import them from here
from .http import ApiError, BodyLimit, ServerThread, field_of, make_server  # noqa: F401
from .protocol import (
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)
from .rag.query import augment_messages, retrieve_and_fit

WEB_DIR = Path(__file__).parent / "web"


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    retriever=None,
    max_body_bytes: int = 1 << 20,
    web: bool = True,
):
    """The FastAPI application. `retriever` (a `rag.Retriever`) enables `"rag": true` requests."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(
            error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            return JSONResponse(
                error_body(f"malformed JSON body: {ctx.get('error', first['msg'])}", code="invalid_json"),
                status_code=400,
            )
        field = field_of(first.get("loc", ()))
        msg = first["msg"].removeprefix("Value error, ")
        if first.get("type") == "missing":
            msg = "field required"
        more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        return JSONResponse(
            error_body(
                f"{field}: {msg}{more}" if field else f"{msg}{more}",
                param=field or None,
                code="invalid_value",
            ),
            status_code=400,
        )

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{e.detail}", kind), status_code=e.status_code)

    async def auth(request: Request):
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

    def check_model(name: str) -> None:
        if name != engine.name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {engine.name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def submit_all(prompts: list[list[int]], params, n: int, loop):
        reqs = []
        try:
            for ids in prompts:
                for j in range(n):
                    p = params
                    if n > 1 and params.seed is not None:
                        from dataclasses import replace

                        p = replace(params, seed=params.seed + j)
                    reqs.append(engine.submit(ids, p, loop=loop))
        except EngineFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(
                503, str(e), "server_busy", code="queue_full", headers={"Retry-After": "1"}
            ) from None
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

    async def collect(request: Request, reqs):
        """Whole answers, cancelling them if the client goes away first."""

        async def wait_disconnect():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        gather = asyncio.ensure_future(asyncio.gather(*(r.aresult() for r in reqs)))
        watch = asyncio.ensure_future(wait_disconnect())
        try:
            await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
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

    async def merged(reqs) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) from several running requests, as they arrive."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, r):
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

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "rag": retriever is not None, **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
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

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def model_info(model_id: str):
        check_model(model_id)
        return {"id": engine.name, "object": "model", "created": now(), "owned_by": "lmforge"}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        messages = [m.as_dict() for m in body.messages]
        citations = None
        if body.rag_k is not None:
            if retriever is None:
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
        try:
            if body.rag_k is not None:
                ids, citations = await run_in_threadpool(_rag_prompt, engine, retriever, messages, body)
            else:
                ids = await run_in_threadpool(engine.encode_chat, messages)
        except ApiError:
            raise
        except Exception as e:  # DataError from a template that refuses this conversation
            raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from None
        loop = asyncio.get_running_loop()
        reqs = await submit_all([ids], body.gen_params(body.budget), body.n, loop)
        cid, created = new_id("chatcmpl"), now()
        if body.stream:
            return StreamingResponse(
                _chat_stream(reqs, cid, created, body, citations),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results = await collect(request, reqs)
        out = {
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

    async def _chat_stream(reqs, cid, created, body, citations):
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
        try:
            for i in range(len(reqs)):
                first = {
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
                yield sse({**base, "choices": [], "usage": usage(len(reqs[0].prompt_ids), n_out)})
            yield b"data: [DONE]\n\n"
        finally:  # client gone (the response task is cancelled) or done: free the slots
            for r in reqs:
                r.cancel()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.rag_k is not None:
            raise ApiError(400, "rag is available on /v1/chat/completions only", param="rag")
        prompts = [
            (await run_in_threadpool(engine.encode, p)) if isinstance(p, str) else list(p)
            for p in body.prompt_list
        ]
        loop = asyncio.get_running_loop()
        reqs = await submit_all(prompts, body.gen_params(body.max_tokens), body.n, loop)
        cid, created = new_id("cmpl"), now()
        echo = [
            (p if isinstance(p, str) else engine.tok.decode(p)) if body.echo else ""
            for p in body.prompt_list
            for _ in range(body.n)
        ]
        if body.stream:
            return StreamingResponse(
                _completion_stream(reqs, cid, created, body, echo),
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

    async def _completion_stream(reqs, cid, created, body, echo):
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
                        "usage": usage(
                            sum(len(r.prompt_ids) for r in reqs), sum(len(r.out_ids) for r in reqs)
                        ),
                    }
                )
            yield b"data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancel()

    if web and WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(WEB_DIR / "index.html")

    return BodyLimit(app, max_body_bytes)


def _rag_prompt(engine: Engine, retriever, messages: list[dict], body: ChatRequest) -> tuple[list[int], list]:
    """Prompt ids with the retrieved sources in the system message, as many of the top-k as fit
    the context next to the answer (`rag.query.retrieve_and_fit`, the CLI's rule), and their citations."""
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
            return m["content"]
    raise ApiError(400, "rag needs a user message to use as the search query", param="messages")
