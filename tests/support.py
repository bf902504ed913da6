"""Helpers every part of the suite shares (one of each): waiting for a condition, free ports,
reading SSE bodies, writing TOML configs, and a server in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from openai import OpenAI


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms; fail the test naming ``what`` if it stays false."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.01)


#: SDK clients made by a test or its function-scoped fixtures, closed when it ends
#: (``tests/conftest.py``; a module-scoped fixture closes its own): an open client's pooled
#: socket, left to the garbage collector, is finalized during some later test.
_test_clients: list[OpenAI] = []


def close_test_clients() -> None:
    while _test_clients:
        _test_clients.pop().close()


def openai_client(base_url: str, *, api_key: str = "x", timeout: float = 60) -> OpenAI:
    """The official SDK pointed at a gateway (no retries: a test sees every status), closed
    when the test ends."""
    client = OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
    _test_clients.append(client)
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_events(body: str | bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def sse_json(body: str | bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body (``[DONE]`` left out)."""
    return [json.loads(e) for e in sse_events(body) if e != "[DONE]"]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(tables: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for test configs: nested tables become tables, tables in lists inline."""
    scalars = {k: v for k, v in tables.items() if not isinstance(v, Mapping)}
    nested = {k: v for k, v in tables.items() if isinstance(v, Mapping)}
    out = []
    if prefix and (scalars or not nested):
        out.append(f"[{prefix}]")
    out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in scalars.items()]
    for key, table in nested.items():
        name = json.dumps(key) if not key.replace("_", "").replace("-", "").isalnum() else key
        out.append(to_toml(table, f"{prefix}.{name}" if prefix else name))
    return "\n".join(out) + "\n"


Wait = Literal["ready", "listening", "no"]


class ServerProcess:
    """A server subprocess on a fixed loopback port (so it can be killed and started again
    there), its output in ``log_path``."""

    def __init__(self, argv: list[str], port: int, log_path: Path, ready_path: str) -> None:
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        self.url = self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: Wait = "ready", timeout: float = 90.0) -> ServerProcess:
        env = {
            **os.environ,
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
            "_TYPER_STANDARD_TRACEBACK": "1",
        }
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        if wait != "no":
            check = self._ready if wait == "ready" else self._listening
            try:
                wait_for(check, timeout, f"{self.argv[:4]} {wait}")
            except AssertionError:
                self.stop()
                raise AssertionError(f"{self.argv[:4]} not {wait}:\n{self.log_tail()}") from None
        return self

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.argv[:4]} exited:\n{self.log_tail()}")

    def _listening(self) -> bool:
        self._alive()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _ready(self) -> bool:
        self._alive()
        try:
            return httpx.get(self.url + self.ready_path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(self._ready, timeout, f"{self.ready_path} 200\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def terminate(self) -> None:
        """SIGTERM: the gateway drains."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.log()}") from None

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

    def __enter__(self) -> ServerProcess:
        return self.start(wait="listening")

    def __exit__(self, *exc: object) -> None:
        self.kill()


def gateway_process(tmp: Path, name: str, config: Mapping[str, Any]) -> ServerProcess:
    """``gateway serve --config <tmp>/<name>.toml`` on a free port (not started yet); its log
    at info level unless the config says otherwise."""
    server = {"log_level": "info", **config.get("server", {})}
    path = tmp / f"{name}.toml"
    path.write_text(to_toml({**config, "server": server}))
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return ServerProcess(argv, port, tmp / f"{name}.log", "/ready")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A redis-server process of this test run's own (no persistence, loopback only)."""

    program: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        workdir = tempfile.mkdtemp(prefix="redis-test-")
        self.process = subprocess.Popen(
            [
                self.program,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", workdir,
                "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def peer_cli(path: Path, name: str, target: str) -> Path:
    """A client CLI ``make`` installs into ``.peers/`` (Codex, Claude Code): skipped where it is
    missing, a failure under ``CI=1`` (CI cannot pass its tests silently)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing at {path} (make {target} installs it)")
        pytest.skip(f"{name} not installed (make {target})")
    return path


def run_group(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own process group, all of it killed on timeout (node launchers
    whose native child would outlive a plain kill), with what it printed so far in the
    failure."""
    with subprocess.Popen(
        command, cwd=cwd, env=env, text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            name = Path(command[0]).name
            pytest.fail(f"{name} ran past {timeout_s} s; its output: {out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
