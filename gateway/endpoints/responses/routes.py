"""The stored responses' routes: ``GET``/``DELETE /v1/responses/{id}``, its
``input_items``, ``cancel``, and ``POST /v1/responses/input_tokens``. Each runs the plugins'
header hook (API keys): a response belongs to the key that made it, and is a 404 to others.
Two gateway extensions serve the chat page's conversations: ``GET /v1/responses`` lists the
caller's own stored responses (newest first, each with its ``root`` and its ``input_items``),
``POST /v1/responses/{id}`` replaces a finished response's ``metadata``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from gateway.endpoints.responses.background import BackgroundRuns
from gateway.endpoints.responses.convert import responses_request
from gateway.endpoints.responses.wire import InputTokensRequest, ResponseUpdate
from gateway.errors import InvalidRequest, NotFound
from gateway.flow.contract import EndpointSpec, Parser
from gateway.flow.count import count_route
from gateway.plugins import RequestContext
from gateway.services import Services
from gateway.store import StoredResponse
from gateway.types import ClientRequest
from gateway.wire.convert import parse_body
from gateway.wire.responses import dumps

MAX_PAGE = 100
#: A response still being written (by a background run, which stores it as it goes).
RUNNING = ("queued", "in_progress")


class InputTokens:
    """``/v1/responses/input_tokens``: its body read as the response it would create."""

    def __init__(self, endpoint: Parser) -> None:
        self.endpoint = endpoint

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        wire = parse_body(InputTokensRequest, body)
        raw = wire.model_dump_json(by_alias=True, exclude_none=True).encode()
        return responses_request(raw, request_id)

    async def resolve(self, request: ClientRequest, ctx: RequestContext) -> ClientRequest:
        return await self.endpoint.resolve(request, ctx)


def _input_tokens(count: int) -> dict[str, object]:
    return {"object": "response.input_tokens", "input_tokens": count}


def responses_routes(
    services: Services, endpoint: EndpointSpec, runs: BackgroundRuns
) -> list[BaseRoute]:
    store = services.store

    async def caller(request: Request) -> RequestContext:
        ctx = RequestContext.of(request, "resp-" + uuid.uuid4().hex)
        await services.plugins.on_request_headers(ctx)
        return ctx

    async def owned(request: Request) -> tuple[RequestContext, StoredResponse]:
        ctx = await caller(request)
        response_id = request.path_params["response_id"]
        record = await store.get(response_id)
        if record is None or record.owner != ctx.principal:
            raise NotFound(f"Response with id {response_id[:64]!r} not found.", param="response_id")
        return ctx, record

    async def retrieve(request: Request) -> Response:
        _, record = await owned(request)
        if request.query_params.get("stream", "false").lower() != "true":
            return Response(record.response, media_type="application/json")
        run = runs.get(record.id)
        if run is None:
            raise InvalidRequest(
                "only a background response of this server can be streamed again",
                param="stream",
            )
        after = _int(request.query_params.get("starting_after", "-1"), "starting_after")
        return StreamingResponse(run.follow(after), media_type="text/event-stream")

    async def listing(request: Request) -> Response:
        """The caller's stored responses (never another key's), newest first."""
        ctx = await caller(request)
        query = request.query_params
        limit = _int(query.get("limit", "20"), "limit")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}", param="limit")
        records = await store.owned(ctx.principal, limit + 1, query.get("after"))
        data = [
            {
                **json.loads(r.response),
                "root": r.root or r.id,
                "input_items": json.loads(r.input_items),
            }
            for r in records[:limit]
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(records) > limit,
            }
        )

    async def update(request: Request) -> Response:
        """A finished response's ``metadata``, replaced."""
        _, record = await owned(request)
        wire = parse_body(ResponseUpdate, await request.body())
        response = json.loads(record.response)
        if response.get("status") in RUNNING:
            raise InvalidRequest(
                "A response can be updated once it has finished.", param="response_id"
            )
        response["metadata"] = wire.metadata
        await store.put(replace(record, response=dumps(response)))
        return Response(dumps(response), media_type="application/json")

    async def delete(request: Request) -> Response:
        _, record = await owned(request)
        await store.delete(record.id)
        return JSONResponse({"id": record.id, "object": "response.deleted", "deleted": True})

    async def input_items(request: Request) -> Response:
        _, record = await owned(request)
        return JSONResponse(page(json.loads(record.input_items), request.query_params))

    async def cancel(request: Request) -> Response:
        _, record = await owned(request)
        if json.loads(record.response).get("background") is not True:
            raise InvalidRequest("Only background responses can be cancelled.", param="response_id")
        await runs.cancel(record.id)  # a finished one stays as it is, as on OpenAI
        again = await store.get(record.id)
        return Response((again or record).response, media_type="application/json")

    return [
        count_route(
            services, endpoint, "/v1/responses/input_tokens", InputTokens(endpoint), _input_tokens
        ),
        Route("/v1/responses", listing, methods=["GET"]),
        Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", update, methods=["POST"]),
        Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
    ]


def _int(text: str, param: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(f"'{param}' must be an integer", param=param) from None


def page(items: list[dict[str, object]], query: Mapping[str, str]) -> dict[str, object]:
    """One page of a list, as OpenAI pages them: ``order`` (``desc`` by default), ``after``
    (an item id), ``limit`` (1..100, default 20)."""
    get = query.get
    order = get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    limit = _int(get("limit", "20"), "limit")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}", param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = get("after")
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise InvalidRequest(f"no item with id {after[:64]!r} in this list", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": len(ordered) > limit,
    }


__all__ = ["responses_routes"]
