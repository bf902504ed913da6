"""``gateway serve --config FILE --ray ADDRESS``: the gateway as a Ray Serve application."""

from __future__ import annotations

import logging
import signal
import threading

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.ray_serve.config import RayConfig

log = logging.getLogger("gateway.ray_serve")


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``local``: start one on this machine, ``auto``:
    the one running here)."""
    import ray

    ray.init(address=address, log_to_driver=False)


def deploy(config: GatewayConfig, host: str, port: int) -> str:
    """Start Ray Serve's proxy on ``host:port`` (if Serve is not running on the cluster yet)
    and the gateway's application behind it; return its URL once its replicas are up."""
    from ray import serve

    from gateway.ray_serve.deployments import application

    cfg = config.ray or RayConfig()
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config), name=cfg.app_name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def serve_on_ray(config: GatewayConfig, address: str, host: str, port: int) -> int:
    """Run until SIGINT/SIGTERM, then remove the application (its replicas drain first) and,
    for a cluster this started (``local``), stop Ray."""
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("--ray needs Ray Serve: pip install 'llm-gateway[ray]'")
        return 2
    from gateway.ray_serve.deployments import application

    try:
        application(config)  # a config Ray Serve cannot run is refused before joining a cluster
    except ConfigError as err:
        log.error("%s", err)
        return 2
    connect(address)
    cfg = config.ray or RayConfig()
    stop = threading.Event()  # a signal during the deploy stops it once it is up
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(config, host, port)
        log.info("gateway on Ray Serve at %s (application %r)", url, cfg.app_name)
        stop.wait()
    finally:
        serve.delete(cfg.app_name)  # its replicas drain first (also after a failed deploy)
        if address == "local":
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
    return 0
