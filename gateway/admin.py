"""``/admin/``: load and unload models by hand, reload config.toml, see what is resident.

Who may call: the authentication plugins' header hooks run first (an API key plugin answers
401 for a missing or wrong key). A caller they authenticated (``ctx.principal`` set) passes only
if they marked it ``ctx.admin`` (e.g. a key with ``admin = true``); with no authentication
plugin, only loopback clients pass, and only when the request is what a program on this host
sends, not what a web page or a proxy makes of it: its ``Host`` names this host (a loopback
address, ``localhost`` or ``[server].host``: a DNS-rebound name does not), an ``Origin`` it
carries is that same host (a cross-site form post from a page in a browser carries the page's),
and it carries no ``X-Forwarded-For``/``Forwarded``/``X-Real-IP`` (a proxy on this host would
make every client look local). Who the client is comes from the connection; uvicorn reads
``X-Forwarded-For`` only from the ``[server].trusted_proxies``.

- ``GET /admin/models``: every model's state, leases, queue, footprint, KV tiers' use; the
  budget in use.
- ``POST /admin/models/{model}/load``: load now (200 once loaded; 503 if it fails).
- ``POST /admin/models/{model}/unload``: unload after its running requests (409 if they run
  past ``[lifecycle].drain_timeout_s``; nothing is cut off).
- ``POST /admin/reload``: read the config file again, validate it (400 listing the problems,
  nothing changed), apply its models, ``[lifecycle]`` and the plugin tables whose plugin can
  change in place (``api_keys``: keys added, removed, re-read from their env/file, their models
  and limits; ``rate_limit``: default limits); other ``[server]`` and plugin changes are
  reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.backend import EngineStats, HasCacheTiers, HasStats
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError, InvalidRequest, PermissionDenied
from gateway.lifecycle import NoRoom
from gateway.plugins import RequestContext
from gateway.pool import ModelEntry
from gateway.services import Services

log = logging.getLogger("gateway.admin")

Handler = Callable[[Request], Awaitable[Response]]


class ModelBusy(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "model_busy"


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


#: Headers a proxy adds to say whom it forwards for.
_FORWARDING = ("x-forwarded-for", "forwarded", "x-real-ip")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ANY_HOST = frozenset({"", "0.0.0.0", "::", "[::]"})


def _host_name(netloc: str) -> str:
    """``"127.0.0.1:8000"`` -> ``"127.0.0.1"``, ``"[::1]:80"`` -> ``"::1"`` (lowercased)."""
    try:
        return (urlsplit("//" + netloc).hostname or "").lower()
    except ValueError:
        return ""


def _is_this_host(name: str, server_host: str) -> bool:
    """A name a request to this host on loopback may carry in ``Host``."""
    if is_loopback(name) or name.endswith(".localhost"):
        return True
    return server_host.lower() not in _ANY_HOST and name == server_host.lower().strip("[]")


def _origin_of(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    return (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether ``Origin`` names the host the request was sent to (its ``Host``)."""
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file), or not a web origin at all
    return _origin_of(parts.netloc, parts.scheme) == _origin_of(host, scheme)


def _local_refusal(request: Request, server_host: str) -> str | None:
    """Why a loopback request without a key is not one from a program on this host."""
    headers = request.headers
    forwarded = next((h for h in _FORWARDING if h in headers), None)
    if forwarded is not None:
        return f"it came through a proxy ({forwarded})"
    host = headers.get("host")
    if host is not None and not _is_this_host(_host_name(host), server_host):
        return f"its Host {host[:64]!r} is not this host"
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, host or "", request.url.scheme):
        return f"it was sent from another origin ({origin[:64]!r})"
    if headers.get("sec-fetch-site") == "cross-site":
        return "it was sent from another site"
    return None


async def authorize(services: Services, request: Request) -> None:
    """Raise unless the caller may use ``/admin/`` (see the module docstring)."""
    ctx = RequestContext.of(request, "admin-" + uuid.uuid4().hex)
    await services.plugins.on_request_headers(ctx)
    if ctx.principal is not None:
        if not ctx.admin:
            raise PermissionDenied(
                f"API key {ctx.principal!r} is not an admin key", code="admin_key_required"
            )
        return
    if not is_loopback(ctx.client_host):
        raise PermissionDenied(
            "/admin/ is served to loopback clients only (configure an API key with "
            "admin = true to use it from elsewhere)",
            code="admin_loopback_only",
        )
    refusal = _local_refusal(request, services.config.server.host)
    if refusal is not None:
        raise PermissionDenied(
            f"/admin/ without an API key is served to programs on this host only, and {refusal} "
            "(configure an API key with admin = true to use it from elsewhere)",
            code="admin_local_only",
        )


def _guarded(services: Services, handler: Handler) -> Handler:
    async def guarded(request: Request) -> Response:
        await authorize(services, request)
        return await handler(request)

    return guarded


def describe(entry: ModelEntry) -> dict[str, object]:
    backend = entry.backend
    footprint = asdict(entry.footprint) if entry.footprint is not None else None
    if footprint is not None:
        footprint.pop("options", None)
    return {
        "id": entry.name,
        "backend": entry.config.backend,
        "state": entry.status,
        "retired": entry.retired,
        "load": entry.config.load,
        "leases": entry.leases,
        "active_sequences": entry.admission.active,
        "queued": entry.admission.queued,
        "loads": entry.loads,
        "load_seconds": entry.load_seconds,
        "idle_s": round(time.monotonic() - entry.last_used, 3),
        "idle_unload_after_s": entry.config.idle_unload_after_s,
        "footprint": footprint,
        "kv_tiers": backend.cache_tiers() if isinstance(backend, HasCacheTiers) else None,
        "engine": _engine(backend.stats()) if isinstance(backend, HasStats) else None,
        "download": entry.download.as_json() if entry.download is not None else None,
        "error": entry.error or entry.engine_failure,
    }


def _engine(stats: EngineStats) -> dict[str, object]:
    """The engine's counters an operator reads first; speculative decoding's acceptance (the
    share of drafted tokens the model took; None before any draft)."""
    drafted = stats.draft_tokens
    return {
        "active_sequences": stats.active_sequences,
        "queued_sequences": stats.queued_sequences,
        "tokens_generated": stats.tokens_generated,
        "decode_steps": stats.decode_steps,
        "kv_cells_used": stats.kv_cells_used,
        "kv_cells_total": stats.kv_cells_total,
        "draft_tokens": drafted,
        "draft_accepted": stats.draft_accepted,
        "draft_acceptance": round(stats.draft_accepted / drafted, 4) if drafted else None,
    }


def _budget(services: Services) -> dict[str, object]:
    lifecycle = services.pool.lifecycle
    budget = lifecycle.budget
    prints = [e.footprint for e in lifecycle.resident if e.footprint is not None]
    devices = len(budget.gpu_bytes)
    return {
        "gpu_memory_bytes": list(budget.gpu_bytes),
        "host_memory_bytes": budget.host_bytes,
        "max_loaded_models": budget.max_models,
        "drain_timeout_s": lifecycle.config.drain_timeout_s,
        "gpu_used_bytes": [
            sum(f.gpu_bytes[d] for f in prints if d < len(f.gpu_bytes)) for d in range(devices)
        ],
        "host_used_bytes": sum(f.host_bytes + sum(f.gpu_bytes[devices:]) for f in prints),
        "resident_models": len(lifecycle.resident),
    }


def _server_changes(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    return [
        f"server.{k}"
        for k in type(running.server).model_fields
        if getattr(running.server, k) != getattr(new.server, k)
    ]


def admin_routes(services: Services) -> list[BaseRoute]:
    pool = services.pool
    reloading = asyncio.Lock()

    async def list_models(request: Request) -> Response:
        entries = list(pool.entries.values())
        entries += [e for e in pool.lifecycle.resident if e.retired]
        data = [describe(e) for e in entries]
        return JSONResponse({"object": "list", "data": data, "budget": _budget(services)})

    async def load(request: Request) -> Response:
        entry = pool.resolve(request.path_params["model_id"])
        await entry.ensure_loaded()
        return JSONResponse(describe(entry))

    async def unload(request: Request) -> Response:
        entry = pool.resolve(request.path_params["model_id"])
        try:
            await pool.lifecycle.unload(entry)
        except NoRoom as err:
            raise ModelBusy(str(err)) from None
        return JSONResponse(describe(entry))

    async def reload(request: Request) -> Response:
        source = Path(pool.config.source)
        if not await asyncio.to_thread(source.is_file):
            raise InvalidRequest(
                f"the server runs {pool.config.source}, not a config file: nothing to reload",
                code="no_config_file",
            )
        async with reloading:
            try:
                config = await asyncio.to_thread(load_config, source)
                plugins = services.plugins.plan_reload(config)
            except ConfigError as err:
                log.error("config reload rejected: %s", err)
                raise InvalidRequest(str(err), code="invalid_config") from None
            report = pool.reconfigure(config)
            plugins.apply()
        restart = _server_changes(services.config, config) + plugins.restart_required
        log.info(
            "config reloaded from %s: %s; plugins reloaded: %s; restart needed for %s",
            source, report, plugins.reloaded, restart,
        )  # fmt: skip
        body = {**asdict(report), "plugins_reloaded": plugins.reloaded, "restart_required": restart}
        return JSONResponse(body)

    return [
        Route("/admin/models", _guarded(services, list_models), methods=["GET"]),
        Route("/admin/models/{model_id:path}/load", _guarded(services, load), methods=["POST"]),
        Route("/admin/models/{model_id:path}/unload", _guarded(services, unload), methods=["POST"]),
        Route("/admin/reload", _guarded(services, reload), methods=["POST"]),
    ]
