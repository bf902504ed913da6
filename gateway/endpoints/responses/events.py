"""A streamed response's events, in the order the openai SDK's ``responses.stream()``
accumulates them: ``response.created``, ``response.in_progress``, each output item opened,
its parts and deltas, each closed, then ``response.completed`` (or ``.incomplete``) with the
whole response. Every event has a strictly increasing ``sequence_number``. A custom tool's
input streams as ``response.custom_tool_call_input.delta`` events as its arguments arrive
(decoded by :class:`~gateway.output.calls.CustomInput`, as chat completions stream it), then
whole in ``.done``. A request with ``return_progress`` also gets ``response.prompt_progress``
events (llama-server's ``prompt_progress`` object) while its prompt is read."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import assert_never

from gateway.endpoints.responses.convert import ResponsesState, state_of
from gateway.endpoints.responses.objects import (
    Json,
    answers,
    block_item_id,
    block_status,
    call_item,
    item_of,
    message_item,
    output_logprobs,
    reasoning_item,
    response_object,
    status_of,
    text_part,
    usage_json,
)
from gateway.errors import GatewayError
from gateway.output.calls import CustomInput
from gateway.sse import frame
from gateway.types import ClientRequest, Delta, PromptProgress, TokenLogprob, Usage
from gateway.wire.blocks import Block, BlockEvent, Closed, Grew, Opened, Segmenter
from gateway.wire.responses import json_line
from gateway.wire.shared import prompt_progress

Keep = Callable[[ResponsesState, dict[str, object]], Awaitable[None]]


class ResponsesStreamEncoder:
    """Events for the blocks the shared :class:`Segmenter` makes of the deltas: an output
    item per block, as a collected body has them."""

    def __init__(self, request: ClientRequest, response_id: str, created: int, keep: Keep) -> None:
        self.request = request
        self.keep = keep
        self.state: ResponsesState = state_of(request)
        self.response_id = response_id
        self.created = created
        self.sequence = 0
        self.output: list[dict[str, object]] = []
        self.segments = Segmenter()
        #: Each open or finished block's item id.
        self.item_ids: dict[int, str] = {}
        #: The input of each open custom call block, decoded as its arguments stream.
        self.inputs: dict[int, CustomInput] = {}
        #: The final event was built (the response is stored if it is to be).
        self.finished = False
        #: The error the stream ended with, if it failed.
        self.failure: GatewayError | None = None

    @property
    def reasoning_tokens(self) -> int:
        return self.segments.reasoning_tokens

    def _event(self, kind: str, **fields: object) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return frame(json_line(body), event=kind)

    def snapshot(self, status: str, **extra: object) -> dict[str, object]:
        """The response as it stands; stopped (cancelled, failed), with what its open item
        holds so far, marked incomplete (a reload finds the text the client saw)."""
        output = list(self.output)
        block = self.segments.current
        if status in ("cancelled", "failed") and block is not None:
            item_id = self.item_ids.get(block.index)
            if item_id is not None and block.index < len(output):
                output[block.index] = item_of(self.state, block, item_id, "incomplete")
        return response_object(
            self.state, response_id=self.response_id, created=self.created,
            model=self.request.model, status=status, output=output, **extra,  # type: ignore[arg-type]
        )  # fmt: skip

    def queued(self) -> list[bytes]:
        """A background response's first events, while it waits for its sequences."""
        return [
            self._event("response.created", response=self.snapshot("queued")),
            self._event("response.queued", response=self.snapshot("queued")),
        ]

    def start(self) -> list[bytes]:
        response = self.snapshot("in_progress")
        created = [] if self.sequence else [self._event("response.created", response=response)]
        return [*created, self._event("response.in_progress", response=response)]

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        if isinstance(delta, PromptProgress):  # asked for with ``return_progress``
            progress = prompt_progress(delta)
            return [self._event("response.prompt_progress", prompt_progress=progress)]
        return [e for event in self.segments.feed(delta) for e in self._block_event(event)]

    def _block_event(self, event: BlockEvent) -> list[bytes]:
        match event:
            case Opened(block=block):
                return self._opened(block)
            case Grew(block=block, piece=piece, logprobs=logprobs):
                return self._grew(block, piece, logprobs)
            case Closed(block=block):
                return self._closed(block)
            case _:
                assert_never(event)

    def _item_event(self, block: Block, kind: str, **fields: object) -> bytes:
        item_id = self.item_ids[block.index]
        return self._event(kind, item_id=item_id, output_index=block.index, **fields)

    def _opened(self, block: Block) -> list[bytes]:
        item_id = self.item_ids[block.index] = block_item_id(self.state, block)
        if block.kind == "call":
            origin = self.state.origins.get(block.name)
            item = call_item(item_id, block.call_id, block.name, "", origin, "in_progress")
            part = None
            if origin is not None and origin.custom:
                self.inputs[block.index] = CustomInput()
        elif block.kind == "text":
            item = message_item(item_id, [], "in_progress")
            part = text_part("", [] if self.state.logprobs else None)
        else:
            item = reasoning_item(item_id, None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        self.output.append(item)
        events = [self._event("response.output_item.added", output_index=block.index, item=item)]
        if part is not None:
            events.append(
                self._item_event(block, "response.content_part.added", content_index=0, part=part)
            )
        return events

    def _grew(self, block: Block, piece: str, logprobs: tuple[TokenLogprob, ...]) -> list[bytes]:
        if block.kind == "text":
            lp = output_logprobs(logprobs)
            return [
                self._item_event(
                    block, "response.output_text.delta", delta=piece, content_index=0,
                    logprobs=lp if self.state.logprobs else [],
                )
            ]  # fmt: skip
        if block.kind == "reasoning":
            return [
                self._item_event(
                    block, "response.reasoning_text.delta", delta=piece, content_index=0
                )
            ]
        decoder = self.inputs.get(block.index)
        if decoder is None:
            return [self._item_event(block, "response.function_call_arguments.delta", delta=piece)]
        text = decoder.feed(piece)
        if not text:  # nothing of the input yet (its head, or an escape cut in two)
            return []
        return [self._item_event(block, "response.custom_tool_call_input.delta", delta=text)]

    def _closed(self, block: Block) -> list[bytes]:
        """The done events of a block (its final item replaces it in the output)."""
        item_id = self.item_ids[block.index]
        done = item_of(self.state, block, item_id, block_status(self.segments, block))
        if block.kind == "text":
            events = self._message_done(block, done)
        elif block.kind == "reasoning":
            events = self._reasoning_done(block)
        else:
            events = self._call_done(block, done)
        self.output[block.index] = done
        events.append(self._event("response.output_item.done", output_index=block.index, item=done))
        return events

    def _message_done(self, block: Block, done: Json) -> list[bytes]:
        content = done["content"]
        assert isinstance(content, list)
        part = content[0]
        logprobs = output_logprobs(block.logprobs) if self.state.logprobs else []
        text = {"content_index": 0, "text": block.text, "logprobs": logprobs}
        return [
            self._item_event(block, "response.output_text.done", **text),
            self._item_event(block, "response.content_part.done", content_index=0, part=part),
        ]

    def _reasoning_done(self, block: Block) -> list[bytes]:
        part = {"type": "reasoning_text", "text": block.text}
        return [
            self._item_event(
                block, "response.reasoning_text.done", content_index=0, text=block.text
            ),
            self._item_event(block, "response.content_part.done", content_index=0, part=part),
        ]

    def _call_done(self, block: Block, done: Json) -> list[bytes]:
        """A function call's arguments are done, or a custom tool's input: what its decoder
        held back comes first (arguments of another shape than ``{"input": ...}``: all of
        them), then the whole input."""
        if done["type"] != "custom_tool_call":
            args = {"arguments": block.text, "name": done["name"]}
            return [self._item_event(block, "response.function_call_arguments.done", **args)]
        rest = self.inputs.pop(block.index).end()
        events = (
            [self._item_event(block, "response.custom_tool_call_input.delta", delta=rest)]
            if rest
            else []
        )
        events.append(
            self._item_event(block, "response.custom_tool_call_input.done", input=done["input"])
        )
        return events

    async def end(self, usage: Usage) -> list[bytes]:
        events = [e for event in self.segments.close() for e in self._block_event(event)]
        if not answers(self.segments):  # no text and no call: one empty message, as a body has
            empty = Block("text", len(self.output))
            events += self._opened(empty)
            events += self._closed(empty)
        finish = self.segments.finish
        status, incomplete = status_of(finish.reason if finish else None)
        response = self.final(usage, status, incomplete)
        await self.keep(self.state, response)
        self.finished = True
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=response)]

    def final(
        self, usage: Usage, status: str, incomplete: dict[str, object] | None
    ) -> dict[str, object]:
        return self.snapshot(
            status,
            usage=usage_json(usage, self.reasoning_tokens),
            incomplete=incomplete,
            completed_at=int(time.time()),
        )

    def error(self, error: GatewayError) -> bytes:
        self.failure = error
        return self._event(
            "error", code=error.code or error.type, message=error.message, param=error.param
        )
