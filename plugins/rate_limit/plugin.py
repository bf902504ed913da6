"""The rate-limit hooks: take from the caller's buckets before admission, settle at the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import GatewayConfig, PluginConfig
from gateway.errors import GatewayError, RateLimited
from gateway.plugins import Plugin, RateLimits, RequestContext, ResponseEnd
from gateway.pool import ModelPool
from gateway.types import ClientRequest, GenerationRequest
from plugins.rate_limit.config import RateLimitConfig
from plugins.rate_limit.limiter import (
    Decision,
    Limiter,
    LimiterUnavailable,
    Limits,
    MemoryLimiter,
    format_duration,
)

log = logging.getLogger("plugins.rate_limit")

#: The bucket of requests without a principal (no key name can look like this).
ANONYMOUS = "~anonymous"
#: After the store failed, requests skip it this long (no timeout paid per request).
RETRY_STORE_AFTER_S = 1.0
#: Characters per token a prompt not yet tokenized is estimated at (English text runs about
#: 4; what it really took is settled when the request ends).
CHARS_PER_TOKEN = 4

_UNITS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent requests",
}


class RateLimiterUnavailable(GatewayError):
    """Redis is unreachable and the plugin is configured to fail closed."""

    status = 503
    type = "server_error"
    default_code = "rate_limiter_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "Rate limiting is unavailable, so requests are refused; try again shortly.",
            headers={"Retry-After": "1"},
        )


#: Where the buckets live: changing any of these needs a restart.
_STORE_FIELDS = ("redis_url", "redis_timeout_s", "redis_key_prefix", "redis_lease_s")


@dataclass(frozen=True, slots=True)
class _Held:
    """What an admitted request took, to settle when it ends."""

    bucket: str
    limits: Limits
    reserve: int


def _prompt_chars(generation: GenerationRequest) -> int:
    """The characters of a prompt: its text, its messages' and the tools it offers."""
    chars = len(generation.prompt or "")
    for m in generation.messages or ():
        chars += len(m.content) + len(m.reasoning or "")
        chars += sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    if generation.tools is not None:
        chars += sum(
            len(t.name) + len(t.description) + len(t.parameters) for t in generation.tools.offered
        )
    return chars


def prompt_estimate(request: ClientRequest) -> int:
    """The request's prompt tokens as far as they are known before admission: counted where
    tokenized (or given as tokens), else estimated from the text; once per distinct prompt
    (the ``n`` choices of one prompt share it), as usage counts them."""
    total = 0
    for generation in request.generations[:: max(1, request.choices_per_prompt)]:
        if generation.tokenized is not None:
            total += generation.tokenized.count
        elif generation.prompt_tokens is not None:
            total += len(generation.prompt_tokens)
        else:
            total += _prompt_chars(generation) // CHARS_PER_TOKEN
    return total


def _pick(granted: int | None, default: int) -> int:
    return default if granted is None else granted


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    headers = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(state.remaining))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
    return headers


def _refusal_message(bucket: str, decision: Decision, limits: Limits) -> str:
    assert decision.reason is not None
    limit = {
        "requests": limits.requests_per_minute,
        "tokens": limits.tokens_per_minute,
        "concurrency": limits.concurrent_requests,
    }[decision.reason]
    who = "anonymous requests" if bucket == ANONYMOUS else f"API key {bucket!r}"
    return (
        f"Rate limit reached for {who}: {limit} {_UNITS[decision.reason]}. "
        f"Try again in {format_duration(max(decision.retry_after_s, 0.001))}."
    )


class RateLimitPlugin(Plugin):
    def __init__(self, config: RateLimitConfig, limiter: Limiter, where: str = "memory") -> None:
        self.config = config
        self._limiter = limiter
        self._where = where
        self._held: dict[str, _Held] = {}
        self._healthy = True
        self._skip_store_until = 0.0
        self._renewer: asyncio.Task[None] | None = None

    def prepare_reconfigure(
        self, config: PluginConfig, gateway: GatewayConfig
    ) -> Callable[[], None] | None:
        """New default limits and ``on_redis_error`` apply in place (requests already admitted
        settle with the limits they were admitted under); a different store needs a restart."""
        assert isinstance(config, RateLimitConfig)
        if any(getattr(config, f) != getattr(self.config, f) for f in _STORE_FIELDS):
            return None

        def apply() -> None:
            self.config = config

        return apply

    def limits_for(self, granted: RateLimits | None) -> Limits:
        g, c = granted or RateLimits(), self.config
        return Limits(
            requests_per_minute=_pick(g.requests_per_minute, c.requests_per_minute),
            tokens_per_minute=_pick(g.tokens_per_minute, c.tokens_per_minute),
            concurrent_requests=_pick(g.concurrent_requests, c.concurrent_requests),
        )

    async def startup(self) -> None:
        if self.config.redis_url is not None:
            self._renewer = asyncio.create_task(self._renew_leases(), name="renew rate slots")
        log.info("rate limits kept in %s", self._where)

    async def shutdown(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._limiter.aclose()

    async def on_request(self, ctx: RequestContext, request: ClientRequest) -> None:
        limits = self.limits_for(ctx.limits)
        if limits.unlimited:
            return
        bucket = ctx.principal or ANONYMOUS
        reserve = 0
        if limits.tokens_per_minute:  # the prompt and the most it may generate, settled at the end
            reserve = prompt_estimate(request) + sum(g.max_tokens or 0 for g in request.generations)
        if time.monotonic() < self._skip_store_until:
            return self._without_store()
        try:
            decision = await self._limiter.acquire(bucket, limits, reserve, ctx.request_id)
        except LimiterUnavailable as err:
            self._unavailable(err)
            return self._without_store()
        self._available()
        ctx.response_headers.update(rate_limit_headers(decision))
        if not decision.allowed:
            raise RateLimited(
                _refusal_message(bucket, decision, limits), retry_after_s=decision.retry_after_s
            )
        self._held[ctx.request_id] = _Held(bucket, limits, reserve)

    async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
        held = self._held.pop(ctx.request_id, None)
        if held is None:
            return
        extra = end.usage.total_tokens - held.reserve
        try:
            await self._limiter.settle(held.bucket, held.limits, ctx.request_id, extra)
        except LimiterUnavailable as err:  # the slot's lease runs out by itself
            self._unavailable(err)

    def _without_store(self) -> None:
        """The store is down: let the request through unlimited, or refuse it."""
        if self.config.on_redis_error == "closed":
            raise RateLimiterUnavailable()

    def _unavailable(self, err: LimiterUnavailable) -> None:
        self._skip_store_until = time.monotonic() + RETRY_STORE_AFTER_S
        if not self._healthy:
            return
        self._healthy = False
        if self.config.on_redis_error == "open":
            verdict = "failing OPEN: requests pass without rate limits"
        else:
            verdict = "failing CLOSED: requests are refused with 503"
        log.error("rate limiter unavailable (%s); %s until it is back", err, verdict)

    def _available(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("rate limiter reachable again at %s: limits enforced", self._where)

    async def _renew_leases(self) -> None:
        """Keep this replica's in-flight requests' slots in Redis alive."""
        while True:
            await asyncio.sleep(self.config.redis_lease_s / 3)
            running: dict[tuple[str, Limits], list[str]] = defaultdict(list)
            for request_id, held in list(self._held.items()):
                if held.limits.concurrent_requests:
                    running[held.bucket, held.limits].append(request_id)
            for (bucket, limits), ids in running.items():
                try:
                    await self._limiter.renew(bucket, limits, ids)
                except LimiterUnavailable as err:
                    self._unavailable(err)
                    break


class RateLimitFactory:
    config_type = RateLimitConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> RateLimitPlugin:
        assert isinstance(config, RateLimitConfig)
        if config.redis_url is None:
            return RateLimitPlugin(config, MemoryLimiter())
        from plugins.rate_limit.redis_limiter import RedisLimiter

        limiter = RedisLimiter(
            config.redis_url, config.redis_key_prefix, config.redis_timeout_s, config.redis_lease_s
        )
        return RateLimitPlugin(config, limiter, where=f"Redis at {limiter.where}")
