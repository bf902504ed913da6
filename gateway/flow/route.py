"""An endpoint as Starlette routes: its ``POST`` (prepare, then stream or collect, however it
ends) and its own extra routes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.disconnect import ClientDisconnected, unless_disconnected
from gateway.errors import GatewayError
from gateway.flow.contract import EndpointSpec, Running, StreamEncoder
from gateway.flow.exchange import Exchange
from gateway.flow.prepare import Checked, check
from gateway.flow.report import report_unadmitted
from gateway.generation import as_gateway_error
from gateway.http import error_response
from gateway.ids import ordered_hex
from gateway.plugins import Outcome, PluginChain, RequestContext
from gateway.services import Services
from gateway.sse import EventStream

log = logging.getLogger("gateway.flow")


def new_context(request: Request, endpoint: EndpointSpec) -> RequestContext:
    request_id = endpoint.id_prefix + ordered_hex()
    request.state.request_id = request_id  # for the unexpected-error handler
    return RequestContext.of(request, request_id, response_headers={"x-request-id": request_id})


async def unadmitted(
    exc: BaseException, plugins: PluginChain, ctx: RequestContext, endpoint: EndpointSpec
) -> Response:
    """The answer to a request that ended before admission, its end hook run however it ended
    (it frees rate limits): a :class:`GatewayError` in the endpoint's shape, a 499 for a client
    that left; a bug or a shutdown is re-raised once reported."""
    if isinstance(exc, GatewayError):
        await report_unadmitted(plugins, ctx, "failed", exc.status, exc)
        return error_response(exc, ctx.response_headers, endpoint.errors)
    if isinstance(exc, ClientDisconnected | ClientDisconnect):
        await report_unadmitted(plugins, ctx, "cancelled", 499)
        return Response(status_code=499)
    outcome: Outcome = "failed" if isinstance(exc, Exception) else "cancelled"
    await report_unadmitted(plugins, ctx, outcome, 500 if outcome == "failed" else 499)
    raise exc


def endpoint_routes(services: Services, endpoint: EndpointSpec) -> Sequence[BaseRoute]:
    """``POST endpoint.path`` on the shared flow, then the endpoint's own routes."""
    main = Route(endpoint.path, _handler(services, endpoint), methods=["POST"])
    return [main, *endpoint.routes(services)]


def _handler(
    services: Services, endpoint: EndpointSpec
) -> Callable[[Request], Awaitable[Response]]:
    server = services.config.server
    plugins = services.plugins

    async def handle(request: Request) -> Response:
        ctx = new_context(request, endpoint)
        try:
            checked = await check(services, ctx, request, endpoint)
            if checked.request.background:
                return await _background(_Starter(services, endpoint, checked, ctx))
            admitted = await checked.admit(request.receive)
        except BaseException as exc:
            return await unadmitted(exc, plugins, ctx, endpoint)
        exchange = Exchange(endpoint, admitted, ctx, plugins, services.pool.drain)
        if not admitted.request.stream:
            try:
                return await unless_disconnected(exchange.collect(), request.receive)
            except ClientDisconnected:
                await exchange.end("cancelled", 499)
                return Response(status_code=499)
        try:
            await unless_disconnected(exchange.open_stream(server.keepalive_s), request.receive)
        except ClientDisconnected:
            await exchange.end("cancelled", 499)
            return Response(status_code=499)
        except Exception as exc:  # before the headers: the error's own status
            error = as_gateway_error(exc, ctx.request_id)
            log.error("request %s failed: %s", ctx.request_id, error.message)
            await exchange.end("failed", error.status, error)
            return error_response(error, ctx.response_headers, endpoint.errors)
        return EventStream(
            exchange.events(),
            exchange,
            request_id=ctx.request_id,
            headers=ctx.response_headers,
            drain=services.pool.drain,
            keepalive_s=server.keepalive_s,
            send_timeout_s=server.send_timeout_s,
            ping=endpoint.ping(),
            errors=endpoint.errors,
        )

    return handle


class _Starter:
    """A background request's admission, for its endpoint to await once it has answered:
    its failure (a full queue, the queue's timeout, a cancel, the shutdown) ends the request
    for the plugins as it would have before the answer."""

    def __init__(
        self, services: Services, endpoint: EndpointSpec, checked: Checked, ctx: RequestContext
    ) -> None:
        self.services, self.endpoint, self.checked, self.ctx = services, endpoint, checked, ctx
        self.called = False

    async def __call__(self, encoder: StreamEncoder) -> Running:
        self.called = True
        plugins, ctx = self.services.plugins, self.ctx
        try:
            admitted = await self.checked.admit()
        except GatewayError as err:
            await report_unadmitted(plugins, ctx, "failed", err.status, err)
            raise
        except BaseException:
            await report_unadmitted(plugins, ctx, "cancelled", 499)
            raise
        drain = self.services.pool.drain
        return Exchange(self.endpoint, admitted, ctx, plugins, drain, encoder)


async def _background(starter: _Starter) -> Response:
    """The endpoint's answer to a background request; the model's lease is released if the
    endpoint failed before it started the run (which then owns it)."""
    try:
        return await starter.endpoint.background(starter.checked.request, starter.ctx, starter)
    except BaseException:
        if not starter.called:
            starter.checked.entry.release()
        raise
