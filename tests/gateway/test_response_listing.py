"""The chat page's two extensions of the stored responses: ``GET /v1/responses`` (a key's own
responses, newest first, paged) and ``POST /v1/responses/{id}`` (a finished response's
metadata replaced), in both stores and over HTTP behind API keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.store.base import StoredResponse
from gateway.store.sqlite import SQLiteStore
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config
from tests.support import RedisServer, free_port

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


def record(rid: str, created: int, owner: str | None) -> StoredResponse:
    """Ties on ``created_at`` come by id, descending."""
    return StoredResponse(rid, owner, created, json.dumps({"id": rid}), "[]", "[1]", root="r0")


async def _lists(store: Any) -> None:
    for i in range(5):
        await store.put(record(f"a{i}", 100 + i // 2, "alice"))  # ties on created_at
    await store.put(record("b0", 200, "bob"))
    await store.put(record("n0", 300, None))
    mine = await store.owned("alice", 10)
    assert [r.id for r in mine] == ["a4", "a3", "a2", "a1", "a0"]
    assert all(r.context == "" and r.root == "r0" and r.owner == "alice" for r in mine)
    assert [r.id for r in await store.owned("alice", 2, "a3")] == ["a2", "a1"]
    assert await store.owned("alice", 2, "b0") == []  # another owner's id pages nothing
    assert [r.id for r in await store.owned(None, 10)] == ["n0"]
    assert [r.id for r in await store.owned("bob", 10)] == ["b0"]
    await store.delete("a3")
    assert [r.id for r in await store.owned("alice", 3)] == ["a4", "a2", "a1"]
    await store.aclose()


def test_sqlite_lists_an_owners_records(tmp_path: Path) -> None:
    asyncio.run(_lists(SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    program = shutil.which("redis-server")
    if program is None:
        pytest.skip("redis-server is missing")
    server = RedisServer(program, free_port())
    server.start()
    yield server
    server.stop()


def test_redis_lists_an_owners_records(redis: RedisServer) -> None:
    from gateway.store.redis import RedisStore

    asyncio.run(_lists(RedisStore(redis.url, ttl_s=60, max_bytes=1 << 20)))


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_lists_and_updates_its_own_responses_only() -> None:
    keys = [{"name": "alice", "sha256": _sha(ALICE)}, {"name": "bob", "sha256": _sha(BOB)}]
    cfg = scripted_config({"m": {"reply": "one two"}}, plugins={"api_keys": {"keys": keys}})
    with ServerThread(cfg) as server:

        def call(method: str, path: str, key: str, **kw: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.request(method, server.base_url + path, headers=headers, **kw)

        first = call("POST", "/v1/responses", ALICE, json={"model": "m", "input": "hi"}).json()
        body = {"model": "m", "input": "more", "previous_response_id": first["id"]}
        second = call("POST", "/v1/responses", ALICE, json=body).json()
        call("POST", "/v1/responses", BOB, json={"model": "m", "input": "bob's"})
        listed = call("GET", "/v1/responses", ALICE).json()
        # newest first by created_at (seconds: these two may tie, in an order kept by pages)
        by_id = {r["id"]: r for r in listed["data"]}
        assert set(by_id) == {first["id"], second["id"]}
        assert [r["root"] for r in listed["data"]] == [first["id"]] * 2
        assert by_id[second["id"]]["input_items"][0]["content"][0]["text"] == "more"
        assert by_id[second["id"]]["output"][0]["content"][0]["text"] == "one two"
        page = call("GET", "/v1/responses?limit=1", ALICE).json()
        assert page["has_more"] and page["last_id"] == listed["data"][0]["id"]
        rest = call("GET", f"/v1/responses?limit=1&after={page['last_id']}", ALICE).json()
        assert rest["data"] == listed["data"][1:] and not rest["has_more"]
        assert call("GET", "/v1/responses?limit=0", ALICE).status_code == 400
        bobs = call("GET", "/v1/responses", BOB).json()["data"]
        assert len(bobs) == 1 and bobs[0]["id"] not in (first["id"], second["id"])
        assert call("GET", "/v1/responses", "sk-nobody").status_code == 401

        title = {"metadata": {"title": "Greetings"}}
        assert call("POST", f"/v1/responses/{second['id']}", BOB, json=title).status_code == 404
        updated = call("POST", f"/v1/responses/{second['id']}", ALICE, json=title)
        assert updated.status_code == 200 and updated.json()["metadata"] == title["metadata"]
        got = call("GET", f"/v1/responses/{second['id']}", ALICE).json()
        assert got["metadata"] == title["metadata"] and got["output"] == second["output"]
        bad = call("POST", f"/v1/responses/{second['id']}", ALICE, json={"metadata": {"k": 1}})
        assert bad.status_code == 400
        # the conversation still goes on from the updated response
        body = {"model": "m", "input": "on", "previous_response_id": second["id"]}
        assert call("POST", "/v1/responses", ALICE, json=body).status_code == 200


def test_a_running_response_is_not_updated() -> None:
    cfg = scripted_config({"m": {"reply": "a b c d e f", "token_delay_s": 0.5}})
    with ServerThread(cfg) as server:
        body = {"model": "m", "input": "hi", "background": True}
        started = httpx.post(server.base_url + "/v1/responses", json=body).json()
        r = httpx.post(
            server.base_url + f"/v1/responses/{started['id']}", json={"metadata": {"t": "x"}}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"
        httpx.post(server.base_url + f"/v1/responses/{started['id']}/cancel")
