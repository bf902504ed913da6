"""``POST /v1/chat/completions``: messages in, ``chat.completion`` (or its chunks) out.

A call of a custom tool (free-text input) is ``{"id", "type": "custom", "custom": {"name",
"input"}}`` with the input exactly as the model wrote it; streamed, its first piece is that
(the input so far) and later pieces ``{"index", "custom": {"input": ...}}`` carry more of it
(the SDK has no chunk type for them: this is the function-call delta's shape, ``custom`` for
``function`` and ``input`` for ``arguments``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from gateway.endpoints.chunks import ChunkStream, completion_body, json_string
from gateway.endpoints.logprobs import chat_logprobs
from gateway.flow.contract import ChoiceResult, Result, Stateless, ToolCall
from gateway.output.calls import CustomInput, custom_input, custom_names
from gateway.sse import frame
from gateway.types import (
    ClientRequest,
    Delta,
    EmbeddingDelta,
    Endpoint,
    Finish,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from gateway.wire.convert import chat_request
from gateway.wire.responses import dumps
from gateway.wire.shared import prompt_progress

_OPEN = '},"logprobs":null,"finish_reason":null}]}'


class ChatStreamEncoder(ChunkStream):
    def __init__(self, request: ClientRequest, response_id: str, created: int) -> None:
        super().__init__("chat.completion.chunk", request, response_id, created)
        self._prefixes: dict[int, str] = {}
        self._custom_names = {g.index: custom_names(g.tools) for g in request.generations}
        #: The custom calls of each choice being streamed, by their number.
        self._custom: dict[int, dict[int, CustomInput]] = {}

    def _prefix(self, index: int) -> str:
        prefix = self._prefixes.get(index)
        if prefix is None:
            prefix = f'{self.head.text}[{{"index":{index},"delta":{{'
            self._prefixes[index] = prefix
        return prefix

    def start(self) -> list[bytes]:
        return [
            frame(f'{self._prefix(g.index)}"role":"assistant","content":""{_OPEN}')
            for g in self.request.generations
        ]

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        match delta:
            case TextDelta(text=text, logprobs=()):
                return [frame(f'{self._prefix(index)}"content":{json_string(text)}{_OPEN}')]
            case TextDelta(text=text, logprobs=logprobs):
                tail = f'}},"logprobs":{dumps(chat_logprobs(logprobs))},"finish_reason":null}}]}}'
                return [frame(f'{self._prefix(index)}"content":{json_string(text)}{tail}')]
            case ReasoningDelta(text=text):
                piece = json_string(text)
                return [
                    frame(
                        f'{self._prefix(index)}"reasoning_content":{piece},"reasoning":{piece}{_OPEN}'
                    )
                ]
            case ToolCallDelta():
                call = self._call_piece(index, delta)
                return [] if call is None else [self._calls(index, [call])]
            case Finish(reason=reason):
                ends = self._end_calls(index)
                return [
                    *([self._calls(index, ends)] if ends else []),
                    frame(
                        f'{self.head.text}[{{"index":{index},"delta":{{}},"logprobs":null,'
                        f'"finish_reason":"{reason}"}}]}}'
                    ),
                ]
            case PromptProgress():  # one prompt for every choice: told once
                return [self._progress(delta)] if index == 0 else []
            case EmbeddingDelta():
                raise TypeError("a chat completion carries no embedding")
            case _:
                assert_never(delta)

    def _progress(self, progress: PromptProgress) -> bytes:
        """llama-server's chunk: no choice, the prompt's progress."""
        return frame(f'{self.head.text}[],"prompt_progress":{dumps(prompt_progress(progress))}}}')

    def _calls(self, index: int, pieces: list[dict[str, object]]) -> bytes:
        calls = ",".join(dumps(p) for p in pieces)
        return frame(f'{self._prefix(index)}"tool_calls":[{calls}]{_OPEN}')

    def _call_piece(self, index: int, delta: ToolCallDelta) -> dict[str, object] | None:
        """A call's piece as a chunk carries it (None: a custom call's piece that adds
        nothing to its input yet)."""
        calls = self._custom.setdefault(index, {})
        if delta.id is not None and delta.name in self._custom_names.get(index, ()):
            calls[delta.call] = decoder = CustomInput()
            custom = {"name": delta.name, "input": decoder.feed(delta.arguments)}
            return {"index": delta.call, "id": delta.id, "type": "custom", "custom": custom}
        decoder_or_none = calls.get(delta.call)
        if decoder_or_none is None:
            return _tool_call_piece(delta)
        text = decoder_or_none.feed(delta.arguments)
        return {"index": delta.call, "custom": {"input": text}} if text else None

    def _end_calls(self, index: int) -> list[dict[str, object]]:
        """The input the choice's custom calls hold back at its end (arguments of another
        shape than ``{"input": ...}``: :meth:`CustomInput.end`)."""
        pieces: list[dict[str, object]] = []
        for call, decoder in self._custom.pop(index, {}).items():
            text = decoder.end()
            if text:
                pieces.append({"index": call, "custom": {"input": text}})
        return pieces


def _tool_call_piece(delta: ToolCallDelta) -> dict[str, object]:
    """The first piece names the call (``id``, ``type``, ``function.name``); later pieces carry
    only the index and more of the arguments, as OpenAI streams them."""
    if delta.id is None:
        return {"index": delta.call, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.call, "id": delta.id, "type": "function", "function": function}


def _call_json(call: ToolCall, custom: frozenset[str]) -> dict[str, object]:
    arguments = "".join(call.arguments)
    if call.name in custom:
        named = {"name": call.name, "input": custom_input(arguments)}
        return {"id": call.id, "type": "custom", "custom": named}
    function = {"name": call.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


def _message(choice: ChoiceResult, custom: frozenset[str]) -> dict[str, object]:
    message: dict[str, object] = {
        "role": "assistant",
        "content": "".join(choice.text) if choice.text or not choice.tool_calls else None,
        "refusal": None,
    }
    if choice.reasoning:
        message["reasoning_content"] = message["reasoning"] = "".join(choice.reasoning)
    if choice.tool_calls:
        message["tool_calls"] = [_call_json(call, custom) for call in choice.tool_calls]
    return message


@dataclass(frozen=True)
class ChatEndpoint(Stateless):
    name: Endpoint = "chat"
    path: str = "/v1/chat/completions"
    id_prefix: str = "chatcmpl-"

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return chat_request(body, request_id)

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> ChatStreamEncoder:
        return ChatStreamEncoder(request, response_id, created)

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        choices: list[object] = []
        for g in request.generations:
            choice = result.choice(g.index)
            choices.append(
                {
                    "index": g.index,
                    "message": _message(choice, custom_names(g.tools)),
                    "logprobs": chat_logprobs(choice.logprobs) if g.logprobs is not None else None,
                    "finish_reason": choice.finish_reason,
                }
            )
        return completion_body(
            "chat.completion", request, response_id, created, choices, result.usage
        )
