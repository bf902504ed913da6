"""What a limiter decides, and the in-memory limiter (one process)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Reason = Literal["requests", "tokens", "concurrency"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective limits for one request; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_requests: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.concurrent_requests)


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket after the decision, for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: float
    #: Seconds until the bucket is full again.
    reset_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason | None = None
    retry_after_s: float = 0.0
    requests: BucketState | None = None
    tokens: BucketState | None = None


def bucket_state(limit: int, level: float) -> BucketState:
    return BucketState(limit, max(0.0, level), max(0.0, (limit - level) * 60.0 / limit))


def refusal(limits: Limits, req_level: float, tok_level: float, in_flight: int) -> Reason | None:
    """Why a request must wait, given the buckets before it takes anything (None: it may go).

    The Redis script implements the same rule.
    """
    if limits.requests_per_minute and req_level < 1:
        return "requests"
    if limits.tokens_per_minute and tok_level <= 0:
        return "tokens"
    if limits.concurrent_requests and in_flight >= limits.concurrent_requests:
        return "concurrency"
    return None


def decision(
    limits: Limits, reason: Reason | None, req_level: float, tok_level: float, reserve: int
) -> Decision:
    """The decision and bucket states (after the request took its share, if it was allowed)."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    retry = 0.0
    if reason == "requests":
        retry = (1 - req_level) * 60.0 / rpm
    elif reason == "tokens":
        retry = -tok_level * 60.0 / tpm
    elif reason == "concurrency":
        retry = 1.0
    else:
        req_level, tok_level = req_level - 1, tok_level - reserve
    return Decision(
        allowed=reason is None,
        reason=reason,
        retry_after_s=retry,
        requests=bucket_state(rpm, req_level) if rpm else None,
        tokens=bucket_state(tpm, tok_level) if tpm else None,
    )


class Limiter(Protocol):
    async def acquire(
        self, bucket: str, limits: Limits, reserve_tokens: int, request_id: str
    ) -> Decision:
        """Decide; if allowed, take one request, ``reserve_tokens`` tokens and a slot."""
        ...

    async def settle(self, bucket: str, limits: Limits, request_id: str, extra_tokens: int) -> None:
        """The request ended: charge ``extra_tokens`` more (negative: refund), free its slot."""
        ...

    async def renew(self, bucket: str, limits: Limits, request_ids: list[str]) -> None:
        """Keep these requests' concurrency slots (where slots expire)."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class _Bucket:
    """A token bucket that refills ``capacity`` per minute; it may go into debt (tokens)."""

    level: float
    updated: float

    def refill(self, now: float, capacity: int) -> float:
        self.level = min(float(capacity), self.level + (now - self.updated) * capacity / 60.0)
        self.updated = now
        return self.level


@dataclass
class _Caller:
    requests: _Bucket
    tokens: _Bucket
    in_flight: set[str] = field(default_factory=set)


class MemoryLimiter:
    """Buckets in this process's memory: exact for one gateway, not shared between replicas."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._callers: dict[str, _Caller] = {}

    def _caller(self, bucket: str, limits: Limits) -> _Caller:
        caller = self._callers.get(bucket)
        if caller is None:
            now = self._clock()
            caller = _Caller(
                _Bucket(limits.requests_per_minute, now), _Bucket(limits.tokens_per_minute, now)
            )
            self._callers[bucket] = caller
        return caller

    async def acquire(
        self, bucket: str, limits: Limits, reserve_tokens: int, request_id: str
    ) -> Decision:
        caller = self._caller(bucket, limits)
        now = self._clock()
        req = caller.requests.refill(now, limits.requests_per_minute)
        tok = caller.tokens.refill(now, limits.tokens_per_minute)
        reason = refusal(limits, req, tok, len(caller.in_flight))
        if reason is None:
            caller.requests.level -= 1
            caller.tokens.level -= reserve_tokens
            if limits.concurrent_requests:
                caller.in_flight.add(request_id)
        return decision(limits, reason, req, tok, reserve_tokens)

    async def settle(self, bucket: str, limits: Limits, request_id: str, extra_tokens: int) -> None:
        caller = self._callers.get(bucket)
        if caller is None:
            return
        caller.in_flight.discard(request_id)
        if limits.tokens_per_minute and extra_tokens:
            caller.tokens.refill(self._clock(), limits.tokens_per_minute)
            caller.tokens.level = min(
                float(limits.tokens_per_minute), caller.tokens.level - extra_tokens
            )

    async def renew(self, bucket: str, limits: Limits, request_ids: list[str]) -> None:
        """Slots held in memory never expire."""

    async def aclose(self) -> None:
        self._callers.clear()


def format_duration(seconds: float) -> str:
    """OpenAI's style for ``x-ratelimit-reset-*``: ``250ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


class LimiterUnavailable(Exception):
    """The shared store cannot be reached; the message is safe to log (no credentials)."""
