"""What a replica's failure means: the client's fault (its own 4xx) or the replica's (try another).

An upstream error body is mapped by its HTTP status and OpenAI ``code``, never by its message.
"""

from __future__ import annotations

import json

from gateway.errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    UnsupportedParameter,
)


class UpstreamError(GatewayError):
    """A replica failed (unreachable, a 5xx, a broken stream): a bad gateway, not a bad request."""

    status = 502
    type = "server_error"
    default_code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class ReplicaFailed(Exception):
    """One replica could not serve one request; the next one may. ``error`` is for the client
    (it never names the replica's address); ``str()`` is for the log (``detail``: with it)."""

    def __init__(self, error: GatewayError, detail: str | None = None) -> None:
        super().__init__(detail or error.message)
        self.error = error


#: Statuses that are the request's fault: every replica would answer the same.
_CLIENT_ERRORS: dict[int, type[InvalidRequest]] = {400: InvalidRequest, 422: InvalidRequest}
_BY_CODE: dict[str, type[InvalidRequest]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "unsupported_parameter": UnsupportedParameter,
}


def _fields(body: bytes) -> tuple[str, str | None, str | None]:
    """``(message, param, code)`` from an OpenAI error body, FastAPI's ``detail``, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "no error body", None, None
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message, param, code = error.get("message"), error.get("param"), error.get("code")
        return (
            str(message) if message is not None else json.dumps(error)[:500],
            param if isinstance(param, str) else None,
            code if isinstance(code, str) else None,
        )
    return str(error)[:500], None, None


def upstream_error(status: int, body: bytes, retry_after: str | None = None) -> Exception:
    """The exception for an upstream's non-200 answer: a :class:`GatewayError` to give the
    client as it is, or :class:`ReplicaFailed` to try the next replica."""
    message, param, code = _fields(body)
    if status in _CLIENT_ERRORS:
        cls = _BY_CODE.get(code or "", _CLIENT_ERRORS[status])
        return cls(message, param=param, code=code)
    if status == 413:
        return PayloadTooLarge(message)
    if status in (429, 503, 529):  # 529: Anthropic's overloaded_error
        seconds = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
        return ReplicaFailed(Overloaded(f"replica busy: {message}", retry_after_s=seconds))
    return ReplicaFailed(UpstreamError(f"replica answered {status}: {message}"))


def stream_error(payload: dict[str, object]) -> Exception:
    """The exception for an ``{"error": ...}`` event inside an upstream stream."""
    body = json.dumps(payload).encode()
    error = payload.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "invalid_request_error":
        return upstream_error(400, body)
    message, _, _ = _fields(body)
    return ReplicaFailed(UpstreamError(f"replica failed while streaming: {message}"))
