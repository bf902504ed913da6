"""A streamed response's events, in the order the openai SDK's ``responses.stream()``
accumulates them: ``response.created``, ``response.in_progress``, each output item opened,
its parts and deltas, each closed, then ``response.completed`` (or ``.incomplete``) with the
whole response. Every event has a strictly increasing ``sequence_number``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import assert_never

from gateway.endpoints.responses.convert import ResponsesState, state_of
from gateway.endpoints.responses.items import new_id
from gateway.endpoints.responses.objects import (
    ItemStatus,
    call_item,
    call_item_id,
    message_item,
    output_logprobs,
    reasoning_item,
    response_object,
    status_of,
    text_part,
    usage_json,
)
from gateway.errors import GatewayError
from gateway.sse import frame
from gateway.types import (
    ClientRequest,
    Delta,
    EmbeddingDelta,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from gateway.wire.responses import json_line


@dataclass
class _Open:
    """The output item being streamed."""

    kind: str
    item_id: str
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, object]] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    custom: bool = False


Json = dict[str, object]
Keep = Callable[[ResponsesState, dict[str, object]], Awaitable[None]]


class ResponsesStreamEncoder:
    def __init__(self, request: ClientRequest, response_id: str, created: int, keep: Keep) -> None:
        self.request = request
        self.keep = keep
        self.state: ResponsesState = state_of(request)
        self.response_id = response_id
        self.created = created
        self.sequence = 0
        self.output: list[dict[str, object]] = []
        self.current: _Open | None = None
        self.finish: Finish | None = None
        self.reasoning_tokens = 0
        #: The final event was built (the response is stored if it is to be).
        self.finished = False
        #: The error the stream ended with, if it failed.
        self.failure: GatewayError | None = None

    def _event(self, kind: str, **fields: object) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return frame(json_line(body), event=kind)

    def snapshot(self, status: str, **extra: object) -> dict[str, object]:
        return response_object(
            self.state, response_id=self.response_id, created=self.created,
            model=self.request.model, status=status, output=list(self.output), **extra,  # type: ignore[arg-type]
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
        match delta:
            case TextDelta(text=text, logprobs=logprobs):
                events = self._open("message")
                assert self.current is not None
                self.current.text.append(text)
                lp = output_logprobs(logprobs) if self.state.logprobs else []
                self.current.logprobs.extend(lp)
                return [
                    *events,
                    self._item_event(
                        "response.output_text.delta", delta=text, content_index=0, logprobs=lp
                    ),
                ]
            case ReasoningDelta(text=text, tokens=tokens):
                self.reasoning_tokens += tokens
                events = self._open("reasoning")
                assert self.current is not None
                self.current.text.append(text)
                return [
                    *events,
                    self._item_event("response.reasoning_text.delta", delta=text, content_index=0),
                ]
            case ToolCallDelta(id=call_id, name=name, arguments=arguments):
                events = self._open_call(call_id, name or "") if call_id is not None else []
                assert self.current is not None and self.current.kind == "call"
                self.current.text.append(arguments)
                if arguments and not self.current.custom:  # a custom input comes whole, at its end
                    events.append(
                        self._item_event("response.function_call_arguments.delta", delta=arguments)
                    )
                return events
            case Finish():
                self.finish = delta
                return self._close()
            case EmbeddingDelta():
                raise TypeError("a response carries no embedding")
            case _:
                assert_never(delta)

    def _item_event(self, kind: str, **fields: object) -> bytes:
        assert self.current is not None
        return self._event(
            kind, item_id=self.current.item_id, output_index=self.current.index, **fields
        )

    def _open(self, kind: str) -> list[bytes]:
        if self.current is not None and self.current.kind == kind:
            return []
        events = self._close()
        item_id = new_id("msg" if kind == "message" else "rs")
        self.current = _Open(kind, item_id, len(self.output))
        if kind == "message":
            item = message_item(item_id, [], "in_progress")
            part = text_part("", [] if self.state.logprobs else None)
        else:
            item = reasoning_item(item_id, None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        self.output.append(item)
        events.append(
            self._event("response.output_item.added", output_index=self.current.index, item=item)
        )
        events.append(self._item_event("response.content_part.added", content_index=0, part=part))
        return events

    def _open_call(self, call_id: str, name: str) -> list[bytes]:
        events = self._close()
        origin = self.state.origins.get(name)
        item_id = call_item_id(origin is not None and origin.custom)
        custom = origin is not None and origin.custom
        self.current = _Open(
            "call", item_id, len(self.output), call_id=call_id, name=name, custom=custom
        )
        item = call_item(item_id, call_id, name, "", origin, "in_progress")
        self.output.append(item)
        events.append(
            self._event("response.output_item.added", output_index=self.current.index, item=item)
        )
        return events

    def _close(self) -> list[bytes]:
        """The done events of the open item (its final form replaces it in the output)."""
        item = self.current
        if item is None:
            return []
        status: ItemStatus = "incomplete" if self._cut() else "completed"
        text = "".join(item.text)
        if item.kind == "message":
            events, done = self._message_done(item, text, status)
        elif item.kind == "reasoning":
            events, done = self._reasoning_done(item, text, status)
        else:
            events, done = self._call_done(item, text, status)
        self.current = None
        self.output[item.index] = done
        events.append(self._event("response.output_item.done", output_index=item.index, item=done))
        return events

    def _message_done(self, item: _Open, text: str, status: ItemStatus) -> tuple[list[bytes], Json]:
        part = text_part(text, item.logprobs if self.state.logprobs else None)
        done = {"content_index": 0, "text": text, "logprobs": item.logprobs}
        events = [
            self._item_event("response.output_text.done", **done),
            self._item_event("response.content_part.done", content_index=0, part=part),
        ]
        return events, message_item(item.item_id, [part], status)

    def _reasoning_done(
        self, item: _Open, text: str, status: ItemStatus
    ) -> tuple[list[bytes], Json]:
        part = {"type": "reasoning_text", "text": text}
        events = [
            self._item_event("response.reasoning_text.done", content_index=0, text=text),
            self._item_event("response.content_part.done", content_index=0, part=part),
        ]
        return events, reasoning_item(item.item_id, text, status)

    def _call_done(self, item: _Open, text: str, status: ItemStatus) -> tuple[list[bytes], Json]:
        """A function call's arguments are done; a custom tool's input comes whole here."""
        origin = self.state.origins.get(item.name)
        done = call_item(item.item_id, item.call_id, item.name, text, origin, status)
        if done["type"] != "custom_tool_call":
            args = {"arguments": text, "name": done["name"]}
            return [self._item_event("response.function_call_arguments.done", **args)], done
        events = [
            self._item_event("response.custom_tool_call_input.delta", delta=done["input"]),
            self._item_event("response.custom_tool_call_input.done", input=done["input"]),
        ]
        return events, done

    def _cut(self) -> bool:
        return self.finish is not None and self.finish.reason == "length"

    async def end(self, usage: Usage) -> list[bytes]:
        events = self._close()
        if not self.output:  # nothing generated: one empty message, as a body has
            events += self._open("message")
            events += self._close()
        status, incomplete = status_of(self.finish.reason if self.finish else None)
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
