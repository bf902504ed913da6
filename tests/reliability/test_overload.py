"""More concurrent requests than a model's slots + queue: every request ends as a complete
response or a 503 with Retry-After; none hangs, none is cut off, running streams are never
disturbed by newcomers, queue timeouts are honoured.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.backend import HasStats
from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config
from tests.reliability.helpers import (
    StreamResult,
    chat,
    needs_llamacpp,
    real_model_table,
    stream_request,
    wait_for,
)

REPLY = " ".join(f"t{i}" for i in range(20))
LONG = " ".join(f"L{i}" for i in range(100))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            # 20 tokens x 10 ms: slots free every 0.2 s
            "busy": {
                "reply": REPLY,
                "token_delay_s": 0.01,
                "batching": {"max_concurrent": 2, "max_queue": 3, "queue_timeout_s": 5},
            },
            # 100 tokens x 10 ms, and a queue that gives up after 0.5 s
            "tight": {
                "reply": LONG,
                "token_delay_s": 0.01,
                "batching": {"max_concurrent": 2, "max_queue": 4, "queue_timeout_s": 0.5},
            },
        },
        server={"keepalive_s": 0.5},
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
async def client(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as c:
        yield c


Outcome = StreamResult | httpx.Response


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
    if body.get("stream"):
        return await stream_request(client, "/v1/chat/completions", body)
    return await client.post("/v1/chat/completions", json=body)


def _status(r: Outcome) -> int:
    return r.status if isinstance(r, StreamResult) else r.status_code


def _assert_complete_or_503(r: Outcome, reply: str) -> bool:
    """True if complete, False if a proper 503; anything else fails the test."""
    if _status(r) == 503:
        assert "retry-after" in r.headers and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_overloaded"
        return False
    assert _status(r) == 200, (_status(r), r.json() if isinstance(r, httpx.Response) else r)
    if isinstance(r, StreamResult):
        assert not r.cut and r.done and not r.errors, r.events[-2:]
        assert r.text() == reply
    else:
        assert r.json()["choices"][0]["message"]["content"] == reply
    return True


def _assert_idle(server: ServerThread, model: str) -> None:
    adm = server.services.pool.resolve(model).admission
    backend = scripted(server.backend(model))
    wait_for(lambda: adm.active == 0 and adm.queued == 0 and backend.record.active == 0, 5)


@pytest.mark.parametrize("mix", ["stream", "json", "mixed"])
async def test_flood_ends_in_complete_responses_or_503(
    server: ServerThread, client: httpx.AsyncClient, mix: str
) -> None:
    backend = scripted(server.backend("busy"))
    backend.record.max_active = 0
    bodies = [
        chat("busy", stream=mix == "stream" or (mix == "mixed" and i % 2 == 0)) for i in range(40)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(_one(client, b) for b in bodies)), 30)
    completed = [_assert_complete_or_503(r, REPLY) for r in results]
    assert sum(completed) >= 5  # 2 running + 3 queued at least
    assert not all(completed)  # and the rest turned away
    assert backend.record.max_active <= 2
    _assert_idle(server, "busy")


async def test_n_greater_than_one_counts_its_sequences(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    backend = scripted(server.backend("busy"))
    backend.record.max_active = 0
    bodies = [chat("busy", stream=i % 2 == 0, n=2) for i in range(6)] + [
        chat("busy", stream=True) for _ in range(6)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(_one(client, b) for b in bodies)), 30)
    for r in results:
        if _status(r) == 200 and isinstance(r, StreamResult):
            assert not r.cut and r.done and not r.errors
        elif _status(r) == 200:
            assert isinstance(r, httpx.Response)
            assert all(c["message"]["content"] == REPLY for c in r.json()["choices"])
        else:
            assert _status(r) == 503 and "retry-after" in r.headers
    assert backend.record.max_active <= 2
    _assert_idle(server, "busy")


async def test_running_streams_are_not_disturbed_by_a_flood(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    """Two streams hold both slots; 60 newcomers arrive. The two finish whole, in order, with
    no gap longer than the flood's own cost."""
    backend = scripted(server.backend("tight"))
    first = [asyncio.Event(), asyncio.Event()]
    arrivals: list[list[float]] = [[], []]

    def watch(i: int) -> Any:
        def seen(event: str) -> bool:
            arrivals[i].append(time.monotonic())
            if '"L0"' in event:
                first[i].set()
            return False

        return seen

    running = [
        asyncio.create_task(
            stream_request(client, "/v1/chat/completions", chat("tight"), on_event=watch(i))
        )
        for i in range(2)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 10)
    cancelled_before = len(backend.record.cancelled)
    flood = [_one(client, chat("tight", stream=i % 3 != 0)) for i in range(60)]
    turned_away = await asyncio.wait_for(asyncio.gather(*flood), 30)
    for r in turned_away:
        assert _status(r) == 503 and "retry-after" in r.headers
    for task in running:
        r = await asyncio.wait_for(task, 10)
        assert not r.cut and r.done and not r.errors
        assert r.text() == LONG
    for times in arrivals:
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < 1.0, max(gaps)  # 10 ms per token; a stall would be seconds
    assert len(backend.record.cancelled) == cancelled_before
    _assert_idle(server, "tight")


@pytest.mark.parametrize("stream", [True, False])
async def test_queue_timeout_is_honoured(
    server: ServerThread, client: httpx.AsyncClient, stream: bool
) -> None:
    """Both slots busy for ~1 s; queued requests get their 503 after queue_timeout_s (0.5 s),
    not sooner and not much later; then the model serves again at once."""
    first = [asyncio.Event(), asyncio.Event()]

    def watch(i: int) -> Callable[[str], bool]:
        def seen(event: str) -> bool:
            first[i].set()
            return False

        return seen

    holders = [
        asyncio.create_task(
            stream_request(client, "/v1/chat/completions", chat("tight"), on_event=watch(i))
        )
        for i in range(2)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 10)

    async def timed() -> tuple[float, Outcome]:
        started = time.monotonic()
        r = await _one(client, chat("tight", stream=stream))
        return time.monotonic() - started, r

    waited = await asyncio.wait_for(asyncio.gather(*(timed() for _ in range(4))), 10)
    for seconds, r in waited:
        assert _status(r) == 503 and r.headers["retry-after"] == "1"
        assert "waited 0.5 s" in r.json()["error"]["message"]
        assert 0.45 <= seconds < 1.5, seconds
    assert server.services.pool.resolve("tight").admission.queued == 0
    for task in holders:
        assert (await asyncio.wait_for(task, 10)).done
    r = await _one(client, chat("tight", stream=stream, max_tokens=3))
    assert _status(r) == 200
    _assert_idle(server, "tight")


@needs_llamacpp
@pytest.mark.slow
async def test_flood_on_the_real_model() -> None:
    """The default model with 2 slots and a queue of 2: 10 concurrent streams of 8 tokens."""
    table = real_model_table(batching={"max_concurrent": 2, "max_queue": 2})
    config = parse_config({"models": {"smol": table}}, "<test>")
    with ServerThread(config) as server:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
            bodies = [
                chat("smol", f"Say a word about the number {i}.", max_tokens=8, stream=i % 3 != 0)
                for i in range(10)
            ]
            results = await asyncio.wait_for(asyncio.gather(*(_one(c, b) for b in bodies)), 60)
            ok = 0
            for r in results:
                if _status(r) == 503:
                    assert "retry-after" in r.headers
                    continue
                assert _status(r) == 200
                if isinstance(r, StreamResult):
                    assert not r.cut and r.done and not r.errors
                else:
                    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                ok += 1
            assert ok >= 4
        backend = server.backend("smol")
        assert isinstance(backend, HasStats)
        wait_for(lambda: backend.stats().active_sequences == 0, 5)
        stats = backend.stats()
        assert stats.queued_sequences == 0 and stats.max_batch_sequences <= 2
        adm = server.services.pool.resolve("smol").admission
        assert adm.active == 0 and adm.queued == 0
