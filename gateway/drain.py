"""Shutdown drain: from the moment the server stops accepting, accepted work has until a deadline.

The server starts the drain (a SIGTERM, or the app's shutdown); requests already accepted go on,
and whatever is still running at ``timeout_s`` after the start is ended by its owner with an
error: a 503 if no response byte went out yet, one error event if the stream is running. Owners
register a callback with :meth:`Drain.at_deadline` (no task, no polling); :meth:`Drain.bounded`
wraps a single await.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.errors import ModelUnavailable

T = TypeVar("T")


def shutdown_error() -> ModelUnavailable:
    return ModelUnavailable("the server shut down before this request finished")


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        #: ``time.monotonic()`` when the drain ends; None until it starts.
        self.deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = False
        self._passed = False
        self._callbacks: dict[object, Callable[[], None]] = {}

    @property
    def started(self) -> bool:
        return self.deadline is not None

    @property
    def passed(self) -> bool:
        return self._passed

    def start(self) -> None:
        """Begin draining now (idempotent). Safe from a signal handler or another thread."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._arm)

    def at_deadline(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on the event loop when the deadline passes; returns a canceller.

        Must be called from the event loop.
        """
        self._loop = asyncio.get_running_loop()
        if self._passed:
            return self._loop.call_soon(callback).cancel
        key = object()
        self._callbacks[key] = callback
        if self.deadline is not None:
            self._arm()
        return lambda: self._callbacks.pop(key, None) and None

    async def bounded(self, work: Awaitable[T]) -> T:
        """Await ``work``; cancel it and raise the shutdown 503 if the deadline passes first."""
        scope = asyncio.timeout(None)
        try:
            async with scope:
                cancel = self.at_deadline(lambda: scope.reschedule(-1))
                try:
                    return await work
                finally:
                    cancel()
        except TimeoutError:
            if scope.expired():
                raise shutdown_error() from None
            raise

    def _arm(self) -> None:
        if self._armed or self.deadline is None or self._loop is None:
            return
        self._armed = True
        self._loop.call_later(max(0.0, self.deadline - time.monotonic()), self._pass)

    def _pass(self) -> None:
        self._passed = True
        callbacks = list(self._callbacks.values())
        self._callbacks.clear()
        for callback in callbacks:
            callback()
