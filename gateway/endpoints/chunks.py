"""The part of a completion chunk every chunk of one response shares, rendered once.

Stream chunks are built from per-request templates: only what changes (the text, a tool call's
arguments) is JSON-escaped per chunk.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.sse import frame
from gateway.types import Usage
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


def json_string(text: str) -> str:
    return one_line(dumps(text))


def error_frame(error: GatewayError) -> bytes:
    return frame(error_event(error.to_body()))
