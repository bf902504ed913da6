"""Issue 23's smaller findings (11) over real HTTP with the scripted backend: what one key can
do to another's stored items, work done before a cap is checked, what a hosted tool's type can
put in a header or a log line."""

from __future__ import annotations

import logging
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
from tests.gateway.helpers import scripted_config

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
