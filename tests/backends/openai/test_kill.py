"""A replica killed in the middle of a run: no request is lost that had not started streaming."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.testing import ServerThread
from tests.backends.openai.fleet import Process, chat, fleet, front_config, gateway_process

pytestmark = pytest.mark.slow

#: Most of a request's life is its "prefill": a kill then finds requests with no text sent yet.
UPSTREAM = {
    "models": {
        "m": {
            "backend": "scripted",
            "reply": " ".join(f"t{i}" for i in range(8)),
            "prefill_delay_s": 0.5,
            "token_delay_s": 0.03,
        }
    }
}
REQUESTS = 40
CONCURRENCY = 8


@dataclass
class Outcome:
    status: int = 0
    got_text: bool = False
    completed: bool = False
    error: str | None = None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    a = gateway_process(tmp_path, "a", UPSTREAM)
    b = gateway_process(tmp_path, "b", UPSTREAM)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


async def one(client: httpx.AsyncClient, url: str) -> Outcome:
    out = Outcome()
    async with client.stream("POST", url, json=chat("m", stream=True)) as r:
        out.status = r.status_code
        async for line in r.aiter_lines():
            if '"content":"t' in line:
                out.got_text = True
            elif '"error"' in line:
                out.error = line
            elif line == "data: [DONE]":
                out.completed = True
    return out


async def test_kill_a_replica_mid_run(pair: tuple[Process, Process]) -> None:
    a, b = pair
    table = {
        "replicas": [{"url": a.url}, {"url": b.url}],
        "upstream_model": "m",
        "context_length": 4096,
        "health": {"path": "/ready", "interval_s": 0.5, "eject_after_failures": 3},
    }
    with ServerThread(front_config({"m": table})) as front:
        backend = fleet(front, "m")
        replica_a = backend.replica(a.url)
        url = front.base_url + "/v1/chat/completions"
        gate = asyncio.Semaphore(CONCURRENCY)
        in_flight_on_a_at_kill = 0

        async def limited(client: httpx.AsyncClient) -> Outcome:
            async with gate:
                return await one(client, url)

        async def kill_later() -> None:
            nonlocal in_flight_on_a_at_kill
            await asyncio.sleep(1.2)
            in_flight_on_a_at_kill = replica_a.outstanding
            a.kill()

        async with httpx.AsyncClient(timeout=30) as client:
            killer = asyncio.create_task(kill_later())
            outcomes = await asyncio.gather(*(limited(client) for _ in range(REQUESTS)))
            await killer

    assert in_flight_on_a_at_kill >= 1, "the kill found no request on A: the test proved nothing"
    assert all(o.status == 200 for o in outcomes)
    lost = [o for o in outcomes if not o.completed and not o.got_text]
    assert not lost, f"{len(lost)} request(s) failed before any text: {lost[0].error}"
    cut = [o for o in outcomes if not o.completed]
    assert len(cut) <= in_flight_on_a_at_kill  # only streams already flowing from A
    assert all(o.error and "upstream_error" in o.error for o in cut)
    assert backend.retries >= 1  # requests in prefill on A, or sent to A after the kill
    summary = Counter("completed" if o.completed else "cut mid-stream" for o in outcomes)
    print(f"\nkill: {dict(summary)}, {backend.retries} retried, {in_flight_on_a_at_kill} on A")
