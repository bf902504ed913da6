"""Stored responses (``/v1/responses`` with ``store``): one record per response, in an
embedded SQLite file (:mod:`gateway.store.sqlite`) or in Redis shared by several gateways
(:mod:`gateway.store.redis`)."""

from __future__ import annotations

import logging

from gateway.config import ResponsesConfig
from gateway.errors import StoreUnavailable
from gateway.store.base import ResponseStore, StoredResponse

log = logging.getLogger("gateway.store")


class GuardedStore:
    """A store whose failures (SQLite, OS and Redis errors alike) are a 503 naming the store,
    logged once each, never a 500 or a crash."""

    def __init__(self, inner: ResponseStore, where: str) -> None:
        self.inner = inner
        self.where = where

    def _unavailable(self, err: Exception) -> StoreUnavailable:
        log.error("the response store (%s) failed: %s", self.where, err)
        return StoreUnavailable(f"the response store is unavailable ({type(err).__name__})")

    async def put(self, record: StoredResponse) -> None:
        try:
            await self.inner.put(record)
        except Exception as err:
            raise self._unavailable(err) from err

    async def get(self, response_id: str) -> StoredResponse | None:
        try:
            return await self.inner.get(response_id)
        except Exception as err:
            raise self._unavailable(err) from err

    async def find_item(self, owner: str | None, item_id: str) -> StoredResponse | None:
        try:
            return await self.inner.find_item(owner, item_id)
        except Exception as err:
            raise self._unavailable(err) from err

    async def owned(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> list[StoredResponse]:
        try:
            return await self.inner.owned(owner, limit, after)
        except Exception as err:
            raise self._unavailable(err) from err

    async def delete(self, response_id: str) -> bool:
        try:
            return await self.inner.delete(response_id)
        except Exception as err:
            raise self._unavailable(err) from err

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        except Exception as err:
            log.warning("closing the response store (%s): %s", self.where, err)


def open_store(config: ResponsesConfig) -> ResponseStore:
    """The configured store (opened lazily, on first use)."""
    if config.redis_url:
        from gateway.store.redis import RedisStore

        redis = RedisStore(
            config.redis_url, config.ttl_s, config.max_bytes, timeout_s=config.timeout_s
        )
        return GuardedStore(redis, "redis")
    from gateway.store.sqlite import SQLiteStore

    path = config.sqlite_path()
    sqlite = SQLiteStore(path, config.ttl_s, config.max_bytes, timeout_s=config.timeout_s)
    return GuardedStore(sqlite, str(path))


__all__ = ["ResponseStore", "StoredResponse", "open_store"]
