"""``background: true``: the response is answered at once (``queued``) and runs on without
its client: it waits for its sequences in the model's queue, then generates. Its events are
kept (for ``GET /v1/responses/{id}?stream=true&starting_after=N``), its state is stored as it
goes (``GET`` polls it), and ``POST /v1/responses/{id}/cancel`` stops it (queued or running)
and frees its sequence.

Every wait here awaits: a follower that has sent every event so far (or asked to start past
them) sleeps until the run adds one or ends. Finished runs are kept for resuming within a byte
budget and a count, the oldest forgotten first. At shutdown, runs still going get the drain's
deadline to finish, then are stopped and stored as failed with the shutdown's error (as a
stream cut at the deadline ends with it); a run that ends by a bug is stored as failed too,
never left ``in_progress``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from gateway.drain import Drain, shutdown_error
from gateway.endpoints.responses.events import ResponsesStreamEncoder
from gateway.errors import GatewayError
from gateway.flow.contract import Start
from gateway.generation import as_gateway_error

log = logging.getLogger("gateway.responses")
Keep = Callable[[dict[str, object]], Awaitable[None]]

#: Finished runs kept for resuming their streams, at most this many ...
KEEP_FINISHED = 256
#: ... holding at most this many bytes of events in all.
KEEP_FINISHED_BYTES = 64 << 20


@dataclass
class Run:
    """One background response: its events so far, and whether it has ended."""

    response_id: str
    encoder: ResponsesStreamEncoder
    #: Its events in order: an event's place is its ``sequence_number`` (the encoder numbers
    #: each event it frames from 0, and the exchange yields nothing else).
    events: list[bytes] = field(default_factory=list)
    #: The events' bytes in all.
    nbytes: int = 0
    ended: bool = False
    task: asyncio.Task[None] | None = None
    #: Why it was stopped, if not by its client's cancel (the server's shutdown).
    cut: GatewayError | None = None
    #: Set (and replaced by a fresh one) whenever an event is added or the run ends.
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, frame: bytes) -> None:
        self.events.append(frame)
        self.nbytes += len(frame)
        self._notify()

    def end(self) -> None:
        self.ended = True
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """The events after sequence number ``after``, then the live ones until it ends (a
        follower past the events so far waits for the next one after ``after``)."""
        sent = max(0, after + 1)
        while True:
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.ended:
                return
            await self._wake.wait()


class BackgroundRuns:
    """The background responses of this process (finished ones kept for a while, so their
    streams can be resumed). ``drain``: the server's shutdown drain, which runs still going
    at shutdown are given (without it they are cancelled at once)."""

    def __init__(
        self,
        keep_finished: int = KEEP_FINISHED,
        keep_finished_bytes: int = KEEP_FINISHED_BYTES,
        drain: Drain | None = None,
    ) -> None:
        self.keep_finished = keep_finished
        self.keep_finished_bytes = keep_finished_bytes
        self.drain = drain
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
        produced so far, a failed one's with its error (its error event the last one), and
        one that ended by a bug as failed (with an internal error naming the response)."""
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
            if run.cut is None:
                await asyncio.shield(stored(encoder.snapshot("cancelled")))
            else:
                await asyncio.shield(self._failed(run, run.cut, stored))
        except Exception as exc:  # a bug: never left stored as in_progress
            await asyncio.shield(self._failed(run, as_gateway_error(exc, run.response_id), stored))
        finally:
            run.end()
            self._forget_finished()

    @staticmethod
    async def _failed(run: Run, error: GatewayError, stored: Keep) -> None:
        """Its error event (unless it already ended with one) and its state, failed."""
        encoder = run.encoder
        if not encoder.finished and encoder.failure is None:
            run.add(encoder.error(error))
        await stored(encoder.snapshot("failed", error=error))

    async def cancel(self, response_id: str, cut: GatewayError | None = None) -> bool:
        """Stop a running response (stored as cancelled, or as failed with ``cut``); False if
        it is not running here."""
        run = self._runs.get(response_id)
        if run is None or run.task is None or run.task.done():
            return False
        run.cut = cut
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
        return True

    def _forget_finished(self) -> None:
        """The oldest finished runs go while more than ``keep_finished`` are kept or their
        events hold more than ``keep_finished_bytes`` (a follower keeps its own run)."""
        finished = [(rid, run.nbytes) for rid, run in self._runs.items() if run.ended]
        count, total = len(finished), sum(n for _, n in finished)
        for rid, nbytes in finished:
            if count <= self.keep_finished and total <= self.keep_finished_bytes:
                break
            del self._runs[rid]
            count, total = count - 1, total - nbytes

    async def aclose(self) -> None:
        """At shutdown: runs still going get until the drain's deadline to end; those still
        going then are stopped, stored as failed with the shutdown's error."""
        going = [run.task for run in self._runs.values() if run.task and not run.task.done()]
        deadline = self.drain.deadline if self.drain is not None else None
        if going and deadline is not None:
            await asyncio.wait(going, timeout=max(0.0, deadline - time.monotonic()))
        for rid in list(self._runs):
            await self.cancel(rid, cut=shutdown_error())
