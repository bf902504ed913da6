"""The core's admission: FIFO, k sequences for n = k, queue limit, timeout, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from gateway.errors import InvalidRequest, Overloaded


async def test_admits_up_to_capacity_then_queues_fifo() -> None:
    adm = Admission("m", capacity=2, max_queue=10, queue_timeout_s=5)
    await adm.acquire(1)
    await adm.acquire(1)
    order: list[str] = []

    async def waiter(name: str, k: int) -> None:
        await adm.acquire(k)
        order.append(name)

    tasks = [asyncio.create_task(waiter(n, k)) for n, k in [("a", 2), ("b", 1), ("c", 1)]]
    await asyncio.sleep(0)
    assert adm.queued == 3 and adm.active == 2
    adm.release(1)
    await asyncio.sleep(0)
    assert order == []  # "a" needs 2: "b" must not overtake it
    adm.release(1)
    await asyncio.sleep(0)
    assert order == ["a"]
    adm.release(2)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]
    assert adm.active == 2 and adm.queued == 0


async def test_n_larger_than_capacity_is_400() -> None:
    adm = Admission("m", capacity=4, max_queue=1, queue_timeout_s=1)
    with pytest.raises(InvalidRequest) as err:
        await adm.acquire(5)
    assert err.value.param == "n"


async def test_full_queue_is_503_with_retry_after() -> None:
    adm = Admission("m", capacity=1, max_queue=1, queue_timeout_s=5)
    await adm.acquire(1)
    queued = asyncio.create_task(adm.acquire(1))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as err:
        await adm.acquire(1)
    assert err.value.status == 503 and "Retry-After" in err.value.headers
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert adm.queued == 0


async def test_queue_timeout_is_503_and_leaves_no_waiter() -> None:
    adm = Admission("m", capacity=1, max_queue=5, queue_timeout_s=0.05)
    await adm.acquire(1)
    with pytest.raises(Overloaded):
        await adm.acquire(1)
    assert adm.queued == 0
    adm.release(1)
    assert adm.active == 0


async def test_cancelled_waiter_is_removed_and_next_one_admitted() -> None:
    adm = Admission("m", capacity=2, max_queue=5, queue_timeout_s=5)
    await adm.acquire(1)
    big = asyncio.create_task(adm.acquire(2))
    small = asyncio.create_task(adm.acquire(1))
    await asyncio.sleep(0)
    assert adm.queued == 2
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    await asyncio.wait_for(small, 1)  # the head left: the small one fits now
    assert adm.active == 2 and adm.queued == 0


async def test_grant_racing_cancellation_hands_the_slot_on() -> None:
    adm = Admission("m", capacity=1, max_queue=5, queue_timeout_s=5)
    await adm.acquire(1)
    first = asyncio.create_task(adm.acquire(1))
    second = asyncio.create_task(adm.acquire(1))
    await asyncio.sleep(0)
    adm.release(1)  # grants "first" ...
    first.cancel()  # ... which is cancelled before it runs again
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert adm.active == 1 and adm.queued == 0
