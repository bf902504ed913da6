"""Real replicas on loopback for the ``openai`` backend's tests: gateway processes, in-process
gateways, llama-cpp-python's server; no mock of httpx anywhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from backends.openai import OpenAIBackend
from gateway.config import GatewayConfig, parse_config
from gateway.testing import ServerThread
from tests.support import (
    ServerProcess,
    free_port,
    gateway_process,
    sse_events,
    to_toml,
    wait_for,
)

#: The names the fleet tests know these by.
Process = ServerProcess
sse_payloads = sse_events
__all__ = ["Process", "free_port", "gateway_process", "sse_payloads", "to_toml", "wait_for"]

#: Fast probes and ejection, so health tests take a second, not a minute.
FAST_HEALTH = {"path": "/ready", "interval_s": 0.2, "timeout_s": 1.0}


def llama_cpp_server(tmp: Path, model_path: Path, n_ctx: int = 2048) -> ServerProcess:
    """llama-cpp-python's own server (one model lock, one-slot prefix cache); needs the
    ``llama-cpp-python[server]`` packages."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        "smol",
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
        "--n_ctx",
        str(n_ctx),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return ServerProcess(argv, port, tmp / "llama_cpp_server.log", "/docs")


def scripted_upstream(models: dict[str, dict[str, Any]]) -> GatewayConfig:
    raw = {"models": {name: {"backend": "scripted", **t} for name, t in models.items()}}
    return parse_config(raw, "<upstream>")


def front_config(
    models: dict[str, dict[str, Any]], local: dict[str, dict[str, Any]] | None = None
) -> GatewayConfig:
    """A gateway whose ``models`` use the ``openai`` backend (``local``: scripted ones)."""
    raw: dict[str, Any] = {
        "models": {
            **{name: {"backend": "openai", **t} for name, t in models.items()},
            **{name: {"backend": "scripted", **t} for name, t in (local or {}).items()},
        }
    }
    return parse_config(raw, "<front>")


def fleet(server: ServerThread, model: str) -> OpenAIBackend:
    backend = server.backend(model)
    assert isinstance(backend, OpenAIBackend)
    return backend


def chat(model: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
