"""HTTP plumbing of `lmforge serve`, apart from the app (`server.py`) and its routes (`routes.py`,
`streams.py`): the OpenAI-shaped error (`ApiError`, answered as `{"error": {"message", "type",
"param", "code"}}`), the ASGI middleware that refuses bodies over the size limit before they are
parsed, the location of a validation error as a field name, and running an app (uvicorn in the
foreground, or in a background thread for tests, benchmarks and notebooks).
"""

from __future__ import annotations

import json
import threading
import time

from .protocol import error_body


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with a 413 before parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await _send_json(
                send,
                413,
                error_body(
                    f"request body is {declared} bytes; the limit is {self.limit} (--max-body-bytes)",
                    code="body_too_large",
                ),
            )
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body over {self.limit} bytes", code="body_too_large")
            return msg

        try:
            await self.app(scope, limited, send)
        except ApiError as e:
            await _send_json(send, e.status, error_body(e.message, code=e.code))


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def field_of(loc) -> str:
    parts = [str(x) for x in loc if x not in ("body",)]
    # drop pydantic's union-branch labels ("str", "list[TextPart]") from the location
    parts = [
        p for p in parts if not (p.startswith(("list[", "dict[")) or p in ("str", "int", "bool", "float"))
    ]
    return ".".join(parts)


# ----------------------------------------------------------------------------- running
def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=30,
        lifespan="off",
    )
    return uvicorn.Server(config)


class ServerThread:
    """Run the app in a background thread (tests, benchmarks, notebooks). Port 0 = any free port.

    >>> with ServerThread(create_app(engine)) as url:
    ...     OpenAI(base_url=url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = make_server(app, host, port)
        self.thread = threading.Thread(target=self.server.run, name="lmforge-http", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
