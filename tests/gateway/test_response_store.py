"""The stored-response stores themselves: SQLite (expiry, the byte bound, two processes'
worth of connections on one file, a restart) and a real redis-server shared by two gateways."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from gateway.config import ResponsesConfig
from gateway.store.base import StoredResponse
from gateway.store.sqlite import SQLiteStore
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config
from tests.support import RedisServer, free_port


def record(rid: str, size: int = 10, owner: str | None = None) -> StoredResponse:
    return StoredResponse(rid, owner, int(time.time()), "r" * size, "[]", "[]")


def test_sqlite_put_get_delete_and_reopen(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)
        await store.put(record("a", owner="alice"))
        got = await store.get("a")
        assert got is not None and got.owner == "alice" and got.response == "r" * 10
        await store.aclose()
        again = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)
        assert await again.get("a") == got  # the file outlives the process's connection
        assert await again.delete("a") and not await again.delete("a")
        assert await again.get("a") is None
        await again.aclose()

    asyncio.run(run())


def test_sqlite_expired_records_are_gone(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "s.db", ttl_s=0.2, max_bytes=1 << 20, purge_every_s=0)
        await store.put(record("old"))
        assert await store.get("old") is not None
        await asyncio.sleep(0.3)
        assert await store.get("old") is None  # expired: never served
        await store.put(record("new"))  # and purged on the next write
        rows = store._connect().execute("SELECT id FROM responses").fetchall()
        assert rows == [("new",)]
        await store.aclose()

    asyncio.run(run())


def test_sqlite_bound_drops_the_oldest(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=2000)
        for i in range(30):
            await store.put(record(f"r{i}", size=100))
        kept = [r for (r,) in store._connect().execute("SELECT id FROM responses ORDER BY rowid")]
        total = store._connect().execute("SELECT SUM(size) FROM responses").fetchone()[0]
        assert total <= 2000 and kept[-1] == "r29" and "r0" not in kept
        await store.aclose()

    asyncio.run(run())


def test_sqlite_two_stores_on_one_file(tmp_path: Path) -> None:
    """Two gateways on one file (WAL): each sees what the other wrote, writes interleaved."""

    async def run() -> None:
        a = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)
        b = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)
        await asyncio.gather(
            *(s.put(record(f"{n}{i}")) for i in range(50) for n, s in (("a", a), ("b", b)))
        )
        assert all([await b.get(f"a{i}") for i in range(50)])
        assert all([await a.get(f"b{i}") for i in range(50)])
        mode = a._connect().execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        await a.aclose()
        await b.aclose()

    asyncio.run(run())


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    program = shutil.which("redis-server")
    if program is None:
        import os

        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: apt-get install redis-server")
        pytest.skip("redis-server is missing")
    server = RedisServer(program, free_port())
    server.start()
    yield server
    server.stop()


def test_two_gateways_share_conversations_through_redis(redis: RedisServer, tmp_path: Path) -> None:
    config = scripted_config({"m": {"reply": "one two three"}})
    config = replace(config, responses=ResponsesConfig(redis_url=redis.url, max_bytes=1 << 20))
    with (
        ServerThread(config) as first,
        ServerThread(config) as second,
        OpenAI(base_url=first.base_url + "/v1", api_key="x") as a,
        OpenAI(base_url=second.base_url + "/v1", api_key="x") as b,
    ):
        turn1 = a.responses.create(model="m", input="hello")
        turn2 = b.responses.create(model="m", input="again", previous_response_id=turn1.id)
        assert turn2.usage is not None and turn1.usage is not None
        assert turn2.usage.input_tokens > turn1.usage.total_tokens  # turn 1 replayed
        assert a.responses.retrieve(turn2.id).output_text == "one two three"
        b.responses.delete(turn1.id)
        import openai

        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(turn1.id)


def test_redis_bound_drops_the_oldest(redis: RedisServer) -> None:
    from gateway.store.redis import RedisStore

    async def run() -> None:
        store = RedisStore(redis.url, ttl_s=60, max_bytes=1000)
        for i in range(20):
            await store.put(record(f"r{i}", size=100))
        kept = [i for i in range(20) if await store.get(f"r{i}") is not None]
        assert kept[-1] == 19 and 0 not in kept and len(kept) * 106 <= 1000
        await store.aclose()

    asyncio.run(run())


async def _find_items(store: Any) -> None:
    """An item id finds its response; a later response holding the same item wins; a
    deleted or evicted response's items find nothing."""
    await store.put(replace(record("a", owner="alice"), item_ids=("msg_1", "fc_1")))
    await store.put(replace(record("b"), item_ids=("msg_2",)))
    found = await store.find_item("fc_1")
    assert found is not None and found.id == "a" and found.owner == "alice"
    assert await store.find_item("msg_9") is None
    await store.put(replace(record("c"), item_ids=("msg_1",)))  # referenced again by c
    assert (await store.find_item("msg_1")).id == "c"
    await store.delete("b")
    assert await store.find_item("msg_2") is None
    for i in range(40):  # past the byte bound: a and c are evicted
        await store.put(record(f"big{i}", size=100))
    assert await store.find_item("fc_1") is None and await store.find_item("msg_1") is None
    await store.aclose()


def test_sqlite_finds_items(tmp_path: Path) -> None:
    asyncio.run(_find_items(SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=2000)))


def test_redis_finds_items(redis: RedisServer) -> None:
    from gateway.store.redis import RedisStore

    asyncio.run(_find_items(RedisStore(redis.url, ttl_s=60, max_bytes=2000)))
