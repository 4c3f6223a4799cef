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

The routes are in `routes.py`, the streamed (SSE) bodies in `streams.py`, and the HTTP plumbing
(the error type, the body-size middleware, running the app) in `http.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine

# ServerThread and make_server are re-exported: callers import them from here
from .http import ApiError, BodyLimit, ServerThread, field_of, make_server  # noqa: F401
from .protocol import error_body
from .routes import router

WEB_DIR = Path(__file__).parent / "web"


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    retriever: Any = None,
    max_body_bytes: int = 1 << 20,
    web: bool = True,
) -> BodyLimit:
    """The FastAPI application. `retriever` (a `rag.Retriever`) enables `"rag": true` requests."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.api_key = api_key
    app.state.retriever = retriever
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _internal)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.include_router(router)

    if web and WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    return BodyLimit(app, max_body_bytes)


# ----------------------------------------------------------------------- error handlers
async def _api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(
        error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers
    )


async def _invalid(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    errs = e.errors()
    first: dict[str, Any] = errs[0] if errs else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return JSONResponse(
            error_body(f"malformed JSON body: {ctx.get('error', first['msg'])}", code="invalid_json"),
            status_code=400,
        )
    field = field_of(first.get("loc", ()))
    msg = str(first["msg"]).removeprefix("Value error, ")
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


async def _internal(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse(
        error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500
    )


async def _http(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    kind = "not_found" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{e.detail}", kind), status_code=e.status_code)
