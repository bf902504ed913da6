"""Per-model admission: a FIFO of requests waiting for sequences.

A request with ``n`` = k needs k sequences at once. At most ``max_concurrent`` sequences run;
at most ``max_queue`` requests wait, each for at most ``queue_timeout_s``. Overflow and
timeouts are :class:`Overloaded` (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import InvalidRequest, Overloaded


class Admission:
    def __init__(self, model: str, capacity: int, max_queue: int, queue_timeout_s: float) -> None:
        self.model = model
        self.capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def active(self) -> int:
        """Sequences admitted and not yet released."""
        return self.capacity - self._free

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def admit(self, sequences: int) -> AsyncIterator[None]:
        await self.acquire(sequences)
        try:
            yield
        finally:
            self.release(sequences)

    async def acquire(self, sequences: int) -> None:
        if sequences > self.capacity:
            raise InvalidRequest(
                f"n={sequences} exceeds the {self.capacity} sequences model "
                f"{self.model!r} runs at once",
                param="n",
            )
        if not self._waiters and self._free >= sequences:
            self._free -= sequences
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"model {self.model!r} is at capacity and its queue is full")
        await self._wait(sequences)

    async def _wait(self, sequences: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (sequences, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release(sequences)  # granted just as we gave up: hand it on
            else:
                fut.cancel()
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"model {self.model!r} is busy: waited {self.queue_timeout_s:g} s in its queue",
                    retry_after_s=self.queue_timeout_s,
                ) from None
            raise

    def release(self, sequences: int) -> None:
        self._free += sequences
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._free >= self._waiters[0][0]:
            sequences, fut = self._waiters.popleft()
            if fut.done():
                continue
            self._free -= sequences
            fut.set_result(None)

    def resize(self, capacity: int) -> None:
        """Lower capacity to what the backend can run (never raises above config)."""
        self._free -= self.capacity - capacity
        self.capacity = capacity
