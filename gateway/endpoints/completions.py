"""``POST /v1/completions``: a raw prompt (or several) in, ``text_completion`` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from gateway.endpoints.chunks import ChunkStream, completion_body, json_string
from gateway.endpoints.logprobs import completion_logprobs
from gateway.flow.contract import Result, Stateless
from gateway.sse import frame
from gateway.types import (
    ClientRequest,
    Delta,
    EmbeddingDelta,
    Endpoint,
    Finish,
    GenerationRequest,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)
from gateway.wire.convert import completion_request
from gateway.wire.responses import dumps
from gateway.wire.shared import prompt_progress

_OPEN = ',"logprobs":null,"finish_reason":null}]}'


def _echo(request: ClientRequest, gen: GenerationRequest) -> str:
    return gen.prompt if request.echo and gen.prompt else ""


class CompletionStreamEncoder(ChunkStream):
    def __init__(self, request: ClientRequest, response_id: str, created: int) -> None:
        super().__init__("text_completion", request, response_id, created)
        self._offsets = {g.index: len(_echo(request, g)) for g in request.generations}
        self._top = {g.index: g.logprobs or 0 for g in request.generations}

    def _text(self, index: int, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> bytes:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(text)
        if not logprobs:
            return frame(f'{self.head.text}[{{"index":{index},"text":{json_string(text)}{_OPEN}')
        lp = dumps(completion_logprobs(logprobs, offset, self._top.get(index, 0)))
        return frame(
            f'{self.head.text}[{{"index":{index},"text":{json_string(text)},'
            f'"logprobs":{lp},"finish_reason":null}}]}}'
        )

    def start(self) -> list[bytes]:
        return [
            self._text(g.index, _echo(self.request, g))
            for g in self.request.generations
            if _echo(self.request, g)
        ]

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        match delta:
            case TextDelta(text=text, logprobs=logprobs):
                return [self._text(index, text, logprobs)]
            case ReasoningDelta():
                return []  # a raw completion is never parsed: no backend sends one
            case Finish(reason=reason):
                return [
                    frame(
                        f'{self.head.text}[{{"index":{index},"text":"","logprobs":null,'
                        f'"finish_reason":"{reason}"}}]}}'
                    )
                ]
            case PromptProgress():
                if index % max(1, self.request.choices_per_prompt):
                    return []  # one per prompt
                body = dumps(prompt_progress(delta))
                return [frame(f'{self.head.text}[],"prompt_progress":{body}}}')]
            case ToolCallDelta() | EmbeddingDelta():
                raise TypeError(f"a text completion carries no {type(delta).__name__}")
            case _:
                assert_never(delta)


@dataclass(frozen=True)
class CompletionsEndpoint(Stateless):
    name: Endpoint = "completion"
    path: str = "/v1/completions"
    id_prefix: str = "cmpl-"

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return completion_request(body, request_id)

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> CompletionStreamEncoder:
        return CompletionStreamEncoder(request, response_id, created)

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        choices: list[object] = []
        for g in request.generations:
            choice = result.choice(g.index)
            echo = _echo(request, g)
            text = echo + "".join(choice.text)
            logprobs = (
                completion_logprobs(choice.logprobs, len(echo), g.logprobs)
                if g.logprobs is not None
                else None
            )
            choices.append(
                {
                    "index": g.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
        return completion_body(
            "text_completion", request, response_id, created, choices, result.usage
        )
