"""The plugin seam on a config reload: which tables apply in place, which need a restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.config import GatewayConfig, PluginConfig, parse_config
from gateway.errors import ConfigError
from gateway.plugins import Plugin, PluginChain

pytestmark = pytest.mark.timeout(10)


class Reloadable(Plugin):
    """Applies any table in place; refuses a config with a model named ``bad``."""

    def __init__(self) -> None:
        self.applied: list[PluginConfig] = []

    def prepare_reconfigure(
        self, config: PluginConfig, gateway: GatewayConfig
    ) -> Callable[[], None]:
        if "bad" in gateway.models:
            raise ConfigError("plugins.r", ["a model named 'bad' is refused"])
        return lambda: self.applied.append(config)


def gateway(models: tuple[str, ...] = ("m",)) -> GatewayConfig:
    raw: dict[str, Any] = {"models": {m: {"backend": "scripted"} for m in models}}
    return parse_config(raw, "<test>")


def chain_of(**plugins: tuple[Plugin | None, PluginConfig]) -> PluginChain:
    named = {n: p for n, (p, _) in plugins.items() if p is not None}
    return PluginChain(
        list(named.values()), named=named, configs={n: c for n, (_, c) in plugins.items()}
    )


def with_plugins(config: GatewayConfig, **tables: PluginConfig) -> GatewayConfig:
    return GatewayConfig(config.source, config.server, config.models, dict(tables))


def test_changed_tables_apply_in_place_or_need_a_restart() -> None:
    r, fixed = Reloadable(), Plugin()
    on, off = PluginConfig(), PluginConfig(enabled=False)
    chain = chain_of(r=(r, on), fixed=(fixed, on), idle=(None, off))
    new = with_plugins(gateway(), r=on, fixed=off, idle=on, added=on)
    plan = chain.plan_reload(new)
    assert plan.reloaded == []  # r's table is the same: checked and re-applied, not reported
    assert plan.restart_required == ["plugins.added", "plugins.fixed", "plugins.idle"]
    assert r.applied == []  # nothing changes before apply()
    plan.apply()
    assert r.applied == [on]
    assert chain.configs["fixed"] == on  # still what runs: the next reload reports it again


class Limits(PluginConfig):
    per_minute: int = 10


def test_a_changed_reloadable_table_is_reported_and_becomes_the_running_one() -> None:
    r = Reloadable()
    chain = chain_of(r=(r, Limits()))
    plan = chain.plan_reload(with_plugins(gateway(), r=Limits(per_minute=20)))
    assert (plan.reloaded, plan.restart_required) == (["r"], [])
    plan.apply()
    assert r.applied == [Limits(per_minute=20)] and chain.configs["r"] == Limits(per_minute=20)
    again = chain.plan_reload(with_plugins(gateway(), r=Limits(per_minute=20)))
    assert again.reloaded == []  # already running
    disabled = chain.plan_reload(with_plugins(gateway(), r=Limits(enabled=False)))
    assert disabled.restart_required == ["plugins.r"]  # its hooks and routes are wired in
    removed = chain.plan_reload(with_plugins(gateway()))
    assert removed.restart_required == ["plugins.r"]


def test_a_refused_table_raises_before_anything_applies() -> None:
    r = Reloadable()
    chain = chain_of(r=(r, PluginConfig()))
    with pytest.raises(ConfigError, match="refused"):
        chain.plan_reload(with_plugins(gateway(("m", "bad")), r=PluginConfig()))
    assert r.applied == []
