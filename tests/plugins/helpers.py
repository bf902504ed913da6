"""Helpers for plugin tests: configs with the scripted backend, keys, waiting, SSE parsing."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config import GatewayConfig, parse_config
from gateway.testing import ScriptedBackend, ServerThread
from tests.support import openai_client, sse_json, wait_for

__all__ = ["sse_json", "wait_for"]

SLOW_REPLY = " ".join(f"w{i}" for i in range(60))


def config(
    models: dict[str, dict[str, Any]] | None = None,
    plugins: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
) -> GatewayConfig:
    raw: dict[str, Any] = {
        "models": {
            name: {"backend": "scripted", **table} for name, table in (models or {"m": {}}).items()
        },
        "plugins": plugins or {},
        "server": server or {},
    }
    return parse_config(raw, "<test>")


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def client(server: ServerThread, key: str = "unused") -> OpenAI:
    return openai_client(server.base_url, api_key=key)


def chat(model: str = "m", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        **extra,
    }


def post(server: ServerThread, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    )


def scripted(server: ServerThread, model: str = "m") -> ScriptedBackend:
    backend = server.backend(model)
    assert isinstance(backend, ScriptedBackend)
    return backend


def need_program(path: str, package: str) -> str:
    """The program's path; skips the test without it, except in CI where it must be there."""
    found = shutil.which(path)
    if found is None:
        message = f"{path} is missing: apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
