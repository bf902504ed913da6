"""What an endpoint is, as the request flow sees it: the unit of a wire API.

An endpoint brings its parser (bytes -> :class:`ClientRequest`), its encoders (deltas -> a
JSON body, or SSE events), its error dialect (:class:`gateway.errors.ErrorDialect`), its extra
routes and its cleanup. The flow (:mod:`gateway.flow`) does everything else, and imports
nothing from the endpoints: they implement this contract.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Self, assert_never

from gateway.errors import OPENAI_ERRORS, ErrorDialect, GatewayError
from gateway.plugins import RequestContext
from gateway.types import (
    ClientRequest,
    Delta,
    EmbeddingDelta,
    Endpoint,
    Finish,
    FinishReason,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from gateway.wire.blocks import Segmenter

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from gateway.services import Services


@dataclass
class ToolCall:
    """One tool call of a choice, reassembled from its :class:`ToolCallDelta` pieces."""

    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class ChoiceResult:
    """Everything one choice produced, for a non-streaming body."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    embedding: tuple[float, ...] | None = None
    finish: Finish | None = None
    #: The answer's deltas in order, for :attr:`segments`.
    _written: list[Delta] = field(default_factory=list, repr=False)
    _segments: Segmenter | None = field(default=None, repr=False)

    @property
    def segments(self) -> Segmenter:
        """The answer as blocks (text, reasoning, calls in the order written), as a stream's
        segmenter sees them; made when a body first asks (chat's never does)."""
        if self._segments is None:
            self._segments = Segmenter()
            for delta in self._written:
                self._segments.feed(delta)
        return self._segments

    def add(self, delta: Delta) -> None:
        if not isinstance(delta, EmbeddingDelta):
            self._written.append(delta)
        match delta:
            case TextDelta(text=text, logprobs=logprobs):
                self.text.append(text)
                self.logprobs.extend(logprobs)
            case ReasoningDelta(text=text, tokens=tokens):
                self.reasoning.append(text)
                self.reasoning_tokens += tokens
            case ToolCallDelta():
                self._add_call(delta)
            case EmbeddingDelta(vector=vector):
                self.embedding = vector
            case Finish():
                self.finish = delta
            case PromptProgress():
                pass  # a body is sent once the answer is whole
            case _:
                assert_never(delta)

    def _add_call(self, delta: ToolCallDelta) -> None:
        if delta.call == len(self.tool_calls):
            self.tool_calls.append(ToolCall(delta.id or "", delta.name or ""))
        self.tool_calls[delta.call].arguments.append(delta.arguments)

    @property
    def finish_reason(self) -> FinishReason:
        assert self.finish is not None, "the flow checks every choice finished"
        return self.finish.reason


@dataclass
class Result:
    """A whole non-streaming response: each choice by index, and the request's usage."""

    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)

    def add(self, index: int, delta: Delta) -> None:
        self.choices.setdefault(index, ChoiceResult()).add(delta)

    def choice(self, index: int) -> ChoiceResult:
        return self.choices.get(index) or ChoiceResult()


class StreamEncoder(Protocol):
    """One streaming response's SSE events (framed bytes)."""

    def start(self) -> list[bytes]:
        """Events before the first delta (e.g. each chat choice's role)."""
        ...

    def delta(self, index: int, delta: Delta) -> list[bytes]: ...

    async def end(self, usage: Usage) -> list[bytes]:
        """The events after every choice finished (usage if asked, ``[DONE]``); the
        endpoint may keep what it needs of the response before they are sent."""
        ...

    def error(self, error: GatewayError) -> bytes:
        """The one event a stream that fails after its headers ends with."""
        ...


class Running(Protocol):
    """An admitted request as the flow hands it to an endpoint to run in the background
    (:class:`gateway.flow.exchange.Exchange`): its events end it, however they end."""

    request: ClientRequest
    ctx: RequestContext
    encoder: StreamEncoder | None

    def events(self) -> AsyncGenerator[bytes, None]: ...


#: Admits a checked background request (waiting in its model's queue) and returns it ready
#: to run with the encoder given; raises what admission raised (a full queue, its timeout).
Start = Callable[["StreamEncoder"], Awaitable[Running]]


class Parser(Protocol):
    """Bytes to a domain request, in two steps: :meth:`parse` (the body alone) and
    :meth:`resolve` (with what the endpoint keeps, once the plugins said who is calling)."""

    def parse(self, body: bytes, request_id: str) -> ClientRequest: ...

    async def resolve(self, request: ClientRequest, ctx: RequestContext) -> ClientRequest:
        """The request completed from state the endpoint keeps (e.g. a stored conversation),
        after the plugins' header hook has said who is calling."""
        ...


class EndpointSpec(Parser, Protocol):
    """A registered endpoint (see :mod:`gateway.endpoints`)."""

    @property
    def name(self) -> Endpoint: ...

    @property
    def path(self) -> str:
        """Where it takes its requests (``POST``); its extra routes live under it."""
        ...

    @property
    def id_prefix(self) -> str: ...

    @property
    def errors(self) -> ErrorDialect:
        """How its errors look, on every route under :attr:`path`, before and after headers."""
        ...

    def ping(self) -> bytes | None:
        """The keep-alive event of its streams (None: an SSE comment)."""
        ...

    def routes(self, services: Services) -> Sequence[BaseRoute]:
        """Its routes beyond ``POST path`` (stored objects, token counting)."""
        ...

    async def aclose(self) -> None:
        """Free what it holds (background runs) when the server stops."""
        ...

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> StreamEncoder: ...

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes: ...

    async def background(
        self, request: ClientRequest, ctx: RequestContext, start: Start
    ) -> Response:
        """Answer a checked ``background`` request at once and run it on: ``start`` waits for
        its sequences (the endpoints that set :attr:`ClientRequest.background`)."""
        ...


class OpenAIDialect:
    """The parts of :class:`EndpointSpec` an OpenAI endpoint shares: OpenAI's error body,
    comment pings, no extra routes, nothing to free."""

    @property
    def errors(self) -> ErrorDialect:
        return OPENAI_ERRORS

    def ping(self) -> bytes | None:
        return None

    def routes(self, services: Services) -> Sequence[BaseRoute]:
        return ()

    async def aclose(self) -> None:
        return None


class Stateless(OpenAIDialect):
    """:meth:`EndpointSpec.resolve` and :meth:`EndpointSpec.background` of an endpoint that
    keeps nothing between requests (and never sets ``background``)."""

    @classmethod
    def of(cls, services: Services) -> Self:
        """The endpoint for the registry (:mod:`gateway.endpoints`): it needs no service."""
        return cls()

    async def resolve(self, request: ClientRequest, ctx: RequestContext) -> ClientRequest:
        return request

    async def background(
        self, request: ClientRequest, ctx: RequestContext, start: Start
    ) -> Response:
        raise TypeError(f"{type(self).__name__} runs nothing in the background")
