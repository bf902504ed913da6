"""Streams end properly however they end: disconnects, engine errors, keep-alives, slow readers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.services import build_services
from gateway.testing import ScriptedBackend, ServerThread
from tests.gateway.helpers import scripted, scripted_config, sse_events
from tests.support import wait_for

SLOW = {"reply": " ".join(f"w{i}" for i in range(200)), "token_delay_s": 0.02}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "slow": {**SLOW, "batching": {"max_concurrent": 1, "max_queue": 4}},
            "prefill": {"prefill_delay_s": 1.0, "reply": "done"},
            "broken": {"fail_after_tokens": 2, "reply": "a b c d e"},
            "huge": {"reply": "word " * 300_000, "context_length": 1_000_000},
        },
        server={"keepalive_s": 0.2, "send_timeout_s": 1.0},
    )
    with ServerThread(config) as srv:
        yield srv


def body(model: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go"}],
        "stream": stream,
        **extra,
    }


def test_client_disconnect_mid_stream_reaches_backend(server: ServerThread) -> None:
    backend = scripted(server.backend("slow"))
    before = len(backend.record.cancelled)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body("slow")) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: len(backend.record.cancelled) == before + 1)
    adm = server.services.pool.resolve("slow").admission
    wait_for(lambda: adm.active == 0)
    # the slot is free: the next request is served at once
    r2 = httpx.post(
        server.base_url + "/v1/chat/completions", json=body("slow", False, max_tokens=2)
    )
    assert r2.status_code == 200


def test_disconnect_while_queued_frees_the_queue(server: ServerThread) -> None:
    backend = scripted(server.backend("slow"))
    adm = server.services.pool.resolve("slow").admission
    started = len(backend.record.started)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body("slow")) as first:
        lines = first.iter_lines()
        next(lines)
        with httpx.Client() as c, pytest.raises(httpx.ReadTimeout):
            c.post(
                server.base_url + "/v1/chat/completions",
                json=body("slow", False),
                timeout=httpx.Timeout(5, read=0.3),
            )
        wait_for(lambda: adm.queued == 0)
        assert len(backend.record.started) == started + 1  # the queued one never started
    wait_for(lambda: adm.active == 0)


def test_non_stream_disconnect_cancels_generation(server: ServerThread) -> None:
    backend = scripted(server.backend("slow"))
    before = len(backend.record.cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body("slow", False), timeout=0.3)
    wait_for(lambda: len(backend.record.cancelled) == before + 1)
    wait_for(lambda: server.services.pool.resolve("slow").admission.active == 0)


def test_engine_error_mid_stream_is_one_error_event(server: ServerThread) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body("broken"))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "[DONE]" not in events
    errors = [json.loads(e) for e in events if '"error"' in e]
    assert len(errors) == 1 and events[-1] == json.dumps(errors[0], separators=(",", ":"))
    assert errors[0]["error"]["type"] == "server_error"
    assert server.services.pool.resolve("broken").admission.active == 0
    assert scripted(server.backend("broken")).record.failed


def test_engine_error_non_stream_is_500_json(server: ServerThread) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body("broken", False))
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"


def test_keepalive_pings_during_long_prefill(server: ServerThread) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body("prefill"))
    lines = [line for line in r.text.splitlines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"done"' in line)
    assert any(line.startswith(":") for line in lines[:first_content])


def test_slow_reader_is_cut_off_by_send_timeout(server: ServerThread) -> None:
    backend = scripted(server.backend("huge"))
    before = len(backend.record.cancelled)
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body("huge")).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    try:
        # never read: the server's send must time out and the generation must stop
        wait_for(lambda: len(backend.record.cancelled) == before + 1, timeout=20)
    finally:
        sock.close()
    wait_for(lambda: server.services.pool.resolve("huge").admission.active == 0)


async def test_disconnect_at_asgi_level_runs_backend_finally() -> None:
    """Drive the app directly: the client disconnects after the first body chunk."""
    config = scripted_config({"m": SLOW})
    services = build_services(config)
    await services.pool.start()
    app = create_app(config, services)
    backend = services.pool.resolve("m").backend
    assert isinstance(backend, ScriptedBackend)
    payload = json.dumps(body("m")).encode()
    got_chunk = asyncio.Event()
    sent: list[MutableMapping[str, Any]] = []
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await got_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"x")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert backend.record.cancelled == backend.record.started
    assert backend.record.active == 0
    assert services.pool.resolve("m").admission.active == 0
    assert backend.record.tokens_generated < 20
    await services.pool.aclose()
