"""Rate limits shared through a real redis-server: two gateways, one limit; Redis down."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from gateway.testing import ServerThread
from plugins.rate_limit.limiter import Limits
from plugins.rate_limit.redis_limiter import RedisLimiter, redacted
from tests.plugins.helpers import SLOW_REPLY, chat, config, post, scripted, wait_for
from tests.support import RedisServer

pytest.importorskip("redis", reason="the 'redis' extra is not installed")


def redis_gateway(
    url: str, prefix: str, model: dict[str, Any] | None = None, **limits: Any
) -> ServerThread:
    table = {"redis_url": url, "redis_key_prefix": prefix, **limits}
    model = model or {"reply": SLOW_REPLY, "token_delay_s": 0.005}
    return ServerThread(config({"m": model}, plugins={"rate_limit": table}))


@contextmanager
def two_gateways(url: str, prefix: str, **limits: Any) -> Iterator[tuple[ServerThread, ...]]:
    with ExitStack() as stack:
        yield tuple(stack.enter_context(redis_gateway(url, prefix, **limits)) for _ in range(2))


def test_two_gateways_share_one_requests_limit(redis_server: RedisServer) -> None:
    with (
        two_gateways(redis_server.url, "t1", requests_per_minute=5) as gateways,
        concurrent.futures.ThreadPoolExecutor(6) as pool,
    ):
        responses = list(pool.map(lambda i: post(gateways[i % 2], chat(max_tokens=1)), range(16)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 11
    served_by = {r.headers["x-request-id"] for r in responses if r.status_code == 200}
    assert len(served_by) == 5
    # both replicas served and refused: the limit is one, not one per replica
    assert {i % 2 for i, c in enumerate(codes) if c == 429} == {0, 1}


def test_two_gateways_never_exceed_the_concurrency_limit(redis_server: RedisServer) -> None:
    limit = 2
    with two_gateways(redis_server.url, "t2", concurrent_requests=limit) as gateways:
        backends = [scripted(g) for g in gateways]
        peak = 0
        stop = threading.Event()

        def monitor() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sum(b.record.active for b in backends))
                time.sleep(0.0005)

        def client(i: int) -> list[int]:
            codes = []
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                codes.append(post(gateways[i % 2], chat(max_tokens=8)).status_code)
            return codes

        watcher = threading.Thread(target=monitor)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                codes = [c for batch in pool.map(client, range(6)) for c in batch]
        finally:
            stop.set()
            watcher.join()
    assert peak <= limit
    assert peak == limit  # the limit was reached, not merely unused
    assert codes.count(200) >= 4
    assert codes.count(429) >= 4
    assert set(codes) == {200, 429}
    assert all(b.record.active == 0 for b in backends)


def test_tokens_spent_on_one_gateway_count_on_the_other(redis_server: RedisServer) -> None:
    with two_gateways(redis_server.url, "t3", tokens_per_minute=50) as (a, b):
        first = post(a, chat())  # 3 prompt + 60 completion tokens: 13 in debt
        assert first.status_code == 200
        refused = post(b, chat())
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 15 <= int(refused.headers["retry-after"]) <= 17  # 13 tokens at 50 a minute


def test_streams_keep_their_slot_past_the_lease_and_free_it_on_cancel(
    redis_server: RedisServer,
) -> None:
    limits = {"concurrent_requests": 1, "redis_lease_s": 1}
    model = {"reply": "word " * 500, "token_delay_s": 0.01}  # a 5 s stream
    with redis_gateway(redis_server.url, "t4", model, **limits) as server:
        url = server.base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(stream=True)) as first:
            lines = first.iter_lines()
            next(lines)
            time.sleep(1.6)  # past the lease: renewals keep the slot
            assert post(server, chat(max_tokens=1)).status_code == 429
        wait_for(lambda: post(server, chat(max_tokens=1)).status_code == 200)


async def test_a_dead_replicas_slot_expires_with_its_lease(redis_server: RedisServer) -> None:
    limits = Limits(concurrent_requests=1)
    dead = RedisLimiter(redis_server.url, "t5", timeout_s=1.0, lease_s=1.0)
    alive = RedisLimiter(redis_server.url, "t5", timeout_s=1.0, lease_s=1.0)
    try:
        assert (await dead.acquire("k", limits, 0, "held-forever")).allowed
        refused = await alive.acquire("k", limits, 0, "r2")
        assert refused.reason == "concurrency"
        await asyncio.sleep(1.1)
        assert (await alive.acquire("k", limits, 0, "r3")).allowed
    finally:
        await dead.aclose()
        await alive.aclose()


def test_redis_down_fails_open_and_says_so(
    dead_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="plugins.rate_limit"),
        redis_gateway(dead_redis_url, "t6", requests_per_minute=1) as server,
    ):
        responses = [post(server, chat(max_tokens=1)) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]  # no limit while Redis is down
    assert "x-ratelimit-limit-requests" not in responses[0].headers
    outages = [r for r in caplog.records if "failing OPEN" in r.getMessage()]
    assert len(outages) == 1  # once per outage, not once per request
    assert outages[0].levelno == logging.ERROR


def test_redis_down_fails_closed_and_says_so(
    dead_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="plugins.rate_limit"),
        redis_gateway(
            dead_redis_url, "t7", requests_per_minute=100, on_redis_error="closed"
        ) as server,
    ):
        refused = post(server, chat(max_tokens=1))
        stream = post(server, chat(stream=True, max_tokens=1))
        backend = scripted(server)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
    assert stream.status_code == 503
    assert backend.record.started == []
    assert any("failing CLOSED" in r.getMessage() for r in caplog.records)


def test_redis_going_away_and_coming_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="plugins.rate_limit"),
        redis_gateway(
            redis_server.url, "t8", requests_per_minute=100, on_redis_error="closed"
        ) as server,
    ):
        assert post(server, chat(max_tokens=1)).status_code == 200
        redis_server.stop()
        assert post(server, chat(max_tokens=1)).status_code == 503
        redis_server.start()
        # Redis is asked again a second after it failed
        wait_for(lambda: post(server, chat(max_tokens=1)).status_code == 200)
        ok = post(server, chat(max_tokens=1))
        # a fresh Redis: the bucket started full again
        assert ok.headers["x-ratelimit-remaining-requests"] == "98"
    messages = [r.getMessage() for r in caplog.records]
    assert any("failing CLOSED" in m for m in messages)
    assert any("reachable again" in m for m in messages)


def test_config_rejects_an_unknown_failure_mode() -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\.rate_limit\.on_redis_error"):
        config(plugins={"rate_limit": {"redis_url": "redis://x", "on_redis_error": "maybe"}})


def test_redis_credentials_never_reach_logs() -> None:
    assert redacted("redis://user:s3cret@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert redacted("rediss://:s3cret@host/0?password=s3cret") == "rediss://host/0"


def test_a_stream_ending_while_redis_is_down_ends_cleanly(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    model = {"reply": "word " * 40, "token_delay_s": 0.01}
    limits = {"concurrent_requests": 1, "tokens_per_minute": 10_000}
    with (
        caplog.at_level(logging.INFO, logger="plugins.rate_limit"),
        redis_gateway(redis_server.url, "t9", model, **limits) as server,
        httpx.stream("POST", server.base_url + "/v1/chat/completions", json=chat(stream=True)) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        redis_server.stop()
        body = "\n".join(lines)  # the rest of the stream, settled while Redis is down
    assert body.rstrip().endswith("data: [DONE]")
    assert any("failing OPEN" in m.getMessage() for m in caplog.records)


@pytest.fixture
def blackhole_url() -> Iterator[str]:
    """A port that accepts connections and never answers (a Redis behind a dead network)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_an_unanswering_redis_costs_one_timeout_not_one_per_request(
    blackhole_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    limits: dict[str, Any] = {"requests_per_minute": 1, "redis_timeout_s": 0.3}
    with (
        caplog.at_level(logging.INFO, logger="plugins.rate_limit"),
        redis_gateway(blackhole_url, "t10", **limits) as server,
    ):
        started = time.monotonic()
        first = post(server, chat(max_tokens=1))
        first_took = time.monotonic() - started
        started = time.monotonic()
        rest = [post(server, chat(max_tokens=1)) for _ in range(5)]
        rest_took = time.monotonic() - started
    assert first.status_code == 200  # failing open
    assert first_took >= 0.3
    assert all(r.status_code == 200 for r in rest)
    assert rest_took < 0.3 * 5  # within a second of the failure Redis is not asked again
    assert sum("failing OPEN" in r.getMessage() for r in caplog.records) == 1
