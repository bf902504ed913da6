"""``background: true``: the response is answered at once (``queued``) and runs on without
its client: it waits for its sequences in the model's queue, then generates. Its events are
kept (for ``GET /v1/responses/{id}?stream=true&starting_after=N``), its state is stored as it
goes (``GET`` polls it), and ``POST /v1/responses/{id}/cancel`` stops it (queued or running)
and frees its sequence."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from gateway.endpoints.base import Start
from gateway.endpoints.responses.events import ResponsesStreamEncoder
from gateway.errors import GatewayError

log = logging.getLogger("gateway.responses")
Keep = Callable[[dict[str, object]], Awaitable[None]]


@dataclass
class Run:
    """One background response: its events so far, and whether it has ended."""

    response_id: str
    encoder: ResponsesStreamEncoder
    #: Its events in order: an event's place is its ``sequence_number`` (the encoder numbers
    #: each event it frames from 0, and the exchange yields nothing else).
    events: list[bytes] = field(default_factory=list)
    ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add(self, frame: bytes) -> None:
        self.events.append(frame)
        self.changed.set()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """The events after sequence number ``after``, then the live ones until it ends."""
        sent = max(0, after + 1)
        while True:
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.ended:
                return
            self.changed.clear()
            if sent == len(self.events) and not self.ended:
                await self.changed.wait()


class BackgroundRuns:
    """The background responses of this process (finished ones kept for a while, so their
    streams can be resumed)."""

    def __init__(self, keep_finished: int = 256) -> None:
        self.keep_finished = keep_finished
        self._runs: OrderedDict[str, Run] = OrderedDict()

    def get(self, response_id: str) -> Run | None:
        return self._runs.get(response_id)

    def start(self, encoder: ResponsesStreamEncoder, start: Start, stored: Keep) -> Run:
        run = Run(encoder.response_id, encoder)
        for frame in encoder.queued():
            run.add(frame)
        self._runs[run.response_id] = run
        run.task = asyncio.create_task(self._drive(run, start, stored), name=run.response_id)
        self._forget_finished()
        return run

    async def _drive(self, run: Run, start: Start, stored: Keep) -> None:
        """Wait for the sequences, then run the exchange's events (its ``finally`` frees them
        however it ends); a cancelled run's state is stored as cancelled, with what it
        produced so far, a failed one's with its error (its error event the last one)."""
        encoder = run.encoder
        try:
            try:
                exchange = await start(encoder)
            except GatewayError as err:  # never admitted: a full queue, its timeout, shutdown
                run.add(encoder.error(err))
                await stored(encoder.snapshot("failed", error=err))
                return
            await stored(encoder.snapshot("in_progress"))
            async for frame in exchange.events():
                run.add(frame)
            if not encoder.finished:
                await stored(encoder.snapshot("failed", error=encoder.failure))
        except asyncio.CancelledError:
            await asyncio.shield(stored(encoder.snapshot("cancelled")))
        finally:
            run.ended = True
            run.changed.set()

    async def cancel(self, response_id: str) -> bool:
        """Stop a running response; False if it is not running here."""
        run = self._runs.get(response_id)
        if run is None or run.task is None or run.task.done():
            return False
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
        return True

    def _forget_finished(self) -> None:
        finished = [rid for rid, run in self._runs.items() if run.ended]
        for rid in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._runs[rid]

    async def aclose(self) -> None:
        """At shutdown: every run still going is cancelled (and stored as such)."""
        for rid in list(self._runs):
            await self.cancel(rid)
