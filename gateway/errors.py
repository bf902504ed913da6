"""The gateway's exception hierarchy. Each class knows how it presents itself on the wire.

``GatewayError.to_body`` is the one place an error becomes OpenAI's
``{"error": {"message", "type", "param", "code"}}``. A wire API with another error shape
(Anthropic's) brings its own :class:`ErrorDialect`; :mod:`gateway.http` picks the dialect of
the route that failed.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

from typing_extensions import TypedDict


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header: whole seconds, rounded up (never sooner than meant), at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_body(self) -> ErrorBody:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ErrorDialect(Protocol):
    """How one wire API shows an error: its HTTP status and JSON body."""

    def render(self, error: GatewayError) -> tuple[int, object]: ...


class OpenAIErrors:
    """OpenAI's error body, with the error's own status."""

    def render(self, error: GatewayError) -> tuple[int, object]:
        return error.status, error.to_body()


OPENAI_ERRORS: ErrorDialect = OpenAIErrors()


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"

    #: The numbers behind the message, for dialects that word it their own way (None where
    #: the error was raised without them).
    limit: int | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class PayloadTooLarge(GatewayError):
    """413; the connection is closed after it, so the rest of the body is never read."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class RequestTimeout(GatewayError):
    """408: the body did not arrive within ``[server].body_timeout_s``; the connection is
    closed after it."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    """This API key's rate limit: 429 with Retry-After."""

    status = 429
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after_s: float, headers: dict[str, str] | None = None
    ) -> None:
        all_headers = retry_after(retry_after_s)
        all_headers.update(headers or {})
        super().__init__(message, headers=all_headers)
        self.retry_after_s = retry_after_s


class Overloaded(GatewayError):
    """The server is full (a model's queue, or a wait past its timeout): 503 with Retry-After."""

    status = 503
    type = "server_overloaded"
    default_code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, headers=retry_after(retry_after_s))


class StoreUnavailable(GatewayError):
    """The stored responses cannot be read or written (a broken disk, Redis down): 503."""

    status = 503
    type = "server_error"
    default_code = "store_unavailable"


class ModelUnavailable(GatewayError):
    """A model failed to load or is shutting down."""

    status = 503
    type = "server_error"
    default_code = "model_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message, headers=retry_after(retry_after_s))


class EngineError(GatewayError):
    """The engine failed while generating: a server fault, never the client's."""

    status = 500
    type = "server_error"
    default_code = "engine_error"


class InternalError(GatewayError):
    """A bug: the client learns the request id to report, nothing of the exception."""

    status = 500
    type = "server_error"
    default_code = "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"internal error while serving request {request_id}; the server log has the details"
        )
        self.request_id = request_id


def context_length_exceeded(
    limit: int,
    prompt_tokens: int,
    max_tokens: int | None,
    param: str,
    *,
    at_least: bool = False,
) -> ContextLengthExceeded:
    """The one way to say a prompt (plus ``max_tokens``) does not fit the context (OpenAI's
    wording). ``param`` is the field holding the prompt (``messages``, ``prompt``, ``input``);
    ``max_tokens`` None: only the prompt was counted; ``at_least``: ``prompt_tokens`` is a lower
    bound (the prompt was refused before it was tokenized)."""
    where = param
    if max_tokens is None:
        more = "more than " if at_least else ""
        detail = f"your {where} resulted in {more}{prompt_tokens} tokens"
    else:
        least = "at least " if at_least else ""
        detail = (
            f"you requested {least}{prompt_tokens + max_tokens} tokens ({least}{prompt_tokens} "
            f"in the {where}, {max_tokens} in the completion)"
        )
    error = ContextLengthExceeded(
        f"This model's maximum context length is {limit} tokens. However, {detail}. "
        f"Please reduce the length of the {where} or completion.",
        param=param,
    )
    error.limit, error.prompt_tokens, error.max_tokens = limit, prompt_tokens, max_tokens
    return error


class ConfigError(Exception):
    """A config file is wrong. ``problems`` lists each with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in config\n{lines}")


class MissingExtra(Exception):
    """An optional dependency a backend needs is not installed."""

    def __init__(self, backend: str, module: str, extra: str) -> None:
        super().__init__(
            f"backend {backend!r} needs the Python package {module!r}: "
            f"pip install 'llm-gateway[{extra}]'"
        )


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
