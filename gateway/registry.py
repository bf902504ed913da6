"""Finds backends and plugins through their entry-point groups."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from gateway.backend import BackendFactory
    from gateway.plugins import PluginFactory

BACKENDS_GROUP = "gateway.backends"
PLUGINS_GROUP = "gateway.plugins"


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def _load(group: str, kind: str, name: str) -> object:
    eps = _entry_points(group)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise LookupError(f"unknown {kind} {name!r} (known: {known})")
    return eps[name].load()


def backend_factory(name: str) -> BackendFactory:
    return cast("BackendFactory", _load(BACKENDS_GROUP, "backend", name))


def plugin_factory(name: str) -> PluginFactory:
    return cast("PluginFactory", _load(PLUGINS_GROUP, "plugin", name))


def backend_names() -> list[str]:
    return sorted(_entry_points(BACKENDS_GROUP))
