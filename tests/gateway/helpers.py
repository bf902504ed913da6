"""Small helpers for core tests: configs with the scripted backend, SSE parsing."""

from __future__ import annotations

import json
from typing import Any

from gateway.config import GatewayConfig, parse_config
from gateway.testing import ScriptedBackend


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


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def sse_json(body: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in sse_events(body) if e != "[DONE]"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
