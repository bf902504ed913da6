"""Running the app under uvicorn: one worker, drain on SIGTERM, exit 1 if a model fails to load."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.app import create_app
from gateway.config import GatewayConfig, ServerConfig
from gateway.pool import ModelPool
from gateway.services import build_services

log = logging.getLogger("gateway.server")


def proxy_options(server: ServerConfig) -> dict[str, Any]:
    """uvicorn's options for ``X-Forwarded-For``: read only from ``[server].trusted_proxies``
    (uvicorn's own default trusts 127.0.0.1, so a proxy on this host, or anyone who can reach
    the port from it, would decide who the client is)."""
    trusted = list(server.trusted_proxies)
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or ""}


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's line and headers: a
    connection that has not sent them whole within ``header_timeout_s`` of opening, or of its
    last response's end, is closed (uvicorn's own keep-alive timer stops at the first byte, so
    a client sending a header a minute held its connection for ever)."""

    header_timeout_s = 10.0
    _waiting: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._waiting = wait = object()
        self.loop.call_later(self.header_timeout_s, self._header_deadline, wait)

    def _header_deadline(self, wait: object) -> None:
        """Close the connection if it still waits for the same request's headers."""
        idle = self.conn.their_state is h11.IDLE
        if wait is self._waiting and idle and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """uvicorn's options for ``[server]``: who may set ``X-Forwarded-For``, and the bounds on
    what a connection may hold (headers' size and time, idle keep-alive, how many at once)."""
    protocol = type(
        "GatewayH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": server.header_timeout_s}
    )
    return {
        **proxy_options(server),
        "http": protocol,
        "timeout_keep_alive": server.idle_timeout_s,
        "limit_concurrency": server.max_connections,
        "h11_max_incomplete_event_size": server.max_header_bytes,
    }


class _Server(uvicorn.Server):
    """Starts the pool's drain (``/ready`` 503) the moment a shutdown signal arrives.

    A drained shutdown is a clean exit (code 0): unlike uvicorn's own handler this one does not
    record the signal, so uvicorn does not re-raise it (which would kill the process with it).
    A second Ctrl+C still forces the exit.
    """

    def __init__(self, config: uvicorn.Config, pool: ModelPool) -> None:
        super().__init__(config)
        self.pool = pool
        self.load_failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.pool.drain.start()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    def on_load_failed(self, err: BaseException) -> None:
        print(f"error: {err}", file=sys.stderr)
        self.load_failed = True
        self.should_exit = True


async def run_server(
    config: GatewayConfig, host: str | None = None, port: int | None = None
) -> int:
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    services = build_services(config)
    uv_config = uvicorn.Config(
        "gateway:__name__",  # replaced below; uvicorn.Config needs an app
        host=host or config.server.host,
        port=config.server.port if port is None else port,
        workers=1,
        log_level=config.server.log_level,
        # the drain deadline ends every stream (gateway.drain); this is the backstop after it
        timeout_graceful_shutdown=math.ceil(config.server.drain_timeout_s) + 2,
        lifespan="on",
        **uvicorn_options(config.server),
    )
    server = _Server(uv_config, services.pool)
    uv_config.app = create_app(config, services, on_load_failed=server.on_load_failed)
    await server.serve()
    return 1 if server.load_failed or not server.started else 0
