"""Running the app under uvicorn: one worker, drain on SIGTERM, exit 1 if a model fails to load."""

from __future__ import annotations

import logging
import math
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

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
        **proxy_options(config.server),
    )
    server = _Server(uv_config, services.pool)
    uv_config.app = create_app(config, services, on_load_failed=server.on_load_failed)
    await server.serve()
    return 1 if server.load_failed or not server.started else 0
