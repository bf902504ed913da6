"""``POST /v1/responses``: OpenAI's Responses API, streamed and not, stored for
``previous_response_id`` (:mod:`gateway.store`). The items in, the events out, the tools and
the stored records each have their module here; the request flow is the shared one."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute

from gateway.endpoints.responses.background import BackgroundRuns
from gateway.endpoints.responses.convert import (
    ResponsesState,
    responses_request,
    state_of,
    with_history,
    with_referenced,
)
from gateway.endpoints.responses.events import ResponsesStreamEncoder
from gateway.endpoints.responses.objects import items_of, response_object, status_of, usage_json
from gateway.endpoints.responses.records import record_of
from gateway.endpoints.responses.routes import responses_routes
from gateway.errors import InvalidRequest
from gateway.flow.contract import OpenAIDialect, Result, Start
from gateway.plugins import RequestContext
from gateway.services import Services
from gateway.store import ResponseStore, StoredResponse
from gateway.types import ClientRequest, Endpoint
from gateway.wire.responses import dumps

log = logging.getLogger("gateway.responses")


def _context(record: StoredResponse) -> list[object]:
    context = json.loads(record.context)
    return context if isinstance(context, list) else []


def _item(context: list[object], item_id: str) -> dict[str, object] | None:
    return next((i for i in context if isinstance(i, dict) and i.get("id") == item_id), None)


class PreviousResponseNotFound(InvalidRequest):
    default_code = "previous_response_not_found"


@dataclass(frozen=True)
class ResponsesEndpoint(OpenAIDialect):
    store: ResponseStore
    runs: BackgroundRuns = field(default_factory=BackgroundRuns)
    name: Endpoint = "responses"
    path: str = "/v1/responses"
    id_prefix: str = "resp_"

    @classmethod
    def of(cls, services: Services) -> ResponsesEndpoint:
        return cls(services.store, BackgroundRuns(drain=services.pool.drain))

    def routes(self, services: Services) -> Sequence[BaseRoute]:
        return responses_routes(services, self, self.runs)

    async def aclose(self) -> None:
        await self.runs.aclose()

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return responses_request(body, request_id)

    async def resolve(self, request: ClientRequest, ctx: RequestContext) -> ClientRequest:
        """The caller's stored conversation before this request's input."""
        state = replace(state_of(request), owner=ctx.principal)
        request = replace(request, endpoint_state=state)
        if state.references:
            request = with_referenced(request, await self._referenced(state))
        previous = state.previous_response_id
        if previous is None:
            return request
        record = await self.store.get(previous)
        if record is None or record.owner != ctx.principal:
            raise PreviousResponseNotFound(
                f"Previous response with id {previous[:64]!r} not found.",
                param="previous_response_id",
            )
        return with_history(request, json.loads(record.context), record.root or record.id)

    async def _referenced(self, state: ResponsesState) -> dict[int, dict[str, object]]:
        """The stored items the ``item_reference`` entries name (the caller's only), by place:
        each distinct id looked up once, each record read and parsed once."""
        items: dict[str, dict[str, object] | None] = {}
        contexts: dict[str, list[object]] = {}
        found: dict[int, dict[str, object]] = {}
        for i in state.references:
            item_id = state.pending_input[i]["id"]
            assert isinstance(item_id, str)
            if item_id not in items:
                record = await self.store.find_item(state.owner, item_id)
                if record is not None and record.owner == state.owner:
                    if record.id not in contexts:
                        contexts[record.id] = _context(record)
                    items[item_id] = _item(contexts[record.id], item_id)
                else:
                    items[item_id] = None
            item = items[item_id]
            if item is None:
                raise InvalidRequest(
                    f"Item with id {item_id[:64]!r} not found.", param=f"input[{i}].id"
                )
            found[i] = item
        return found

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> ResponsesStreamEncoder:
        return ResponsesStreamEncoder(request, response_id, created, self.keep)

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        state = state_of(request)
        choice = result.choice(0)
        status, incomplete = status_of(choice.finish_reason)
        output = items_of(state, choice.segments)
        response = response_object(
            state, response_id=response_id, created=created, model=request.model,
            status=status, output=output, usage=usage_json(result.usage, choice.reasoning_tokens),
            incomplete=incomplete, completed_at=int(time.time()),
        )  # fmt: skip
        await self.keep(state, response)
        return dumps(response).encode()

    async def background(
        self, request: ClientRequest, ctx: RequestContext, start: Start
    ) -> Response:
        """Store the response as ``queued``, run it on (queue, then generation), answer at
        once: its object, or with ``stream`` its events (which a disconnect no longer stops)."""
        encoder = self.stream_encoder(request, ctx.request_id, int(time.time()))
        state = encoder.state
        snapshot = encoder.snapshot("queued")
        await self.keep(state, snapshot)

        async def stored(response: dict[str, object]) -> None:
            await self.keep(state, response)

        run = self.runs.start(encoder, start, stored)
        headers = ctx.response_headers
        if request.stream:
            events = run.follow(-1)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return Response(dumps(snapshot), media_type="application/json", headers=headers)

    async def keep(self, state: ResponsesState, response: dict[str, object]) -> None:
        """Store a finished response (``store``, the default) before the client sees it end,
        so its id works at once as the next ``previous_response_id``. A store that fails
        (a full or read-only disk, Redis down) does not fail the response: it is logged and
        the response says ``"store": false``, which is then the truth."""
        if not state.store:
            return
        try:
            await self.store.put(record_of(state, response))
        except Exception as err:  # sqlite3, OS and Redis errors alike
            log.error("could not store response %s: %s", response.get("id"), err)
            response["store"] = False


__all__ = ["ResponsesEndpoint"]
