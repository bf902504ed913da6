"""HTTP edge helpers: reading a bounded JSON body, and the one place errors become responses
(:func:`error_response`, used by the flow, the exception handler and the middleware for
bugs), in the error dialect of the wire API whose path was asked (:class:`ErrorDialects`)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    OPENAI_ERRORS,
    ErrorDialect,
    GatewayError,
    InternalError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.wire.responses import json_line

log = logging.getLogger("gateway.http")

JSON_TYPES = ("application/json",)


_DIALECT = "error_dialect"


def error_response(
    err: GatewayError,
    headers: dict[str, str] | None = None,
    dialect: ErrorDialect = OPENAI_ERRORS,
) -> Response:
    all_headers = {**(headers or {}), **err.headers}
    status, body = dialect.render(err)
    return Response(
        json_line(body), status_code=status, media_type="application/json", headers=all_headers
    )


def dialect_of(scope: Scope) -> ErrorDialect:
    """The error dialect :class:`ErrorDialects` chose for this request (OpenAI's if none)."""
    dialect = scope.get("state", {}).get(_DIALECT)
    return dialect if dialect is not None else OPENAI_ERRORS


class ErrorDialects:
    """ASGI middleware: each request carries the error dialect of the wire API that owns its
    path (``prefix`` itself or anything under ``prefix/``), so an error raised anywhere on
    it (a plugin, a missing route, a bug) is shown in that API's shape."""

    def __init__(self, app: ASGIApp, prefixes: Sequence[tuple[str, ErrorDialect]]) -> None:
        self.app = app
        self.prefixes = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope.get("path", "")
            for prefix, dialect in self.prefixes:
                if path == prefix or path.startswith(prefix + "/"):
                    scope.setdefault("state", {})[_DIALECT] = dialect
                    break
        await self.app(scope, receive, send)


async def read_json_body(request: Request, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    """The raw body of a JSON request, at most ``max_bytes`` (413 beyond, 415 if not JSON),
    whole within ``timeout_s`` (408 past it)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {ctype or 'nothing'!r}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def gateway_error_handler(request: Request, exc: Exception) -> Response:
    """Every :class:`GatewayError` a route raises, in its wire API's shape, with its status."""
    assert isinstance(exc, GatewayError)
    return error_response(exc, dialect=dialect_of(request.scope))


class UnexpectedErrors:
    """ASGI middleware: an exception no route handled is a bug. It is logged once, with its
    traceback and the request id; the client gets a 500 ``internal_error`` naming that id and
    nothing of the exception (unless the response had started: then the connection ends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            request_id = scope.get("state", {}).get("request_id") or "req-" + uuid.uuid4().hex
            log.error(
                "request %s: unexpected error on %s", request_id, scope.get("path"), exc_info=exc
            )
            if not started:
                error = InternalError(request_id)
                headers = {"x-request-id": request_id}
                await error_response(error, headers, dialect_of(scope))(scope, receive, send)
