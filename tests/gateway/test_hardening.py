"""Issue 23's smaller findings (11) over real HTTP with the scripted backend: what one key can
do to another's stored items, work done before a cap is checked, what a hosted tool's type can
put in a header or a log line."""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from hashlib import sha256
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ResponsesConfig
from gateway.store import StoredResponse
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config

pytestmark = pytest.mark.timeout(30)

KEYS = {"keys": [{"name": n, "sha256": sha256(f"sk-{n}".encode()).hexdigest()} for n in ("a", "b")]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("store") / "s.sqlite3"
    config = scripted_config({"m": {"echo": True}}, plugins={"api_keys": KEYS})
    with ServerThread(replace(config, responses=ResponsesConfig(path=str(path)))) as srv:
        yield srv


def post(server: ServerThread, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v1/responses",
        json={"model": "m", **body},
        headers={"authorization": f"Bearer sk-{key}"},
        timeout=20,
    )


def test_an_item_id_is_scoped_by_its_owner(server: ServerThread) -> None:
    """Issue 23 finding 11: item ids are client-chosen and were one index for all keys: key
    b storing an item under key a's id broke a's ``item_reference`` to it."""
    mine = [{"type": "message", "role": "user", "content": "a's words", "id": "msg_shared"}]
    assert post(server, "a", {"input": mine}).status_code == 200
    theirs = [{"type": "message", "role": "user", "content": "b's words", "id": "msg_shared"}]
    assert post(server, "b", {"input": theirs}).status_code == 200
    ref = [{"type": "item_reference", "id": "msg_shared"}]
    r = post(server, "a", {"input": ref, "store": False})
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "a's words"
    r = post(server, "b", {"input": ref, "store": False})
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "b's words"


def test_item_references_are_capped_before_any_lookup(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 finding 11: each ``item_reference`` read and parsed a whole stored record
    before the 4,096-item cap was checked (25,000 references: 7 s of work); the cap comes
    first, and each distinct id (and record) is read once."""
    store = server.services.store
    calls: list[str] = []
    real = store.find_item

    async def find_item(owner: str | None, item_id: str) -> StoredResponse | None:
        calls.append(item_id)
        return await real(owner, item_id)

    monkeypatch.setattr(store, "find_item", find_item)
    mine = [{"type": "message", "role": "user", "content": "x", "id": "msg_many"}]
    assert post(server, "a", {"input": mine}).status_code == 200
    many = [{"type": "item_reference", "id": "msg_many"}] * 25_000
    started = time.perf_counter()
    r = post(server, "a", {"input": many, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert calls == [] and time.perf_counter() - started < 2
    r = post(server, "a", {"input": many[:1000], "store": False})
    assert r.status_code == 200 and calls == ["msg_many"]


def test_a_hosted_tool_type_is_sanitized_for_headers_and_logs(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23 finding 11: a hosted tool's ``type`` went unescaped into the
    ``x-gateway-ignored-tools`` header (a 500 for a newline) and a log line (forged lines)."""
    evil = "web_search\r\nx-forged: 1\n2026-01-01 ERROR forged line" + "z" * 500
    tools = [{"type": evil}, {"type": evil}, {"type": "mcp"}]
    with caplog.at_level(logging.WARNING, logger="gateway.responses"):
        r = post(server, "a", {"input": "hi", "tools": tools, "store": False})
    assert r.status_code == 200
    header = r.headers["x-gateway-ignored-tools"]
    assert header.startswith("web_searchx-forged1") and header.endswith(",mcp")
    assert "x-forged" not in r.headers and len(header) <= 2 * 64 + 1
    logged = [rec.getMessage() for rec in caplog.records if "hosted tools" in rec.getMessage()]
    assert logged and all("\n" not in m and "\r" not in m for m in logged)


def test_an_old_item_index_is_scoped_on_open(tmp_path: Path) -> None:
    """Issue 23 finding 11: a store written before item ids were scoped keeps its items,
    each under its response's owner."""
    import asyncio

    from gateway.store.sqlite import SQLiteStore

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT, created_at INTEGER NOT NULL,"
        " expires_at REAL NOT NULL, size INTEGER NOT NULL, response TEXT NOT NULL,"
        " input_items TEXT NOT NULL, context TEXT NOT NULL, root TEXT NOT NULL DEFAULT '');"
        "CREATE TABLE items (item_id TEXT PRIMARY KEY, response_id TEXT NOT NULL);"
    )
    db.execute(
        "INSERT INTO responses VALUES ('r1', 'a', 1, ?, 2, '{}', '[]', '[]', '')",
        (time.time() + 60,),
    )
    db.execute("INSERT INTO items VALUES ('msg_1', 'r1')")
    db.commit()
    db.close()

    async def run() -> None:
        store = SQLiteStore(path, ttl_s=60, max_bytes=1 << 20)
        found = await store.find_item("a", "msg_1")
        assert found is not None and found.id == "r1"
        assert await store.find_item("b", "msg_1") is None
        await store.aclose()

    asyncio.run(run())


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerThread]:
    server = {
        "header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_connections": 4,
        "max_header_bytes": 8192,
    }  # fmt: skip
    with ServerThread(scripted_config(server=server)) as srv:
        yield srv


def _connect(srv: ServerThread) -> socket.socket:
    host, port = srv.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_headers_sent_slowly_lose_their_connection(limited: ServerThread) -> None:
    """Issue 23 finding 11: no deadline on a request's headers (uvicorn's keep-alive timer
    stops at the first byte): a client sending a byte now and then held its connection for
    ever; past ``header_timeout_s`` it is closed."""
    with _connect(limited) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow: 1\r\n")
        assert _read_all(sock) == b"" and time.monotonic() - started < 3


def test_a_body_sent_slowly_is_a_408(limited: ServerThread) -> None:
    """Issue 23 finding 11: no deadline on the body: a request could hold a handler (and the
    plugins' state) for ever by sending its body slowly; past ``body_timeout_s``, a 408."""
    with _connect(limited) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_headers_and_connections_are_bounded(limited: ServerThread) -> None:
    """Issue 23 finding 11: no connection limit and uvicorn's defaults: past
    ``max_header_bytes`` a 400, past ``max_connections`` a 503."""
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000)
        time.sleep(0.05)
        with contextlib.suppress(OSError):
            sock.sendall(b"\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 400")
    idle = [_connect(limited) for _ in range(4)]
    try:
        time.sleep(0.05)
        r = httpx.get(limited.base_url + "/health", timeout=5)
        assert r.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.1)
    assert httpx.get(limited.base_url + "/health", timeout=5).status_code == 200


def test_a_load_error_reaches_the_log_not_the_client(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23 finding 11: a model's load error (file paths, replica URLs, library text)
    was the client's 503 message; the client learns that the load failed, the log why."""
    config = scripted_config({"m": {"fail_on_start": True}})
    with caplog.at_level(logging.ERROR), ServerThread(config, wait_ready=False) as srv:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=20)
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "failed to load" in message and "told to fail" not in message
    assert any("told to fail on start" in rec.getMessage() for rec in caplog.records)


def test_a_request_runs_only_the_sequences_it_was_granted() -> None:
    """Issue 23 finding 11: an embeddings request of 64 inputs, admitted for the model's 2
    sequences, ran 64 backend streams at once (64 upstream requests to a replica); its
    inputs take turns on the 2 it holds."""
    models = {
        "emb": {
            "capabilities": ["embeddings"], "prefill_delay_s": 0.01,
            "batching": {"max_concurrent": 2},
        }
    }  # fmt: skip
    with ServerThread(scripted_config(models)) as srv:
        inputs = [f"input {i}" for i in range(64)]
        r = httpx.post(
            srv.base_url + "/v1/embeddings", json={"model": "emb", "input": inputs}, timeout=20
        )
        assert r.status_code == 200 and len(r.json()["data"]) == 64
        record = scripted(srv.backend("emb")).record
        assert len(record.finished) == 64 and record.max_active == 2


def test_the_header_deadline_leaves_an_idle_keep_alive_connection_alone(
    limited: ServerThread,
) -> None:
    """Issue 23 finding 11: the header deadline runs from a request's first byte, not from
    the last response (an idle keep-alive connection is the keep-alive timer's: a client
    reusing it within ``idle_timeout_s`` must not find it closed)."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    def answer(sock: socket.socket) -> bytes:
        out = b""
        while not out.endswith(b"}") and (chunk := sock.recv(65536)):
            out += chunk
        return out

    with _connect(limited) as sock:
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.8)  # past header_timeout_s (0.5), within idle_timeout_s (5)
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")


def test_jinja2_is_pinned_past_its_sandbox_escapes() -> None:
    """Issue 23 finding 11: ``jinja2>=3.1`` admitted versions whose sandbox (what renders a
    model's chat template) can be escaped (CVE-2024-56326, CVE-2025-27516: fixed in 3.1.6)."""
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (jinja,) = [Requirement(d) for d in deps if Requirement(d).name == "jinja2"]
    assert not jinja.specifier.contains("3.1.5") and jinja.specifier.contains("3.1.6")
