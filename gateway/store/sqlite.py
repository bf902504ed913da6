"""Stored responses in one SQLite file (WAL mode: readers never wait for the writer; several
gateway processes may share the file). Every call runs in one of the store's own few worker
threads (each with its connection), never on the event loop nor in asyncio's default pool, and
waits at most ``timeout_s`` (a file another process keeps locked is a ``TimeoutError`` or a
"database is locked" error then, which the guarded store answers with a 503): a stuck store
never holds threads the rest of the server needs. Expired records are purged at open and then
every ``purge_every_s``; past ``max_bytes`` the oldest records go first. A deleted id is
remembered for a while (``deleted``): a later put of it (a background run still going) is
refused, so a delete is never undone. The file is created private (0600, its folder 0700)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.store.base import StoredResponse

log = logging.getLogger("gateway.store")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT,
    created_at INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    context TEXT NOT NULL,
    root TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires_at);
CREATE INDEX IF NOT EXISTS responses_by_owner ON responses (owner, created_at, id);
CREATE TABLE IF NOT EXISTS owned_items (
    owner TEXT NOT NULL,
    item_id TEXT NOT NULL,
    response_id TEXT NOT NULL,
    PRIMARY KEY (owner, item_id)
);
CREATE INDEX IF NOT EXISTS owned_items_by_response ON owned_items (response_id);
CREATE TABLE IF NOT EXISTS deleted (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
"""
_COLUMNS = "id, owner, created_at, response, input_items, context, root"
_ORPHANS = "DELETE FROM owned_items WHERE response_id NOT IN (SELECT id FROM responses)"
#: An index of items from before they were scoped by owner (one id for every owner).
_OLD_ITEMS = """
INSERT OR IGNORE INTO owned_items
    SELECT COALESCE(r.owner, ''), i.item_id, i.response_id
    FROM items i JOIN responses r ON r.id = i.response_id;
DROP TABLE items;
"""
#: How long a deleted id is remembered at most (a background run outliving its delete).
TOMBSTONE_S = 86400.0
#: Worker threads of one store (each with its own connection: reads go on while a write
#: waits for another process's lock).
THREADS = 4


def _setup(db: sqlite3.Connection, timeout_s: float) -> None:
    """WAL mode and the schema. Switching the journal mode needs the file to itself for a
    moment, and SQLite answers "locked" at once rather than waiting when another process
    holds it: retried for up to ``timeout_s``."""
    attempts = max(1, int(timeout_s / 0.05))
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'"
            if db.execute(old).fetchone():
                db.executescript(_OLD_ITEMS)
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def _create_private(path: Path) -> None:
    """The folder (0700 if this creates it) and the file (0600) before SQLite opens it; its
    ``-wal`` and ``-shm`` files take the file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


async def _in_thread(fn: Callable[[], None]) -> None:
    """``fn`` in a thread of its own (closing: the store's pool is being shut down)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            fn()
        except BaseException as err:
            loop.call_soon_threadsafe(done.set_exception, err)
        else:
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=target, name="gateway-store-close", daemon=True).start()
    await done


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        ttl_s: float,
        max_bytes: int,
        purge_every_s: float = 300.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.purge_every_s = purge_every_s
        #: The most a store call waits (for a lock another process holds, or for a thread).
        self.timeout_s = timeout_s
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        #: Guards the connections' list and the counters below (the workers share them).
        self._lock = threading.Lock()
        self._opened = False
        self._purged_at = 0.0
        #: The total size as last summed, plus what this process wrote since (other processes'
        #: writes show at the next sum): the table is summed only when this may be over.
        self._estimate: int | None = None

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (opened, and the file set up, on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            with self._lock:
                first = not self._opened
                if first:
                    _create_private(self.path)
                db = sqlite3.connect(self.path, check_same_thread=False, timeout=self.timeout_s)
                self._connections.append(db)
                self._opened = True
            _setup(db, self.timeout_s)
            self._local.db = db
            if first:
                log.info("stored responses in %s", self.path)
        return db

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="gateway-store")
        return self._pool

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one transaction in a store thread; a ``TimeoutError`` past
        ``timeout_s`` (a call still waiting for a thread is dropped then)."""

        def call() -> T:
            db = self._connect()
            with db:  # one transaction
                return fn(db)

        future = asyncio.wrap_future(self._executor().submit(call))
        return await asyncio.wait_for(future, self.timeout_s)

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` (replacing its earlier state), unless its id was deleted."""
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            deleted = db.execute(
                "SELECT 1 FROM deleted WHERE id = ? AND expires_at >= ?", (record.id, now)
            ).fetchone()
            if deleted:
                log.debug("response %s was deleted: not stored again", record.id)
                return
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.owner, record.created_at, now + self.ttl_s, record.size,
                    record.response, record.input_items, record.context, record.root,
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT OR REPLACE INTO owned_items VALUES (?, ?, ?)",
                [(record.owner or "", item_id, record.id) for item_id in record.item_ids],
            )
            with self._lock:
                estimate = self._estimate
                self._estimate = None if estimate is None else estimate + record.size
                purge = now - self._purged_at > self.purge_every_s
                if purge:
                    self._purged_at = now
            if estimate is None or estimate + record.size > self.max_bytes:
                self._bound(db)
            if purge:
                db.execute("DELETE FROM responses WHERE expires_at < ?", (now,))
                db.execute(_ORPHANS)
                db.execute("DELETE FROM deleted WHERE expires_at < ?", (now,))

        await self._run(write)

    def _bound(self, db: sqlite3.Connection) -> None:
        """Over ``max_bytes``, delete the oldest records down to 90% of it (so that a store
        at its cap sums its table once per tenth of the cap written, not on every write)."""
        (total,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()
        if total > self.max_bytes:
            target = self.max_bytes * 9 // 10
            doomed = []
            rows = db.execute("SELECT id, size FROM responses ORDER BY created_at, rowid")
            for rid, size in rows:
                if total <= target:
                    break
                doomed.append((rid,))
                total -= size
            db.executemany("DELETE FROM responses WHERE id = ?", doomed)
            db.executemany("DELETE FROM owned_items WHERE response_id = ?", doomed)
        with self._lock:
            self._estimate = total

    async def get(self, response_id: str) -> StoredResponse | None:
        def read(db: sqlite3.Connection) -> StoredResponse | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM responses WHERE id = ? AND expires_at >= ?",
                (response_id, time.time()),
            ).fetchone()
            return StoredResponse(*row) if row else None

        return await self._run(read)

    async def find_item(self, owner: str | None, item_id: str) -> StoredResponse | None:
        columns = ", ".join(f"r.{c}" for c in _COLUMNS.split(", "))

        def read(db: sqlite3.Connection) -> StoredResponse | None:
            row = db.execute(
                f"SELECT {columns} FROM owned_items i JOIN responses r ON r.id = i.response_id "
                "WHERE i.owner = ? AND i.item_id = ? AND r.expires_at >= ?",
                (owner or "", item_id, time.time()),
            ).fetchone()
            return StoredResponse(*row) if row else None

        return await self._run(read)

    async def owned(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> list[StoredResponse]:
        listed = "id, owner, created_at, response, input_items, '', root"

        def read(db: sqlite3.Connection) -> list[StoredResponse]:
            now = time.time()
            where, args = "owner IS ? AND expires_at >= ?", [owner, now]
            if after is not None:
                mark = db.execute(
                    "SELECT created_at FROM responses WHERE id = ? AND owner IS ?", (after, owner)
                ).fetchone()
                if mark is None:
                    return []
                where += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [mark[0], mark[0], after]
            rows = db.execute(
                f"SELECT {listed} FROM responses WHERE {where} "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*args, limit),
            )
            return [StoredResponse(*row) for row in rows]

        return await self._run(read)

    async def delete(self, response_id: str) -> bool:
        """Delete the record, and remember its id so that nothing stores it again."""
        until = time.time() + min(self.ttl_s, TOMBSTONE_S)

        def remove(db: sqlite3.Connection) -> bool:
            db.execute("INSERT OR REPLACE INTO deleted VALUES (?, ?)", (response_id, until))
            db.execute("DELETE FROM owned_items WHERE response_id = ?", (response_id,))
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

        return await self._run(remove)

    async def aclose(self) -> None:
        """Wait for the calls running, then close every connection (a later call opens the
        store again)."""
        pool, self._pool = self._pool, None

        def close() -> None:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                connections, self._connections = self._connections, []
                self._local = threading.local()
            for db in connections:
                db.close()

        await _in_thread(close)
