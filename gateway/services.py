"""What every route is built from: the config, the model pool, the plugin chain and the
response store."""

from __future__ import annotations

from dataclasses import dataclass

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
    store: ResponseStore


def build_services(config: GatewayConfig) -> Services:
    pool = ModelPool(config)
    named = {
        name: plugin_factory(name).create(cfg, pool)
        for name, cfg in config.plugins.items()
        if cfg.enabled
    }
    chain = PluginChain(list(named.values()), named=named, configs=config.plugins)
    store = open_store(config.responses)
    return Services(config=config, pool=pool, plugins=chain, store=store)
