"""A streamed message's events, as the anthropic SDK's ``messages.stream()`` accumulates them:
``message_start`` (with the prompt's tokens), per block ``content_block_start``, its deltas
(``text_delta``, ``thinking_delta``, ``input_json_delta``) and ``content_block_stop`` with
consecutive indexes, then ``message_delta`` (``stop_reason``, usage) and ``message_stop``.
Each event has its ``event:`` line; a failure after the headers is one ``error`` event."""

from __future__ import annotations

from typing import assert_never

from gateway.endpoints.messages.errors import error_json
from gateway.endpoints.messages.objects import block_json, message_json, stop_reason, usage_json
from gateway.errors import GatewayError
from gateway.sse import frame
from gateway.types import ClientRequest, Delta, Usage
from gateway.wire.blocks import Block, BlockEvent, Closed, Grew, Opened, Segmenter
from gateway.wire.responses import json_line

PING = frame(json_line({"type": "ping"}), event="ping")


def event(kind: str, **fields: object) -> bytes:
    return frame(json_line({"type": kind, **fields}), event=kind)


class MessagesStreamEncoder:
    def __init__(self, request: ClientRequest, message_id: str, thinking: bool) -> None:
        self.request = request
        self.message_id = message_id
        self.thinking = thinking
        self.segments = Segmenter()
        #: The client's index of each shown block (hidden reasoning is not counted).
        self.indexes: dict[int, int] = {}

    def start(self) -> list[bytes]:
        tokenized = self.request.generations[0].tokenized
        prompt = tokenized.count if tokenized is not None else 0
        message = message_json(
            self.message_id, self.request.model, [], None, Usage(prompt_tokens=prompt)
        )
        return [event("message_start", message=message)]

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        return [e for change in self.segments.feed(delta) for e in self._block(change)]

    def _block(self, change: BlockEvent) -> list[bytes]:
        block = change.block
        if block.kind == "reasoning" and not self.thinking:
            return []
        match change:
            case Opened():
                self.indexes[block.index] = len(self.indexes)
                return [self._event(block, "content_block_start",
                                    content_block=block_json(block, started=True))]  # fmt: skip
            case Grew(piece=piece):
                return [self._event(block, "content_block_delta", delta=_delta(block, piece))]
            case Closed():
                return [self._event(block, "content_block_stop")]
            case _:
                assert_never(change)

    def _event(self, block: Block, kind: str, **fields: object) -> bytes:
        return event(kind, index=self.indexes[block.index], **fields)

    async def end(self, usage: Usage) -> list[bytes]:
        events = [e for change in self.segments.close() for e in self._block(change)]
        reason, sequence = stop_reason(self.segments.finish)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        return [
            *events,
            event("message_delta", delta=delta, usage=usage_json(usage)),
            event("message_stop"),
        ]

    def error(self, error: GatewayError) -> bytes:
        return frame(json_line(error_json(error)), event="error")


def _delta(block: Block, piece: str) -> dict[str, object]:
    if block.kind == "text":
        return {"type": "text_delta", "text": piece}
    if block.kind == "reasoning":
        return {"type": "thinking_delta", "thinking": piece}
    return {"type": "input_json_delta", "partial_json": piece}
