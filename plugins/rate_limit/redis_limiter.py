"""Buckets in Redis, shared by every gateway replica; each step is one atomic Lua script.

Time is Redis's own clock (``TIME``), so replicas with skewed clocks agree. Per caller there
are three keys, with a hash tag so that a cluster keeps them on one node:
``<prefix>:{<caller>}:req`` and ``...:tok`` (hashes: level and last update) and ``...:run``
(a sorted set of in-flight request ids scored by their lease's expiry). Every key expires by
itself once it holds nothing a fresh key would not.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from plugins.rate_limit.limiter import Decision, LimiterUnavailable, Limits, Reason, decision

if TYPE_CHECKING:
    from redis.asyncio import Redis

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  local l = tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60
  if l > cap then l = cap end
  return l
end
local function store(key, l, cap)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  redis.call('EXPIRE', key, math.ceil((cap - l) * 60 / cap) + 1)
end
"""

# KEYS: req, tok, run. ARGV: rpm, tpm, concurrency, reserve, request id, lease seconds.
# Returns {reason or '', request level, token level} (levels before this request took any).
_ACQUIRE = (
    _PRELUDE
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, lease = tonumber(ARGV[4]), tonumber(ARGV[6])
local req, tok = 0, 0
if rpm > 0 then req = level(KEYS[1], rpm) end
if tpm > 0 then tok = level(KEYS[2], tpm) end
local reason = ''
if rpm > 0 and req < 1 then
  reason = 'requests'
elseif tpm > 0 and tok <= 0 then
  reason = 'tokens'
elseif conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then reason = 'concurrency' end
end
if reason == '' then
  if rpm > 0 then store(KEYS[1], req - 1, rpm) end
  if tpm > 0 and reserve > 0 then store(KEYS[2], tok - reserve, tpm) end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
    redis.call('EXPIRE', KEYS[3], math.ceil(lease) + 1)
  end
end
return {reason, tostring(req), tostring(tok)}
"""
)

# KEYS: tok, run. ARGV: tpm, extra tokens (negative: refund), request id.
_SETTLE = (
    _PRELUDE
    + """
local tpm, extra = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and extra ~= 0 then
  local l = level(KEYS[1], tpm) - extra
  if l > tpm then l = tpm end
  store(KEYS[1], l, tpm)
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""
)

# KEYS: run. ARGV: lease seconds, request ids...
_RENEW = (
    _PRELUDE
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 1)
return 1
"""
)


def redacted(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://host:6379/0`` (for logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="").geturl()


class RedisLimiter:
    def __init__(self, url: str, key_prefix: str, timeout_s: float, lease_s: float) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.where = redacted(url)
        self._prefix = key_prefix
        self._lease_s = lease_s
        # One retry on a fresh connection (a pooled one dies when Redis restarts). A script that
        # timed out after running would then be charged twice: stricter, never laxer.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._settle = self._redis.register_script(_SETTLE)
        self._renew = self._redis.register_script(_RENEW)

    def _keys(self, bucket: str) -> tuple[str, str, str]:
        base = f"{self._prefix}:{{{bucket}}}"
        return f"{base}:req", f"{base}:tok", f"{base}:run"

    async def _run(self, what: str, call: Awaitable[object]) -> object:
        from redis.exceptions import RedisError

        try:
            return await call
        except (RedisError, OSError) as err:
            raise LimiterUnavailable(
                f"Redis at {self.where} failed on {what}: {type(err).__name__}"
            ) from None

    async def acquire(
        self, bucket: str, limits: Limits, reserve_tokens: int, request_id: str
    ) -> Decision:
        args = (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_requests,
            reserve_tokens,
            request_id,
            self._lease_s,
        )
        reply = await self._run("acquire", self._acquire(keys=self._keys(bucket), args=args))
        raw_reason, req, tok = (x.decode() for x in cast("list[bytes]", reply))
        reason = cast("Reason", raw_reason) if raw_reason else None
        return decision(limits, reason, float(req), float(tok), reserve_tokens)

    async def settle(self, bucket: str, limits: Limits, request_id: str, extra_tokens: int) -> None:
        _, tok, run = self._keys(bucket)
        args = (limits.tokens_per_minute, extra_tokens, request_id)
        await self._run("settle", self._settle(keys=(tok, run), args=args))

    async def renew(self, bucket: str, limits: Limits, request_ids: list[str]) -> None:
        run = self._keys(bucket)[2]
        await self._run("renew", self._renew(keys=(run,), args=(self._lease_s, *request_ids)))

    async def aclose(self) -> None:
        await self._redis.aclose()
