"""Stored responses in Redis, shared by every gateway pointed at it: one hash per response
with the store's TTL, one key per item id naming its response (same TTL); for the
``max_bytes`` bound, a sorted set of ids by age, each id's size
and their total (expired records are the oldest, so they are the first reclaimed)."""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import ConfigError
from gateway.store.base import StoredResponse

_FIELDS = ("owner", "created_at", "response", "input_items", "context", "root")


class RedisStore:
    def __init__(
        self, url: str, ttl_s: float, max_bytes: int, prefix: str = "gateway:responses"
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError(
                "[responses]", ["redis_url needs the redis extra: pip install 'gateway[redis]'"]
            ) from None
        self._redis: Any = aioredis.from_url(url, decode_responses=True)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.prefix = prefix

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:{response_id}"

    def _item_key(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}"

    async def put(self, record: StoredResponse) -> None:
        mapping = {
            "owner": record.owner or "",
            "created_at": str(record.created_at),
            "response": record.response,
            "input_items": record.input_items,
            "context": record.context,
            "root": record.root,
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(record.id), mapping=mapping)
            pipe.expire(self._key(record.id), int(self.ttl_s))
            for item_id in record.item_ids:
                pipe.set(self._item_key(item_id), record.id, ex=int(self.ttl_s))
            pipe.zadd(f"{self.prefix}:by-age", {record.id: time.time()})
            pipe.hset(f"{self.prefix}:sizes", record.id, record.size)
            pipe.incrby(f"{self.prefix}:bytes", record.size)
            await pipe.execute()
        await self._bound()

    async def _bound(self) -> None:
        """The oldest records go while the total is over ``max_bytes`` (expired ones too)."""
        total = int(await self._redis.get(f"{self.prefix}:bytes") or 0)
        while total > self.max_bytes:
            oldest = await self._redis.zpopmin(f"{self.prefix}:by-age")
            if not oldest:
                break
            total = await self._forget(oldest[0][0])

    async def get(self, response_id: str) -> StoredResponse | None:
        values = await self._redis.hmget(self._key(response_id), *_FIELDS)
        if values[2] is None:
            return None
        owner, created, response, items, context, root = values
        return StoredResponse(
            response_id, owner or None, int(created), response, items, context, root or ""
        )

    async def find_item(self, item_id: str) -> StoredResponse | None:
        """Its response, if that is still stored (an item key outliving its deleted or
        evicted response names nothing)."""
        response_id = await self._redis.get(self._item_key(item_id))
        return None if response_id is None else await self.get(response_id)

    async def _forget(self, response_id: str) -> int:
        """Delete a record and its bookkeeping; the new total of bytes."""
        size = int(await self._redis.hget(f"{self.prefix}:sizes", response_id) or 0)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(response_id))
            pipe.zrem(f"{self.prefix}:by-age", response_id)
            pipe.hdel(f"{self.prefix}:sizes", response_id)
            pipe.decrby(f"{self.prefix}:bytes", size)
            *_, total = await pipe.execute()
        return int(total)

    async def delete(self, response_id: str) -> bool:
        exists = bool(await self._redis.exists(self._key(response_id)))
        await self._forget(response_id)
        return exists

    async def aclose(self) -> None:
        await self._redis.aclose()
