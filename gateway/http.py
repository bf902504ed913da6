"""HTTP edge helpers: reading a bounded JSON body, and the one place errors become responses."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, PayloadTooLarge, UnsupportedMediaType
from gateway.wire.responses import error_event

JSON_TYPES = ("application/json",)


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> Response:
    all_headers = {**(headers or {}), **err.headers}
    return Response(
        error_event(err.to_body()),
        status_code=err.status,
        media_type="application/json",
        headers=all_headers,
    )


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The raw body of a JSON request, at most ``max_bytes`` (413 beyond, 415 if not JSON)."""
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
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
