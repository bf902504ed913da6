"""Small helpers for core tests: configs with the scripted backend, SSE parsing."""

from __future__ import annotations

from typing import Any

from gateway.config import GatewayConfig, parse_config
from gateway.testing import ScriptedBackend
from tests.support import sse_events, sse_json

__all__ = ["sse_events", "sse_json"]


def scripted_config(
    models: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    plugins: dict[str, dict[str, Any]] | None = None,
) -> GatewayConfig:
    models = models or {"m": {}}
    raw: dict[str, Any] = {
        "models": {name: {"backend": "scripted", **table} for name, table in models.items()},
        "server": server or {},
        "plugins": plugins or {},
    }
    return parse_config(raw, "<test>")


def scripted(backend: object) -> ScriptedBackend:
    assert isinstance(backend, ScriptedBackend)
    return backend


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
