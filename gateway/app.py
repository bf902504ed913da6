"""The Starlette application: routes, plugins, CORS, error mapping and the model pool's lifetime."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.admin import admin_routes
from gateway.capabilities import model_capabilities
from gateway.config import GatewayConfig
from gateway.endpoints import endpoints
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
)
from gateway.flow.route import endpoint_routes
from gateway.http import (
    ErrorDialects,
    UnexpectedErrors,
    dialect_of,
    error_response,
    gateway_error_handler,
)
from gateway.plugins import RequestContext
from gateway.pool import ModelPool
from gateway.services import Services, build_services
from gateway.wire.responses import model_json, model_list

log = logging.getLogger("gateway.app")


def _models_routes(services: Services) -> list[BaseRoute]:
    """``/v1/models``: behind the authentication plugins, like the completion endpoints; a
    caller limited to some models (``ctx.models``) sees only those."""
    pool = services.pool

    def describe(model_id: str) -> dict[str, object]:
        entry = pool.resolve(model_id)
        context = entry.backend.info.context_length if entry.loaded else None
        capabilities = model_capabilities(entry.backend, entry.loaded)
        return model_json(
            model_id,
            entry.created,
            entry.config.backend,
            entry.status,
            context,
            load=entry.config.load,
            capabilities=capabilities.as_json(),
        )

    async def caller(request: Request) -> RequestContext:
        ctx = RequestContext.of(request, "models-" + uuid.uuid4().hex)
        await services.plugins.on_request_headers(ctx)
        return ctx

    async def list_models(request: Request) -> Response:
        allowed = (await caller(request)).models
        data = [
            describe(model_id)
            for model_id, entry in pool.names()
            if allowed is None or entry.name in allowed
        ]
        return JSONResponse(model_list(data))

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        ctx = await caller(request)
        entry = pool.resolve(model_id)
        if ctx.models is not None and entry.name not in ctx.models:
            raise PermissionDenied(
                f"API key {ctx.principal!r} may not use model {model_id!r}", param="model"
            )
        return JSONResponse(describe(model_id))

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    ]


def _health_routes(pool: ModelPool) -> list[BaseRoute]:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        states = {name: entry.status for name, entry in pool.entries.items()}
        if pool.ready:
            return JSONResponse({"status": "ready", "models": states})
        status = "draining" if pool.draining else "loading"
        return JSONResponse({"status": status, "models": states}, status_code=503)

    return [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    dialect = dialect_of(request.scope)
    if exc.status_code == 404:
        error: GatewayError = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"method {request.method} not allowed here")
    else:
        error = InvalidRequest(str(exc.detail))
    return error_response(error, dialect=dialect)


def create_app(
    config: GatewayConfig,
    services: Services | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The ASGI app. Models with ``load = "startup"`` load in the background; ``/ready`` tells.

    ``on_load_failed`` is called if a startup model fails to load (the CLI exits then).
    """
    services = services or build_services(config)
    served = endpoints(services)

    def loaded(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and on_load_failed:
            on_load_failed(task.exception())  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.plugins.startup()
        app.state.loading = asyncio.create_task(services.pool.start(), name="load startup models")
        app.state.loading.add_done_callback(loaded)
        try:
            yield
        finally:
            services.pool.drain.start()
            app.state.loading.cancel()
            await asyncio.gather(app.state.loading, return_exceptions=True)
            for endpoint in served:
                await endpoint.aclose()
            await services.plugins.shutdown()
            await services.pool.aclose()
            await services.store.aclose()

    routes: list[BaseRoute] = [
        *(route for endpoint in served for route in endpoint_routes(services, endpoint)),
        *_models_routes(services),
        *_health_routes(services.pool),
        *admin_routes(services),
        *services.plugins.routes(),
    ]
    dialects = [(endpoint.path, endpoint.errors) for endpoint in served]
    middleware = [Middleware(ErrorDialects, prefixes=dialects)]
    if config.server.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.server.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "retry-after"],
            )
        )
    middleware.append(Middleware(UnexpectedErrors))  # inside CORS: its 500 gets CORS headers
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, GatewayError: gateway_error_handler},
    )
    app.state.services = services
    return app
