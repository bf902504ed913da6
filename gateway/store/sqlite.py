"""Stored responses in one SQLite file (WAL mode: readers never wait for the writer; several
gateway processes may share the file). Every call runs in a worker thread, never on the
event loop. Expired records are purged at open and then every ``purge_every_s``; past
``max_bytes`` the oldest records go first."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
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
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    response_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_response ON items (response_id);
"""
_COLUMNS = "id, owner, created_at, response, input_items, context, root"
_ORPHANS = "DELETE FROM items WHERE response_id NOT IN (SELECT id FROM responses)"


def _setup(db: sqlite3.Connection, attempts: int = 50) -> None:
    """WAL mode and the schema. Switching the journal mode needs the file to itself for a
    moment, and SQLite answers "locked" at once rather than waiting when another process
    holds it: retried for up to a few seconds."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


class SQLiteStore:
    def __init__(
        self, path: Path, ttl_s: float, max_bytes: int, purge_every_s: float = 300.0
    ) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.purge_every_s = purge_every_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._purged_at = 0.0
        #: The total size as last summed, plus what this process wrote since (other processes'
        #: writes show at the next sum): the table is summed only when this may be over.
        self._estimate: int | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            _setup(db)
            self._db = db
            log.info("stored responses in %s", self.path)
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                db = self._connect()
                with db:  # one transaction
                    return fn(db)

        return await asyncio.to_thread(call)

    async def put(self, record: StoredResponse) -> None:
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.owner, record.created_at, now + self.ttl_s, record.size,
                    record.response, record.input_items, record.context, record.root,
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT OR REPLACE INTO items VALUES (?, ?)",
                [(item_id, record.id) for item_id in record.item_ids],
            )
            self._estimate = None if self._estimate is None else self._estimate + record.size
            if self._estimate is None or self._estimate > self.max_bytes:
                self._bound(db)
            if now - self._purged_at > self.purge_every_s:
                self._purged_at = now
                db.execute("DELETE FROM responses WHERE expires_at < ?", (now,))
                db.execute(_ORPHANS)

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
            db.executemany("DELETE FROM items WHERE response_id = ?", doomed)
        self._estimate = total

    async def get(self, response_id: str) -> StoredResponse | None:
        def read(db: sqlite3.Connection) -> StoredResponse | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM responses WHERE id = ? AND expires_at >= ?",
                (response_id, time.time()),
            ).fetchone()
            return StoredResponse(*row) if row else None

        return await self._run(read)

    async def find_item(self, item_id: str) -> StoredResponse | None:
        columns = ", ".join(f"r.{c}" for c in _COLUMNS.split(", "))

        def read(db: sqlite3.Connection) -> StoredResponse | None:
            row = db.execute(
                f"SELECT {columns} FROM items i JOIN responses r ON r.id = i.response_id "
                "WHERE i.item_id = ? AND r.expires_at >= ?",
                (item_id, time.time()),
            ).fetchone()
            return StoredResponse(*row) if row else None

        return await self._run(read)

    async def delete(self, response_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM items WHERE response_id = ?", (response_id,))
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

        return await self._run(remove)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)
