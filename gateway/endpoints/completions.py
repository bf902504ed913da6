"""``POST /v1/completions``: a raw prompt (or several) in, ``text_completion`` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from gateway.endpoints.base import Result
from gateway.endpoints.chunks import DONE, ChunkHead, error_frame, json_string
from gateway.errors import GatewayError
from gateway.sse import frame
from gateway.types import (
    ClientRequest,
    Delta,
    EmbeddingDelta,
    Endpoint,
    Finish,
    GenerationRequest,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from gateway.wire.convert import completion_request
from gateway.wire.responses import dumps, usage_json

_OPEN = ',"logprobs":null,"finish_reason":null}]}'


def _echo(request: ClientRequest, gen: GenerationRequest) -> str:
    return gen.prompt if request.echo and gen.prompt else ""


class CompletionStreamEncoder:
    def __init__(self, request: ClientRequest, response_id: str, created: int) -> None:
        self.request = request
        self.head = ChunkHead("text_completion", response_id, created, request.model)

    def _text(self, index: int, text: str) -> bytes:
        return frame(f'{self.head.text}[{{"index":{index},"text":{json_string(text)}{_OPEN}')

    def start(self) -> list[bytes]:
        return [
            self._text(g.index, _echo(self.request, g))
            for g in self.request.generations
            if _echo(self.request, g)
        ]

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        match delta:
            case TextDelta(text=text):
                return [self._text(index, text)]
            case Finish(reason=reason):
                return [
                    frame(
                        f'{self.head.text}[{{"index":{index},"text":"","logprobs":null,'
                        f'"finish_reason":"{reason}"}}]}}'
                    )
                ]
            case ToolCallDelta() | EmbeddingDelta():
                raise TypeError(f"a text completion carries no {type(delta).__name__}")
            case _:
                assert_never(delta)

    def end(self, usage: Usage) -> list[bytes]:
        events = [self.head.usage(usage)] if self.request.include_usage else []
        return [*events, DONE]

    def error(self, error: GatewayError) -> bytes:
        return error_frame(error)


@dataclass(frozen=True)
class CompletionsEndpoint:
    name: Endpoint = "completion"
    path: str = "/v1/completions"
    id_prefix: str = "cmpl-"

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return completion_request(body, request_id)

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> CompletionStreamEncoder:
        return CompletionStreamEncoder(request, response_id, created)

    def body(self, request: ClientRequest, response_id: str, created: int, result: Result) -> bytes:
        choices = []
        for g in request.generations:
            choice = result.choice(g.index)
            text = _echo(request, g) + "".join(choice.text)
            choices.append(
                {
                    "index": g.index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
            )
        body = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage_json(result.usage),
        }
        return dumps(body).encode()
