"""Stored responses (``/v1/responses`` with ``store``): one record per response, in an
embedded SQLite file (:mod:`gateway.store.sqlite`) or in Redis shared by several gateways
(:mod:`gateway.store.redis`)."""

from __future__ import annotations

from gateway.config import ResponsesConfig
from gateway.store.base import ResponseStore, StoredResponse


def open_store(config: ResponsesConfig) -> ResponseStore:
    """The configured store (opened lazily, on first use)."""
    if config.redis_url:
        from gateway.store.redis import RedisStore

        return RedisStore(config.redis_url, config.ttl_s, config.max_bytes)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(config.sqlite_path(), config.ttl_s, config.max_bytes)


__all__ = ["ResponseStore", "StoredResponse", "open_store"]
