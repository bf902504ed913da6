"""Background responses' runs (``endpoints/responses/background.py``) on their own: followers
that wait, runs that crash or outlive the drain, the finished ones kept in bounded bytes, and
(over HTTP) a deleted one that stays deleted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import replace
from typing import Any, cast

import httpx
import pytest

from gateway.config import ResponsesConfig
from gateway.drain import Drain
from gateway.endpoints.responses.background import BackgroundRuns, Run
from gateway.endpoints.responses.convert import responses_request
from gateway.endpoints.responses.events import ResponsesStreamEncoder
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config
from tests.support import wait_for

pytestmark = pytest.mark.timeout(10)


def encoder(rid: str = "resp_test") -> ResponsesStreamEncoder:
    request = responses_request(b'{"model": "m", "input": "hi", "background": true}', rid)

    async def keep(state: object, response: dict[str, object]) -> None:
        return None

    return ResponsesStreamEncoder(request, rid, int(time.time()), keep)


class Stored:
    """The ``stored`` callback of a run: every state it stored, in order."""

    def __init__(self) -> None:
        self.states: list[dict[str, object]] = []

    async def __call__(self, response: dict[str, object]) -> None:
        self.states.append(response)

    @property
    def statuses(self) -> list[object]:
        return [s["status"] for s in self.states]


class Exchange:
    """What ``start`` hands a run: events from a script (bytes, a delay in seconds, or an
    exception to raise), then the encoder finished (as its last event does)."""

    def __init__(self, script: list[bytes | float | Exception], enc: Any) -> None:
        self.script = script
        self.encoder = enc

    async def events(self) -> AsyncGenerator[bytes, None]:
        for step in self.script:
            if isinstance(step, Exception):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            yield step
        self.encoder.finished = True


def starter(script: list[bytes | float | Exception]) -> Any:
    async def start(enc: object) -> Exchange:
        return Exchange(script, enc)

    return start


async def test_a_follower_past_the_events_so_far_waits_without_spinning() -> None:
    """Issue 23 finding 1: ``starting_after`` past the events so far made ``Run.follow`` loop
    without awaiting (the event loop spun at 100%, nothing else ran); it must wait for the
    events after it, then end with the run."""
    run = Run("resp_x", cast(Any, None))
    for i in range(3):
        run.add(b"e%d" % i)
    got: list[bytes] = []

    async def follow() -> None:
        async for frame in run.follow(10):
            got.append(frame)

    follower = asyncio.create_task(follow())
    ticks = 0
    for _ in range(5):  # the loop runs other tasks while the follower waits
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5 and got == [] and not follower.done()
    for i in range(3, 13):
        run.add(b"e%d" % i)
        await asyncio.sleep(0)
    assert got == [b"e11", b"e12"]
    run.end()
    await asyncio.wait_for(follower, 1)
    assert got == [b"e11", b"e12"]


async def test_a_run_that_crashes_is_stored_as_failed() -> None:
    """Issue 23 finding 1 (also 11): a run ended by an unexpected exception stayed stored as
    ``in_progress`` forever; it is stored as failed, its followers get an error event."""
    runs = BackgroundRuns()
    stored = Stored()
    run = runs.start(encoder(), starter([b"one", RuntimeError("a bug")]), stored)
    assert run.task is not None
    await asyncio.wait_for(asyncio.gather(run.task, return_exceptions=True), 2)
    assert stored.statuses == ["in_progress", "failed"]
    error = stored.states[-1]["error"]
    assert isinstance(error, dict) and error["code"] == "internal_error"
    assert run.ended and b'"type":"error"' in run.events[-1].replace(b" ", b"")


async def test_background_runs_get_the_drain_then_fail_with_the_shutdown() -> None:
    """Issue 23 finding 1 (also 11): at shutdown, background runs were cancelled at once,
    ignoring ``drain_timeout_s``; a run that ends within the drain completes, one that runs
    past it is stored as failed with the shutdown's error (not as cancelled by its client)."""
    drain = Drain(0.3)
    runs = BackgroundRuns(drain=drain)
    quick, slow = Stored(), Stored()
    done = runs.start(encoder("resp_quick"), starter([0.1, b"last"]), quick)
    stuck = runs.start(encoder("resp_slow"), starter([30.0, b"never"]), slow)
    await asyncio.sleep(0.01)
    drain.start()
    started = time.monotonic()
    await asyncio.wait_for(runs.aclose(), 3)
    assert 0.25 <= time.monotonic() - started < 2
    assert done.events[-1] == b"last" and quick.statuses == ["in_progress"]
    assert slow.statuses == ["in_progress", "failed"]
    error = slow.states[-1]["error"]
    assert isinstance(error, dict) and "shut down" in str(error["message"])
    assert stuck.ended


async def test_finished_runs_are_kept_within_a_byte_budget() -> None:
    """Issue 23 finding 8: the 256 finished runs kept for resuming held all their events,
    however large; the oldest finished ones are forgotten past a byte budget."""
    runs = BackgroundRuns(keep_finished=256, keep_finished_bytes=8000)
    sizes: dict[str, int] = {}
    for i in range(6):
        run = runs.start(encoder(f"resp_{i}"), starter([b"x" * 2000]), Stored())
        assert run.task is not None
        await run.task
        sizes[run.response_id] = run.nbytes
    ids = list(sizes)
    kept = [rid for rid in ids if runs.get(rid) is not None]
    assert 1 <= len(kept) < len(ids) and kept == ids[-len(kept) :]  # the newest are kept
    held = sum(sizes[rid] for rid in kept)
    assert held <= 8000 < held + sizes[ids[-len(kept) - 1]]  # as many as fit


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("background") / "r.sqlite3"
    config = scripted_config({"slow": {"reply": "one two three four five", "token_delay_s": 0.1}})
    with ServerThread(replace(config, responses=ResponsesConfig(path=str(path)))) as srv:
        yield srv


def test_a_deleted_background_response_stays_deleted(slow: ServerThread) -> None:
    """Issue 23 finding 9: DELETE of a running background response answered 200, then GET
    found it again once the run stored its next state; the run never stores it back."""
    url = slow.base_url + "/v1/responses"
    created = httpx.post(url, json={"model": "slow", "input": "hi", "background": True}).json()
    rid = created["id"]
    backend = scripted(slow.backend("slow"))
    wait_for(lambda: backend.record.tokens_generated > 0, what="generation")
    assert httpx.delete(f"{url}/{rid}").status_code == 200
    wait_for(lambda: backend.record.active == 0, what="the run's end")
    deadline = time.monotonic() + 0.5  # the run's last states are stored around its end
    while time.monotonic() < deadline:
        assert httpx.get(f"{url}/{rid}").status_code == 404
        time.sleep(0.02)


def test_a_cancelled_answer_keeps_what_it_wrote(slow: ServerThread) -> None:
    """A client that stops an answer and reloads finds the text it saw: the cancelled
    response holds its open message so far, marked incomplete."""
    url = slow.base_url + "/v1/responses"
    backend = scripted(slow.backend("slow"))
    wait_for(lambda: backend.record.active == 0, what="the earlier runs' end")
    before = backend.record.tokens_generated
    created = httpx.post(url, json={"model": "slow", "input": "hi", "background": True}).json()
    wait_for(lambda: backend.record.tokens_generated >= before + 2, what="two tokens")
    assert httpx.post(f"{url}/{created['id']}/cancel").status_code == 200
    wait_for(lambda: backend.record.active == 0, what="the run's end")
    stored = httpx.get(f"{url}/{created['id']}").json()
    assert stored["status"] == "cancelled"
    [message] = stored["output"]
    assert message["type"] == "message" and message["status"] == "incomplete"
    text = message["content"][0]["text"]
    assert text and "one two three four five".startswith(text)
