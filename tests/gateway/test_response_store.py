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
from gateway.ids import ordered_hex
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
    found = await store.find_item("alice", "fc_1")
    assert found is not None and found.id == "a" and found.owner == "alice"
    assert await store.find_item("alice", "msg_9") is None
    assert (await store.find_item(None, "msg_2")).id == "b"
    # issue 23 finding 11: item ids are the client's; another owner's same id is its own
    await store.put(replace(record("m", owner="mallory"), item_ids=("msg_1", "fc_1")))
    assert (await store.find_item("alice", "fc_1")).id == "a"
    assert (await store.find_item("mallory", "fc_1")).id == "m"
    assert await store.find_item(None, "fc_1") is None
    await store.put(replace(record("c", owner="alice"), item_ids=("msg_1",)))  # again, by c
    assert (await store.find_item("alice", "msg_1")).id == "c"
    await store.delete("b")
    assert await store.find_item(None, "msg_2") is None
    for i in range(40):  # past the byte bound: a and c are evicted
        await store.put(record(f"big{i}", size=100))
    assert await store.find_item("alice", "fc_1") is None
    assert await store.find_item("alice", "msg_1") is None
    await store.aclose()


def test_sqlite_finds_items(tmp_path: Path) -> None:
    asyncio.run(_find_items(SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=2000)))


def test_redis_finds_items(redis: RedisServer) -> None:
    from gateway.store.redis import RedisStore

    asyncio.run(_find_items(RedisStore(redis.url, ttl_s=60, max_bytes=2000)))


@pytest.mark.timeout(10)
def test_redis_byte_total_counts_a_record_once_however_often_it_is_put(
    redis: RedisServer,
) -> None:
    """Issue 23 finding 4: each put added the record's size to the total and a delete took
    off only its last size, so a record put 3 times (a background response: queued, in
    progress, done) left twice its size behind, until every new record was evicted at once."""
    from gateway.store.redis import RedisStore

    async def run() -> None:
        store = RedisStore(redis.url, ttl_s=60, max_bytes=1000)
        total_key = f"{store.prefix}:bytes"
        for size in (100, 200, 300):  # one response, stored as it goes
            await store.put(record("bg", size=size))
        assert int(await store._redis.get(total_key)) == record("bg", size=300).size
        await store.put(record("other", size=500))
        assert await store.get("bg") is not None  # 804 + 504 stored: nothing evicted wrongly
        assert await store.delete("bg") and await store.delete("other")
        assert int(await store._redis.get(total_key)) == 0
        for i in range(5):  # the bound still holds records up to max_bytes
            await store.put(record(f"n{i}", size=150))
        assert all([await store.get(f"n{i}") is not None for i in range(5)])
        await store.aclose()

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_redis_calls_give_up_after_the_timeout() -> None:
    """Issue 23 finding 10 (Redis store part): the store's Redis client had no socket timeout,
    so a Redis that accepts but never answers held each call (and a model slot) forever."""
    import redis.exceptions

    from gateway.store.redis import RedisStore

    async def run() -> None:
        held: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accepts, reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0", ttl_s=60, max_bytes=1000, timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(redis.exceptions.RedisError):
            await asyncio.wait_for(store.get("x"), 3)
        assert time.monotonic() - started < 2
        for writer in held:
            writer.close()
        server.close()
        await store.aclose()

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_a_locked_sqlite_file_fails_fast_in_the_stores_own_threads(tmp_path: Path) -> None:
    """Issue 23 finding 5: with the file locked by another process, each store call waited
    30 s in asyncio's default thread pool, which filled, so chat completions that never touch
    the store stalled too. Calls run in the store's own threads and fail after its timeout
    (a 503 ``store_unavailable``); the default pool is never used."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from gateway.errors import StoreUnavailable
    from gateway.store import open_store

    path = tmp_path / "s.db"
    config = ResponsesConfig(path=str(path), timeout_s=0.3)

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    async def run() -> None:
        asyncio.get_running_loop().set_default_executor(Counting(2))
        store = open_store(config)
        await store.put(record("a"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing, for as long as it likes
        try:
            started = time.monotonic()
            puts = [store.put(record(f"b{i}")) for i in range(8)]
            results = await asyncio.gather(*puts, return_exceptions=True)
            elapsed = time.monotonic() - started
            assert all(isinstance(r, StoreUnavailable) for r in results), results
            assert elapsed < 2.0  # each gave up after 0.3 s (not 30 s, not 8 x 0.3 s)
            got = await store.get("a")  # a read goes on (WAL) beside the stuck writes
            assert got is not None
        finally:
            other.execute("ROLLBACK")
            other.close()
        await store.put(record("c"))
        assert await store.get("c") is not None
        assert Counting.submitted == 0
        await store.aclose()

    asyncio.run(run())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_deleted_response_is_not_stored_again(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue 23 finding 9: a background run still going stored its deleted response back
    (GET answered 404, then 200 again). A delete is remembered; a later put of the id is
    refused."""

    async def run(store: Any) -> None:
        await store.put(record("bg", size=10))
        assert await store.delete("bg")
        await store.put(record("bg", size=20))  # the run's next state
        assert await store.get("bg") is None
        await store.put(record("fresh"))
        assert await store.get("fresh") is not None
        await store.aclose()

    if kind == "sqlite":
        asyncio.run(run(SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20)))
    else:
        from gateway.store.redis import RedisStore

        server = request.getfixturevalue("redis")
        asyncio.run(run(RedisStore(server.url, ttl_s=60, max_bytes=1 << 20)))


@pytest.mark.timeout(10)
def test_the_sqlite_store_is_private(tmp_path: Path) -> None:
    """Issue 23 finding 9: the store's file and folder were world-readable (0644 / 0755),
    every tenant's conversations in them; created 0600 and 0700."""
    import stat

    async def run() -> None:
        store = SQLiteStore(tmp_path / "state" / "s.db", ttl_s=60, max_bytes=1 << 20)
        await store.put(record("a"))
        await store.aclose()

    asyncio.run(run())
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("s.db", "s.db-wal", "s.db-shm"):
        file = tmp_path / "state" / name
        if file.exists():
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, name


async def _same_second_newest_first(store: Any) -> None:
    """Responses made in one second (``created_at`` is whole seconds) list newest first:
    ids sort by creation time."""
    now = int(time.time())
    ids = ["resp_" + ordered_hex() for _ in range(6)]
    for rid in ids:
        await store.put(replace(record(rid, owner="alice"), created_at=now))
    assert [r.id for r in await store.owned("alice", 10)] == ids[::-1]
    first = await store.owned("alice", 3)  # and page on from the last one listed
    assert [r.id for r in first + await store.owned("alice", 10, first[-1].id)] == ids[::-1]
    await store.aclose()


def test_sqlite_lists_same_second_responses_newest_first(tmp_path: Path) -> None:
    asyncio.run(
        _same_second_newest_first(SQLiteStore(tmp_path / "s.db", ttl_s=60, max_bytes=1 << 20))
    )


def test_redis_lists_same_second_responses_newest_first(redis: RedisServer) -> None:
    from gateway.store.redis import RedisStore

    asyncio.run(_same_second_newest_first(RedisStore(redis.url, ttl_s=60, max_bytes=1 << 20)))
