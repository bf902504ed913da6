"""Running the app under uvicorn: one worker, drain on SIGTERM, exit 1 if a model fails to load."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import math
import os
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
    """uvicorn's h11 protocol with a deadline on each request's line and headers: they must
    arrive whole within ``header_timeout_s`` of the connection's opening, or of the first byte
    of a later request on it (uvicorn's keep-alive timer closes an idle connection, but stops
    at that first byte: a client sending a header a minute held its connection for ever)."""

    header_timeout_s = 10.0
    #: The wait the armed deadline is for (None: none armed since the last response).
    _waiting: object | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._waiting is None:
            self._arm_header_deadline()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._waiting = None  # idle now: the keep-alive timer's; the next byte arms a deadline
        super().on_response_complete()

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


def return_large_frees_to_the_os() -> None:
    """glibc's malloc serves a block over 128 KiB with its own mapping, but raises that
    threshold to the largest such block freed so far, after which blocks up to that size
    come from the heap and stay in the RSS once freed. The server's large blocks are
    transient (a request body, a KV state saved to the tiers: tens of MB) and its RSS grew by
    a quarter after a few long prompts; a fixed threshold returns them on free. Nothing is
    done where ``MALLOC_MMAP_THRESHOLD_`` is set or the C library is not glibc."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 128 * 1024)


async def run_server(
    config: GatewayConfig, host: str | None = None, port: int | None = None
) -> int:
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return_large_frees_to_the_os()
    # --host/--port are the server's address everywhere (e.g. the KV events' topic names it)
    server_cfg = config.server.model_copy(
        update={
            "host": host or config.server.host,
            "port": config.server.port if port is None else port,
        }
    )
    config = dataclasses.replace(config, server=server_cfg)
    services = build_services(config)
    uv_config = uvicorn.Config(
        "gateway:__name__",  # replaced below; uvicorn.Config needs an app
        host=server_cfg.host,
        port=server_cfg.port,
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
