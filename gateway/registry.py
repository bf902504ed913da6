"""Finds what is installed under an entry-point group (backends, plugins).

It knows nothing of what it loads: :func:`gateway.backend.backend_factory` and
:func:`gateway.plugins.plugin_factory` give the loaded objects their types, so this module sits
below everything else in ``gateway/`` and is part of no import circle.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

BACKENDS_GROUP = "gateway.backends"
PLUGINS_GROUP = "gateway.plugins"


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def load(group: str, kind: str, name: str) -> object:
    """The object registered as ``name`` in ``group``; ``LookupError`` naming the known ones."""
    eps = _entry_points(group)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise LookupError(f"unknown {kind} {name!r} (known: {known})")
    return eps[name].load()


def names(group: str) -> list[str]:
    return sorted(_entry_points(group))


def backend_names() -> list[str]:
    return names(BACKENDS_GROUP)
