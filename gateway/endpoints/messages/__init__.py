"""``POST /v1/messages``: Anthropic's Messages API (the anthropic SDK, Claude Code), streamed
and not, on the shared request flow, with ``/v1/messages/count_tokens`` and Anthropic's error
shape on every route under it. The body, the events, the conversion and the errors each have
their module here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.endpoints.messages.convert import parse_count, parse_messages, state_of
from gateway.endpoints.messages.errors import ANTHROPIC_ERRORS
from gateway.endpoints.messages.events import PING, MessagesStreamEncoder
from gateway.endpoints.messages.objects import block_json, message_json, shown
from gateway.errors import ErrorDialect
from gateway.flow.contract import Result, Start
from gateway.flow.count import count_route
from gateway.plugins import RequestContext
from gateway.services import Services
from gateway.types import ClientRequest, Endpoint
from gateway.wire.responses import dumps

#: Claude Code's conversation id: what keeps a conversation on one replica of a fleet.
SESSION_HEADER = "x-claude-code-session-id"


class _Resolve:
    """Completes a parsed request with what only the HTTP request knows (the session)."""

    async def resolve(self, request: ClientRequest, ctx: RequestContext) -> ClientRequest:
        session = ctx.headers.get(SESSION_HEADER)
        if not session or not request.generations:
            return request
        generations = tuple(replace(g, affinity=session[:256]) for g in request.generations)
        return replace(request, generations=generations)


class _CountTokens(_Resolve):
    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return parse_count(body, request_id)


def _count(tokens: int) -> dict[str, object]:
    return {"input_tokens": tokens}


@dataclass(frozen=True)
class MessagesEndpoint(_Resolve):
    name: Endpoint = "messages"
    path: str = "/v1/messages"
    id_prefix: str = "msg_"

    @classmethod
    def of(cls, services: Services) -> MessagesEndpoint:
        return cls()

    @property
    def errors(self) -> ErrorDialect:
        return ANTHROPIC_ERRORS

    def ping(self) -> bytes | None:
        return PING

    def routes(self, services: Services) -> Sequence[BaseRoute]:
        path = f"{self.path}/count_tokens"
        return [count_route(services, self, path, _CountTokens(), _count)]

    async def aclose(self) -> None:
        return None

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return parse_messages(body, request_id)

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> MessagesStreamEncoder:
        return MessagesStreamEncoder(request, response_id, state_of(request).thinking)

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        segments = result.choice(0).segments
        blocks = shown(segments.blocks, state_of(request).thinking)
        content = [block_json(b) for b in blocks]
        message = message_json(response_id, request.model, content, segments.finish, result.usage)
        return dumps(message).encode()

    async def background(
        self, request: ClientRequest, ctx: RequestContext, start: Start
    ) -> Response:
        raise TypeError("messages are never run in the background")


__all__ = ["SESSION_HEADER", "MessagesEndpoint"]
