"""Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` with its types,
and 529 ``overloaded_error`` where OpenAI's dialect says 503 (a full queue, a model loading or
shutting down), which the anthropic SDK and Claude Code retry."""

from __future__ import annotations

from gateway.errors import ContextLengthExceeded, GatewayError

#: Anthropic's error type for each HTTP status this server answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def status_of(error: GatewayError) -> int:
    return OVERLOADED if error.status == 503 else error.status


def message_of(error: GatewayError) -> str:
    """The error's message; a context overflow in Anthropic's own words, which clients parse
    (Claude Code retries with ``max_tokens`` = limit - input - 1000)."""
    if isinstance(error, ContextLengthExceeded) and error.limit is not None:
        prompt, limit = error.prompt_tokens, error.limit
        if error.max_tokens is None:
            return f"prompt is too long: {prompt} tokens > {limit} maximum"
        return (
            f"input length and `max_tokens` exceed context limit: {prompt} + "
            f"{error.max_tokens} > {limit}, decrease input length or `max_tokens` and try again"
        )
    return error.message


def error_json(error: GatewayError) -> dict[str, object]:
    kind = _TYPES.get(status_of(error), "api_error")
    return {"type": "error", "error": {"type": kind, "message": message_of(error)}}


class AnthropicErrors:
    """The :class:`gateway.errors.ErrorDialect` of the Messages API."""

    def render(self, error: GatewayError) -> tuple[int, object]:
        return status_of(error), error_json(error)


ANTHROPIC_ERRORS = AnthropicErrors()
