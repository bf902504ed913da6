"""Stored responses in Redis, shared by every gateway pointed at it: one hash per response
with the store's TTL, one key per owner and item id naming its response (same TTL); for the
``max_bytes`` bound, a sorted set of ids by age, each id's size and their total (expired
records are the oldest, so they are the first reclaimed).

A put and a delete are each one Lua script, so the total stays the sum of the sizes however
often a record is stored again (a background response is stored as queued, in progress and
done) and whatever other gateways do meanwhile. A delete leaves a marker for a while, and a
put of a deleted id is refused: a background run still going never stores it back. Every
call waits at most ``timeout_s`` (connecting, then each reply)."""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.errors import ConfigError
from gateway.store.base import StoredResponse

log = logging.getLogger("gateway.store")

_FIELDS = ("owner", "created_at", "response", "input_items", "context", "root")
#: How long a deleted id is remembered at most (a background run outliving its delete).
TOMBSTONE_S = 86400

# KEYS: record, by-age, sizes, bytes, tombstone, item keys...
# ARGV: id, ttl, now, size, then the record's fields in _FIELDS order
# -> the new total, or -1 if the id was deleted (nothing written)
_PUT = """
if redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
redis.call('HSET', KEYS[1], 'owner', ARGV[5], 'created_at', ARGV[6], 'response', ARGV[7],
           'input_items', ARGV[8], 'context', ARGV[9], 'root', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[2])
for i = 6, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return redis.call('INCRBY', KEYS[4], tonumber(ARGV[4]) - old)
"""

# KEYS: record, by-age, sizes, bytes[, tombstone]   ARGV: id[, tombstone ttl]
# -> {existed, the new total}
_FORGET = """
local existed = redis.call('EXISTS', KEYS[1])
if KEYS[5] then redis.call('SET', KEYS[5], '1', 'EX', ARGV[2]) end
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return {existed, redis.call('DECRBY', KEYS[4], size)}
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_bytes: int,
        prefix: str = "gateway:responses",
        timeout_s: float = 5.0,
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError(
                "[responses]", ["redis_url needs the redis extra: pip install 'gateway[redis]'"]
            ) from None
        self._redis: Any = aioredis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._put = self._redis.register_script(_PUT)
        self._forget_script = self._redis.register_script(_FORGET)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.prefix = prefix

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:{response_id}"

    def _item_key(self, owner: str | None, item_id: str) -> str:
        """Item ids are the client's: each owner has its own (an owner's name has no ':')."""
        return f"{self.prefix}:item:{owner or ''}:{item_id}"

    def _owner_key(self, owner: str | None) -> str:
        """The owner's ids by ``created_at`` (a listing; ids whose record is gone are dropped
        when met)."""
        return f"{self.prefix}:owner:{owner or ''}"

    def _tombstone(self, response_id: str) -> str:
        return f"{self.prefix}:deleted:{response_id}"

    def _books(self, response_id: str) -> list[str]:
        """The record's key and the bound's: by age, sizes, total."""
        p = self.prefix
        return [self._key(response_id), f"{p}:by-age", f"{p}:sizes", f"{p}:bytes"]

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` (its earlier size replaced by its new one), unless it was deleted."""
        keys = [
            *self._books(record.id),
            self._tombstone(record.id),
            *(self._item_key(record.owner, item_id) for item_id in record.item_ids),
        ]
        ttl = max(1, int(self.ttl_s))
        args: list[str | int | float] = [
            record.id, ttl, time.time(), record.size,
            record.owner or "", str(record.created_at), record.response, record.input_items,
            record.context, record.root,
        ]  # fmt: skip
        total = int(await self._put(keys=keys, args=args))
        if total < 0:
            log.debug("response %s was deleted: not stored again", record.id)
            return
        owner_key = self._owner_key(record.owner)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(owner_key, {record.id: record.created_at})
            pipe.expire(owner_key, ttl)
            await pipe.execute()
        if total > self.max_bytes:
            await self._bound()

    async def _bound(self) -> None:
        """The oldest records go while the total is over ``max_bytes`` (expired ones too)."""
        total = int(await self._redis.get(f"{self.prefix}:bytes") or 0)
        while total > self.max_bytes:
            oldest = await self._redis.zpopmin(f"{self.prefix}:by-age")
            if not oldest:
                break
            _, total = await self._forget(oldest[0][0])

    async def get(self, response_id: str) -> StoredResponse | None:
        values = await self._redis.hmget(self._key(response_id), *_FIELDS)
        if values[2] is None:
            return None
        owner, created, response, items, context, root = values
        return StoredResponse(
            response_id, owner or None, int(created), response, items, context, root or ""
        )

    async def find_item(self, owner: str | None, item_id: str) -> StoredResponse | None:
        """Its response, if that is still stored (an item key outliving its deleted or
        evicted response names nothing)."""
        response_id = await self._redis.get(self._item_key(owner, item_id))
        return None if response_id is None else await self.get(response_id)

    async def owned(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> list[StoredResponse]:
        key = self._owner_key(owner)
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(key, after)
            if rank is None:
                return []
            start = rank + 1
        found: list[StoredResponse] = []
        while len(found) < limit:
            ids = await self._redis.zrevrange(key, start, start + limit - 1)
            if not ids:
                break
            start += len(ids)
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hmget(self._key(rid), *_FIELDS)
                rows = await pipe.execute()
            gone = []
            for rid, (own, created, response, items, _, root) in zip(ids, rows, strict=True):
                if response is None or (own or None) != owner:
                    gone.append(rid)
                else:
                    found.append(
                        StoredResponse(rid, owner, int(created), response, items, "", root)
                    )
            if gone:
                await self._redis.zrem(key, *gone)
                start -= len(gone)
        return found[:limit]

    async def _forget(self, response_id: str, *, deleted: bool = False) -> tuple[bool, int]:
        """Delete a record and its bookkeeping (remembering a ``deleted`` id): whether it
        existed, and the new total of bytes."""
        keys = self._books(response_id)
        args: list[str | int] = [response_id]
        if deleted:
            keys.append(self._tombstone(response_id))
            args.append(max(1, int(min(self.ttl_s, TOMBSTONE_S))))
        existed, total = await self._forget_script(keys=keys, args=args)
        return bool(existed), int(total)

    async def delete(self, response_id: str) -> bool:
        existed, _ = await self._forget(response_id, deleted=True)
        return existed

    async def aclose(self) -> None:
        await self._redis.aclose()
