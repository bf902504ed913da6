"""The plugin seam: typed async hooks run in the order config.toml lists the plugins.

A plugin package registers a :class:`PluginFactory` under the entry-point group
``gateway.plugins``. Hooks reject a request by raising a :class:`gateway.errors.GatewayError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from starlette.routing import BaseRoute

from gateway import registry
from gateway.config import GatewayConfig, PluginConfig
from gateway.errors import GatewayError
from gateway.types import ClientRequest, Usage

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.pool import ModelPool

log = logging.getLogger("gateway.plugins")

Outcome = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Limits an authentication plugin grants the caller, for a rate-limit plugin to enforce.

    ``None``: the key sets no limit of that kind (the rate-limit plugin's default applies);
    ``0``: explicitly unlimited.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass
class RequestContext:
    """What plugins see of one HTTP request; they may add response headers."""

    request_id: str
    path: str
    headers: Mapping[str, str]
    client_host: str | None
    started: float = field(default_factory=time.perf_counter)
    response_headers: dict[str, str] = field(default_factory=dict)
    #: Who is calling, set by an authentication plugin (e.g. the API key's name).
    principal: str | None = None
    #: The caller's limits, set by an authentication plugin (e.g. from the API key's entry).
    limits: RateLimits | None = None
    #: Whether the caller may use ``/admin/``, set by an authentication plugin (an admin key).
    #: Once a plugin has set ``principal``, only ``admin`` callers pass; with no authentication
    #: plugin, ``/admin/`` is served to loopback clients only.
    admin: bool = False
    #: The configured model names the caller may use, set by an authentication plugin; ``None``:
    #: every model. ``/v1/models`` lists only these; requests for others are refused.
    models: frozenset[str] | None = None
    #: The caller's prefix-cache partition, set by an authentication plugin (a secret per API
    #: key): mixed into each generation's ``cache_salt``, so no key reuses, or learns the
    #: length of, a prefix another key's prompt left in the cache.
    cache_salt: str | None = None
    #: The model as configured (not the alias), once resolved.
    model: str | None = None
    request: ClientRequest | None = None

    @classmethod
    def of(cls, request: Request, request_id: str, **fields: Any) -> RequestContext:
        """The context of an HTTP request, before any plugin has run."""
        client = request.client.host if request.client else None
        return cls(request_id, request.url.path, request.headers, client, **fields)


@dataclass(frozen=True)
class ResponseEnd:
    """How a request ended, for the ``on_response_end`` hook."""

    outcome: Outcome
    status: int
    usage: Usage
    duration_s: float
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    error: GatewayError | None = None
    #: Seconds between consecutive tokens of each choice (one value per token after a choice's
    #: first), for inter-token latency histograms. Empty when nothing was generated.
    inter_token_s: Sequence[float] = ()


class Plugin:
    """Base class with no-op hooks; override what you need."""

    async def startup(self) -> None:
        """Called once when the server starts."""

    async def shutdown(self) -> None:
        """Called once when the server stops."""

    async def on_request_headers(self, ctx: RequestContext) -> None:
        """Before the body is read (API keys)."""

    async def on_request(self, ctx: RequestContext, request: ClientRequest) -> None:
        """After parsing and model lookup, before admission (per-model rules, rate limits)."""

    async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
        """After the last byte, or after the failure or the client's departure."""

    def routes(self) -> Sequence[BaseRoute]:
        return ()

    def prepare_reconfigure(
        self, config: PluginConfig, gateway: GatewayConfig
    ) -> Callable[[], None] | None:
        """A config reload changed this plugin's table: check it (raise
        :class:`gateway.errors.ConfigError` if it cannot apply, and nothing changes) and return
        what applies it in place, or ``None`` if the change needs a restart (the default)."""
        return None


class PluginFactory(Protocol):
    config_type: type[PluginConfig]

    def create(self, config: PluginConfig, pool: ModelPool) -> Plugin: ...


def plugin_factory(name: str) -> PluginFactory:
    """The factory registered as ``name`` in ``gateway.plugins`` (``LookupError`` if none)."""
    return cast(PluginFactory, registry.load(registry.PLUGINS_GROUP, "plugin", name))


@dataclass
class PluginReload:
    """What a config reload does to the plugins: ``apply`` them once the rest has applied."""

    applies: list[Callable[[], None]] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    def apply(self) -> None:
        for apply in self.applies:
            apply()


class PluginChain:
    """Runs every plugin's hook in configured order.

    ``named`` (plugin name -> instance) and ``configs`` (every plugin table, enabled or not, as
    it runs now) let a config reload apply a changed table in place where the plugin can.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin],
        *,
        named: Mapping[str, Plugin] | None = None,
        configs: Mapping[str, PluginConfig] | None = None,
    ) -> None:
        self.plugins = tuple(plugins)
        self._named = dict(named or {})
        self.configs = dict(configs or {})

    def plan_reload(self, gateway: GatewayConfig) -> PluginReload:
        """Check every plugin table of a new config against it (a ConfigError leaves everything
        as it was). Unchanged tables are checked too: the models they name may have changed.
        Adding, removing, enabling or disabling a plugin needs a restart."""
        plan = PluginReload()
        for name in sorted(set(self.configs) | set(gateway.plugins)):
            old, new = self.configs.get(name), gateway.plugins.get(name)
            plugin = self._named.get(name)
            apply = None
            if plugin is not None and new is not None and new.enabled:
                apply = plugin.prepare_reconfigure(new, gateway)
            if new is not None and apply is not None:
                plan.applies.append(self._applier(name, new, apply, changed=old != new))
            if old == new:
                continue
            if apply is None:
                plan.restart_required.append(f"plugins.{name}")
            else:
                plan.reloaded.append(name)
        return plan

    def _applier(
        self, name: str, config: PluginConfig, apply: Callable[[], None], *, changed: bool
    ) -> Callable[[], None]:
        def run() -> None:
            apply()
            self.configs[name] = config
            if changed:
                log.info("plugin %s reconfigured", name)

        return run

    async def on_request_headers(self, ctx: RequestContext) -> None:
        for p in self.plugins:
            await p.on_request_headers(ctx)

    async def on_request(self, ctx: RequestContext, request: ClientRequest) -> None:
        for p in self.plugins:
            await p.on_request(ctx, request)

    async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
        """Every plugin hears of the end, even if one before it fails (limits get released)."""
        for p in self.plugins:
            try:
                await p.on_response_end(ctx, end)
            except Exception:
                log.exception("plugin %s failed in on_response_end", type(p).__name__)

    def routes(self) -> list[BaseRoute]:
        return [r for p in self.plugins for r in p.routes()]

    async def startup(self) -> None:
        for p in self.plugins:
            await p.startup()

    async def shutdown(self) -> None:
        for p in reversed(self.plugins):
            await p.shutdown()
