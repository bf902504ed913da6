"""Real replicas on loopback for the ``openai`` backend's tests: gateway processes, in-process
gateways, llama-cpp-python's server; no mock of httpx anywhere."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from backends.openai import OpenAIBackend
from gateway.config import GatewayConfig, parse_config
from gateway.testing import ServerThread

#: Fast probes and ejection, so health tests take a second, not a minute.
FAST_HEALTH = {"path": "/ready", "interval_s": 0.2, "timeout_s": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)


def _toml_value(value: object) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def to_toml(config: Mapping[str, Mapping[str, object]]) -> str:
    """``{"models": {...}, "plugins": {...}}`` as TOML (one inline table per entry)."""
    lines = []
    for table, entries in config.items():
        lines.append(f"[{table}]")
        lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entries.items())
    return "\n".join(lines) + "\n"


class Process:
    """A server subprocess on a fixed port (so it can be killed and started again there)."""

    def __init__(self, argv: list[str], port: int, log: Path, ready_path: str) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.ready_path = ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Process:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv[:4]} not ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no drain, connections cut as by a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def gateway_process(tmp: Path, name: str, config: Mapping[str, Mapping[str, object]]) -> Process:
    """``gateway serve --config <tmp config>`` on a free port (not started yet)."""
    path = tmp / f"{name}.toml"
    path.write_text(to_toml(config))
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Process(argv, port, tmp / f"{name}.log", "/ready")


def llama_cpp_server(tmp: Path, model_path: Path, n_ctx: int = 2048) -> Process:
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
    return Process(argv, port, tmp / "llama_cpp_server.log", "/docs")


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


def sse_payloads(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def chat(model: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
