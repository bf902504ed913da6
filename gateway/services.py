"""What every route is built from: the config, the model pool and the plugin chain."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from gateway.plugins import PluginChain, plugin_factory
from gateway.pool import ModelPool
from gateway.store import ResponseStore, open_store


@dataclass(frozen=True)
class Services:
    config: GatewayConfig
    pool: ModelPool
    plugins: PluginChain
    #: Stored responses (``/v1/responses``), opened on first use.
    store: ResponseStore = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.store is None:
            object.__setattr__(self, "store", open_store(self.config.responses))


def build_services(config: GatewayConfig) -> Services:
    pool = ModelPool(config)
    named = {
        name: plugin_factory(name).create(cfg, pool)
        for name, cfg in config.plugins.items()
        if cfg.enabled
    }
    chain = PluginChain(list(named.values()), named=named, configs=config.plugins)
    return Services(config=config, pool=pool, plugins=chain)
