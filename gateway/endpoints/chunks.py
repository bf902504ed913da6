"""The part of a completion chunk every chunk of one response shares, rendered once.

Stream chunks are built from per-request templates: only what changes (the text, a tool call's
arguments) is JSON-escaped per chunk.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.sse import frame
from gateway.types import ClientRequest, Usage
from gateway.wire.responses import dumps, error_event, one_line, usage_json

DONE = frame("[DONE]")


class ChunkHead:
    """``{"id":...,"object":...,"created":...,"model":...,"system_fingerprint":null,"choices":``"""

    def __init__(self, obj: str, response_id: str, created: int, model: str) -> None:
        self.text = (
            f'{{"id":{dumps(response_id)},"object":"{obj}","created":{created},'
            f'"model":{dumps(model)},"system_fingerprint":null,"choices":'
        )

    def usage(self, usage: Usage) -> bytes:
        return frame(f'{self.text}[],"usage":{dumps(usage_json(usage))}}}')


class ChunkStream:
    """What chat and text completion streams share: the head, the usage chunk, ``[DONE]``."""

    def __init__(self, obj: str, request: ClientRequest, response_id: str, created: int) -> None:
        self.request = request
        self.head = ChunkHead(obj, response_id, created, request.model)

    async def end(self, usage: Usage) -> list[bytes]:
        events = [self.head.usage(usage)] if self.request.include_usage else []
        return [*events, DONE]

    def error(self, error: GatewayError) -> bytes:
        return error_frame(error)


def completion_body(
    obj: str,
    request: ClientRequest,
    response_id: str,
    created: int,
    choices: list[object],
    usage: Usage,
) -> bytes:
    """A whole (non-streamed) chat or text completion."""
    body = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": request.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_json(usage),
    }
    return dumps(body).encode()


def json_string(text: str) -> str:
    return one_line(dumps(text))


def error_frame(error: GatewayError) -> bytes:
    return frame(error_event(error.to_body()))
