"""Rate limits in memory, over real HTTP: each limit hit, its headers, and slots given back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import load_config
from gateway.errors import RateLimited
from gateway.plugins import Plugin, PluginChain, RequestContext, ResponseEnd
from gateway.testing import ServerThread
from gateway.types import ClientRequest, GenerationRequest, Usage
from plugins.rate_limit import RateLimitConfig, RateLimitPlugin
from plugins.rate_limit.limiter import Limits, MemoryLimiter, format_duration
from tests.plugins.helpers import SLOW_REPLY, chat, client, config, post, scripted, sha256, wait_for

ALICE, BOB, CAROL = "sk-alice-000000000000", "sk-bob-1111111111111", "sk-carol-22222222222"


def gateway(
    rate_limit: dict[str, Any], keys: list[dict[str, Any]] | None = None, **model: Any
) -> ServerThread:
    plugins: dict[str, dict[str, Any]] = {}
    if keys is not None:
        plugins["api_keys"] = {"keys": keys}
    plugins["rate_limit"] = rate_limit
    return ServerThread(config({"m": model}, plugins=plugins))


def test_requests_per_minute_hit_gives_429_with_headers() -> None:
    with gateway({"requests_per_minute": 3}) as server:
        oks = [post(server, chat()) for _ in range(3)]
        assert [r.status_code for r in oks] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in oks] == ["2", "1", "0"]
        assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in oks)
        refused = post(server, chat())
    assert refused.status_code == 429
    # a request comes back every 20 s at 3 per minute
    assert 19 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert refused.headers["x-request-id"]
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded"
    assert "3 requests per minute" in error["message"]
    assert "anonymous" in error["message"]
    assert "x-ratelimit-limit-tokens" not in refused.headers  # no token limit configured


def test_the_sdk_sees_a_rate_limit_error() -> None:
    with gateway({"requests_per_minute": 1}) as server, client(server) as openai_client:
        openai_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a"}]
        )
        with pytest.raises(openai.RateLimitError) as info:
            openai_client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "a"}]
            )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "60"


def test_streams_get_the_headers_and_the_refusal_before_any_byte() -> None:
    with gateway({"requests_per_minute": 1}) as server:
        url = server.base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(stream=True)) as r:
            assert r.status_code == 200
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            r.read()
        with httpx.stream("POST", url, json=chat(stream=True)) as r:
            assert r.status_code == 429
            assert r.headers["content-type"].startswith("application/json")
            assert b"data:" not in r.read()


def test_each_key_has_its_own_buckets_and_limits() -> None:
    keys: list[dict[str, Any]] = [
        {"name": "alice", "sha256": sha256(ALICE), "requests_per_minute": 1},
        {"name": "bob", "sha256": sha256(BOB)},  # the plugin's default: 2 per minute
        {"name": "carol", "sha256": sha256(CAROL), "requests_per_minute": 0},  # unlimited
    ]
    with gateway({"requests_per_minute": 2}, keys) as server:
        assert post(server, chat(), ALICE).status_code == 200
        alice = post(server, chat(), ALICE)
        assert alice.status_code == 429
        assert "'alice'" in alice.json()["error"]["message"]
        assert [post(server, chat(), BOB).status_code for _ in range(3)] == [200, 200, 429]
        carol = [post(server, chat(), CAROL) for _ in range(5)]
        assert all(r.status_code == 200 for r in carol)
        assert "x-ratelimit-limit-requests" not in carol[0].headers


def test_tokens_per_minute_counts_prompt_and_completion() -> None:
    # prompt "user: hello there" is 3 tokens, the reply 8: 11 tokens against 10 a minute
    with gateway({"tokens_per_minute": 10}, reply="one two three four five six seven eight") as s:
        first = post(s, chat())
        assert first.status_code == 200
        assert first.json()["usage"]["total_tokens"] == 11
        assert first.headers["x-ratelimit-limit-tokens"] == "10"
        # the prompt's estimate ("hello there": 11 characters, 2 tokens) held while it runs,
        # the rest charged at the end
        assert first.headers["x-ratelimit-remaining-tokens"] == "8"
        refused = post(s, chat())
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "10 tokens per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 7  # 1 token in debt: 6 s at 10/min


def test_max_tokens_is_reserved_up_front_and_refunded() -> None:
    with gateway({"tokens_per_minute": 1000}, reply="a b c") as server:
        r = post(server, chat(max_tokens=400))
        # 400 and the prompt's estimate (2) held while it runs
        assert r.headers["x-ratelimit-remaining-tokens"] == "598"
        used = r.json()["usage"]["total_tokens"]
        after = post(server, chat(max_tokens=10))
        remaining = int(after.headers["x-ratelimit-remaining-tokens"])
        # the first request was charged what it used, not what it reserved
        assert 1000 - used - 12 <= remaining <= 1000 - used - 12 + 2


def test_concurrency_slot_is_released_when_the_client_leaves() -> None:
    with gateway({"concurrent_requests": 1}, reply=SLOW_REPLY, token_delay_s=0.02) as server:
        backend = scripted(server)
        url = server.base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(stream=True)) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            refused = post(server, chat())
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert "1 concurrent requests" in refused.json()["error"]["message"]
        # the client left mid-stream: the engine saw the cancel, and the slot is free again
        wait_for(lambda: len(backend.record.cancelled) == 1)
        wait_for(lambda: post(server, chat(max_tokens=2)).status_code == 200)


def test_concurrency_counts_non_streamed_requests_too() -> None:
    with gateway({"concurrent_requests": 2}, reply=SLOW_REPLY, token_delay_s=0.02) as server:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(lambda _: post(server, chat()).status_code, range(4)))
        assert codes == [200, 200, 429, 429]
        assert scripted(server).record.max_active == 2


def test_requests_refused_later_in_prepare_give_their_slot_back() -> None:
    with gateway({"concurrent_requests": 1}, context_length=16) as server:
        too_long = post(server, chat(max_tokens=100))
        assert too_long.status_code == 400  # context_length_exceeded, after the limiter ran
        assert post(server, chat(max_tokens=2)).status_code == 200
        unknown = post(server, chat(model="nope"))
        assert unknown.status_code == 404
        assert post(server, chat(max_tokens=2)).status_code == 200


async def test_memory_buckets_refill_with_time() -> None:
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    limits = Limits(requests_per_minute=60)
    assert (await limiter.acquire("k", limits, 0, "r1")).allowed
    for i in range(59):
        assert (await limiter.acquire("k", limits, 0, f"a{i}")).allowed
    refused = await limiter.acquire("k", limits, 0, "r2")
    assert not refused.allowed
    assert refused.reason == "requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    now[0] = 1.0  # one second refills one request
    ok = await limiter.acquire("k", limits, 0, "r3")
    assert ok.allowed
    assert ok.requests is not None
    assert ok.requests.remaining == pytest.approx(0.0)
    assert ok.requests.reset_s == pytest.approx(60.0)  # until the bucket is full again
    assert not (await limiter.acquire("k", limits, 0, "r4")).allowed


async def test_memory_token_debt_and_refund() -> None:
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    limits = Limits(tokens_per_minute=600)  # 10 per second
    assert (await limiter.acquire("k", limits, 500, "r1")).allowed
    await limiter.settle("k", limits, "r1", 300)  # used 800 tokens: 200 in debt
    refused = await limiter.acquire("k", limits, 0, "r2")
    assert refused.reason == "tokens"
    assert refused.retry_after_s == pytest.approx(20.0)
    now[0] = 20.5
    assert (await limiter.acquire("k", limits, 0, "r3")).allowed
    await limiter.settle("k", limits, "r3", -10_000)  # a refund never fills past the limit
    state = (await limiter.acquire("k", limits, 0, "r4")).tokens
    assert state is not None
    assert state.remaining == 600


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.25, "250ms"), (1.0, "1s"), (1.5, "1.5s"), (59.9991, "60s"),
     (60.0, "1m0s"), (90.2, "1m31s"), (3723.0, "1h2m3s")],
)  # fmt: skip
def test_reset_durations_look_like_openais(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_a_failing_end_hook_before_it_does_not_keep_the_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Plugin):
        async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
            raise RuntimeError("broken plugin")

    limiter = RateLimitPlugin(RateLimitConfig(concurrent_requests=1), MemoryLimiter())
    chain = PluginChain([Broken(), limiter])
    request = ClientRequest("chat", "m", (GenerationRequest("g", prompt="hi"),))

    def ctx(request_id: str) -> RequestContext:
        return RequestContext(request_id, "/v1/completions", {}, "127.0.0.1")

    first = ctx("r1")
    await chain.on_request(first, request)
    with pytest.raises(RateLimited):
        await chain.on_request(ctx("r2"), request)
    await chain.on_response_end(first, ResponseEnd("completed", 200, Usage(), 0.1))
    await chain.on_request(ctx("r3"), request)  # the slot came back
    assert "Broken failed in on_response_end" in caplog.text


def test_reload_changes_default_limits_in_place(tmp_path: Path) -> None:
    """New defaults apply from the next request on, without a restart; a different store is
    reported as needing one (and the running limits stay)."""
    path = tmp_path / "config.toml"
    table = '[models.m]\nbackend = "scripted"\n\n[plugins.rate_limit]\n'
    path.write_text(table + "requests_per_minute = 2\n")

    def reload() -> dict[str, Any]:
        r = httpx.post(server.base_url + "/admin/reload")  # loopback: no admin key needed
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ServerThread(load_config(path)) as server:
        assert [post(server, chat()).status_code for _ in range(3)] == [200, 200, 429]
        path.write_text(table + "requests_per_minute = 5\n")
        body = reload()
        assert (body["plugins_reloaded"], body["restart_required"]) == (["rate_limit"], [])
        # the bucket keeps its level (empty) and now refills at 5 per minute: one every 12 s
        refused = post(server, chat())
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        assert 1 <= int(refused.headers["retry-after"]) <= 12  # at 2 per minute it was 30 s
        path.write_text(table + 'requests_per_minute = 1\nredis_url = "redis://127.0.0.1:1/0"\n')
        body = reload()
        assert (body["plugins_reloaded"], body["restart_required"]) == ([], ["plugins.rate_limit"])
        assert post(server, chat()).headers["x-ratelimit-limit-requests"] == "5"  # unchanged


@pytest.mark.timeout(10)
async def test_tokens_per_minute_reserves_the_prompt_up_front() -> None:
    """Issue 23 finding 10: the token bucket reserved only ``max_tokens`` (nothing without
    one) and never the prompt, so concurrent requests with long prompts all passed a 100-token
    limit (4,412 tokens spent). The prompt's estimate is reserved before admission, and the
    real usage settled at the end."""
    from gateway.wire.convert import chat_request
    from plugins.rate_limit.plugin import prompt_estimate

    limiter = RateLimitPlugin(RateLimitConfig(tokens_per_minute=100), MemoryLimiter())
    prompt = "word " * 200  # 1,000 characters: about 250 tokens
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    request = chat_request(json.dumps(body).encode(), "r")
    assert prompt_estimate(request) == 250

    def ctx(request_id: str) -> RequestContext:
        return RequestContext(request_id, "/v1/chat/completions", {}, "127.0.0.1")

    first = ctx("r1")
    await limiter.on_request(first, request)
    assert first.response_headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):  # the first one's prompt already spent the minute
        await limiter.on_request(ctx("r2"), request)
    used = Usage(prompt_tokens=203, completion_tokens=1)
    await limiter.on_response_end(first, ResponseEnd("completed", 200, used, 0.1))
    refused = ctx("r3")
    with pytest.raises(RateLimited) as info:  # 104 tokens in debt: about a minute to wait
        await limiter.on_request(refused, request)
    assert 60 <= info.value.retry_after_s <= 63


def test_the_prompt_estimate_counts_each_distinct_prompt_once() -> None:
    """Issue 23 finding 10: ``n`` choices share one prompt (usage counts it once); token
    arrays count as they are; tools offered count as prompt text."""
    from plugins.rate_limit.plugin import prompt_estimate

    g = GenerationRequest
    shared = ClientRequest(
        "completions", "m", tuple(g(f"g{i}", prompt="x" * 400, index=i) for i in range(4)),
        choices_per_prompt=2,
    )  # fmt: skip
    assert prompt_estimate(shared) == 200
    tokens = ClientRequest(
        "embeddings", "m", (g("a", prompt_tokens=(1, 2, 3)), g("b", prompt="abcd"))
    )
    assert prompt_estimate(tokens) == 4
