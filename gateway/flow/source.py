"""The deltas of one admitted request: every generation merged, opened before the headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from gateway.backend import Backend
from gateway.generation import merge
from gateway.types import Delta, GenerationRequest


class DeltaSource:
    """``(choice index, delta)`` pairs from a backend's streams, at most ``at_once`` running
    at a time (the request's admitted sequences); :meth:`aclose` stops them all (their
    backends' ``finally`` runs) and is idempotent."""

    def __init__(
        self, backend: Backend, generations: Sequence[GenerationRequest], at_once: int
    ) -> None:
        self._deltas = merge(backend, generations, at_once)
        self._first: asyncio.Task[tuple[int, Delta] | None] | None = None

    async def open(self, grace_s: float) -> None:
        """Start the generations and wait up to ``grace_s`` for the first delta.

        The response headers go out after this: an error a backend can only raise once it runs
        (a remote replica's 4xx, every replica down) gets its own HTTP status instead of a 200
        and an error event. A later first delta is awaited after the headers, under keep-alive
        pings (``grace_s`` is the keep-alive interval: no ping would have gone out before).
        """
        self._first = asyncio.ensure_future(anext(self._deltas, None))
        try:
            done, _ = await asyncio.wait({self._first}, timeout=grace_s)
            if done:
                self._first.result()
        except BaseException:
            await self.aclose()
            raise

    async def items(self) -> AsyncGenerator[tuple[int, Delta], None]:
        """The deltas, the one :meth:`open` awaited first; close it (or :meth:`aclose`)."""
        if self._first is not None:
            first = await self._first
            if first is None:
                return
            yield first
        async for item in self._deltas:
            yield item

    async def aclose(self) -> None:
        if self._first is not None:
            self._first.cancel()
            await asyncio.gather(self._first, return_exceptions=True)
        await self._deltas.aclose()
