"""The two Ray Serve deployments: the model server (the gateway, engines included) and the
ingress in front of it (see :mod:`gateway.ray_serve`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import RequestRouter
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config as UvicornConfig
from uvicorn.lifespan.on import LifespanOn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.endpoints import endpoints
from gateway.errors import (
    OPENAI_ERRORS,
    ConfigError,
    GatewayError,
    ModelUnavailable,
    PayloadTooLarge,
)
from gateway.http import error_response
from gateway.ray_serve.config import RayConfig
from gateway.ray_serve.forward import Forwarded, Message, read, run
from gateway.ray_serve.router import PrefixRouter, RoundRobinRouter
from gateway.ray_serve.routing import Affinities
from gateway.services import build_services

ROUTERS: dict[str, type[RequestRouter]] = {"prefix": PrefixRouter, "round_robin": RoundRobinRouter}


#: The response header naming the model-server replica that answered.
REPLICA_HEADER = b"x-gateway-replica"


class ModelServer:
    """One replica: the whole gateway (its models, engines, KV cache) behind a handle. It
    takes traffic once its startup models are loaded, and on a scale-down finishes what it
    runs before it unloads them (Ray Serve drains it, then its lifespan ends)."""

    async def __init__(self, config: GatewayConfig) -> None:  # type: ignore[misc]
        self.app = create_app(config)
        self._lifespan = LifespanOn(UvicornConfig(self.app, lifespan="on"))
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError("the gateway failed to start (the replica's log has why)")
        await self.app.state.loading  # a model that fails to load fails the replica
        self.replica = serve.get_replica_context().replica_id.unique_id.encode()

    async def handle(self, key: str | None, request: Forwarded) -> AsyncIterator[Message]:
        """The gateway's answer to ``request``, ASGI message by message (``key`` is for the
        router)."""
        async with contextlib.aclosing(run(self.app, request)) as messages:
            async for message in messages:
                if message["type"] == "http.response.start":  # which replica answered
                    message["headers"] = [
                        *message.get("headers", ()),
                        (REPLICA_HEADER, self.replica),
                    ]
                yield message

    async def check_health(self) -> None:
        pool = self.app.state.services.pool
        failed = [e.name for e in pool.entries.values() if e.engine_failure]
        if failed:
            raise RuntimeError(f"engine failed: {', '.join(failed)}")

    async def __del__(self) -> None:
        await self._lifespan.shutdown()


class Ingress:
    """Every HTTP request from Ray Serve's proxy: its body read once (bounded), its affinity
    key worked out, the model server's answer relayed as it streams. A model server that dies
    before answering is a 503 in the endpoint's error shape (the client may retry); one that
    dies mid-stream ends the stream with the endpoint's error event."""

    def __init__(self, config: GatewayConfig, model_server: DeploymentHandle[Any]) -> None:
        services = build_services(config)
        served = endpoints(services)
        self.limit = config.server.max_body_bytes
        self.dialects = [(e.path, e.errors) for e in served]
        self.affinities = Affinities(served)
        self.model_server = model_server.options(stream=True, method_name="handle")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The ASGI app Ray Serve's proxy sends every HTTP request to."""
        return _App(self)

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read(scope, receive, self.limit)
        if request is None:
            await self._error(scope, send, PayloadTooLarge(f"the body exceeds {self.limit} bytes"))
            return
        route = self.affinities.route(request)
        key = route.key
        started = finished = False
        stream = self.model_server.remote(key, request)
        assert isinstance(stream, DeploymentResponseGenerator)
        try:
            async for message in stream:
                if not started:
                    started = True
                    self.affinities.learn(key, message)
                await send(message)
            finished = True
        except Exception:
            failed = ModelUnavailable("the model server failed; retry the request")
            if not started:
                await self._error(scope, send, failed)
                return
            last = route.stream_error(failed)  # a stream ends with its dialect's error event
            if last is None:
                raise  # the connection ends: the client sees a cut body
            await send({"type": "http.response.body", "body": last, "more_body": False})
            finished = True
        finally:
            if not finished:
                stream.cancel()  # type: ignore[no-untyped-call]  # the replica frees it too

    async def _error(self, scope: Scope, send: Send, error: GatewayError) -> None:
        dialect = next((d for p, d in self.dialects if scope["path"].startswith(p)), OPENAI_ERRORS)
        await error_response(error, {}, dialect)(scope, _no_body, send)


class _App:
    """The ingress as an ASGI 3 app (with a lifespan that has nothing to start)."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.ingress.asgi(scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def application(config: GatewayConfig) -> Application:
    """The gateway as a Ray Serve application, from ``config``'s ``[ray]`` table.

    KV events are refused: every replica would bind the same endpoint and name itself by
    ``[server]``'s address, which is the proxy's, not its own (llm-d routes to pods, not to Ray
    Serve replicas)."""
    publishing = [name for name, m in config.models.items() if m.kv_events is not None]
    if publishing:
        problems = [f"models.{name}.kv_events: not served on Ray Serve" for name in publishing]
        raise ConfigError(config.source, problems)
    ray_cfg = config.ray or RayConfig()
    server = serve.deployment(**_model_server_options(ray_cfg))(ModelServer)
    ingress = serve.deployment(name="Ingress", max_ongoing_requests=100_000)(
        serve.ingress()(Ingress)
    )
    return ingress.bind(config, server.bind(config))


def _model_server_options(cfg: RayConfig) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.resources:
        actor["resources"] = dict(cfg.resources)
    options: dict[str, Any] = {
        "name": "ModelServer",
        "ray_actor_options": actor,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "health_check_period_s": cfg.health_check_period_s,
    }
    if cfg.router in ROUTERS:
        # its constructor is typed as taking a dict, but takes the class (Ray's docs)
        router = RequestRouterConfig(request_router_class=ROUTERS[cfg.router])  # type: ignore[arg-type]
        options["request_router_config"] = router
    if cfg.autoscaling is None:
        options["num_replicas"] = cfg.num_replicas or 1
    else:
        a = cfg.autoscaling
        scaling = a.model_dump(exclude_none=True)
        with warnings.catch_warnings():  # metrics_interval_s: Ray 2.60 deprecates it, yet
            warnings.simplefilter("ignore", DeprecationWarning)  # it is the only knob there
            options["autoscaling_config"] = AutoscalingConfig(**scaling)
    return options
