"""The shutdown drain: one deadline, started from a signal handler or another thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.drain import Drain
from gateway.errors import ModelUnavailable


async def test_callbacks_run_at_the_deadline_not_before() -> None:
    drain = Drain(0.2)
    fired: list[float] = []
    drain.at_deadline(lambda: fired.append(time.monotonic()))
    await asyncio.sleep(0.3)
    assert fired == [] and not drain.started  # nothing happens until the drain starts
    started = time.monotonic()
    drain.start()
    assert drain.started
    await asyncio.sleep(0.1)
    assert fired == []
    await asyncio.sleep(0.2)
    assert len(fired) == 1 and 0.15 < fired[0] - started < 0.3
    assert drain.passed


async def test_start_from_another_thread_wakes_the_loop() -> None:
    drain = Drain(0.05)
    done = asyncio.Event()
    drain.at_deadline(done.set)
    threading.Thread(target=drain.start).start()
    await asyncio.wait_for(done.wait(), 2)
    assert done.is_set() and drain.started and drain.passed


async def test_start_is_idempotent_and_keeps_the_first_deadline() -> None:
    drain = Drain(0.1)
    drain.start()
    deadline = drain.deadline
    await asyncio.sleep(0.05)
    drain.start()
    assert drain.deadline == deadline


async def test_cancelled_callback_does_not_run() -> None:
    drain = Drain(0.05)
    fired: list[str] = []
    cancel = drain.at_deadline(lambda: fired.append("a"))
    drain.at_deadline(lambda: fired.append("b"))
    cancel()
    drain.start()
    await asyncio.sleep(0.15)
    assert fired == ["b"]


async def test_registering_after_the_deadline_runs_soon() -> None:
    drain = Drain(0)
    drain.start()
    drain.at_deadline(lambda: None)  # arms it
    await asyncio.sleep(0.01)
    assert drain.passed
    fired = asyncio.Event()
    drain.at_deadline(fired.set)
    await asyncio.wait_for(fired.wait(), 1)


async def test_bounded_returns_the_result_before_the_deadline() -> None:
    drain = Drain(1)
    drain.start()

    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await drain.bounded(work()) == 7


async def test_bounded_cancels_work_at_the_deadline_with_a_503() -> None:
    drain = Drain(0.1)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(drain.bounded(forever()))
    await asyncio.sleep(0.05)
    drain.start()
    with pytest.raises(ModelUnavailable) as err:
        await asyncio.wait_for(task, 2)
    assert err.value.status == 503 and "Retry-After" in err.value.headers
    assert cancelled.is_set()


async def test_bounded_keeps_the_works_own_timeout() -> None:
    drain = Drain(10)
    drain.start()

    async def times_out() -> None:
        raise TimeoutError("its own")

    with pytest.raises(TimeoutError, match="its own"):
        await drain.bounded(times_out())


async def test_bounded_passes_cancellation_through() -> None:
    drain = Drain(10)
    task = asyncio.create_task(drain.bounded(asyncio.sleep(3600)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
