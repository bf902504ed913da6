"""Server-sent events: framing, and the streaming response every SSE endpoint uses.

Framing is :func:`frame`. :class:`EventStream` adds keep-alive pings, a send timeout, the
shutdown drain deadline, and an owner that always hears how the stream ended. It knows no
endpoint and no job: an owner is anything with the three methods of :class:`StreamOwner`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import anyio.abc
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from gateway.drain import Drain, shutdown_error
from gateway.errors import OPENAI_ERRORS, ErrorDialect, GatewayError
from gateway.http import error_response

log = logging.getLogger("gateway.sse")


def frame(data: str, event: str | None = None) -> bytes:
    """One SSE event: ``data`` must be one line (JSON from :mod:`gateway.wire.json`)."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + data.encode() + b"\n\n"


class StreamOwner(Protocol):
    """What an :class:`EventStream` needs of whoever owns the work behind it."""

    def interrupt(self, error: GatewayError) -> bytes | None:
        """The server ends the stream early (the drain deadline): the last event to send, or
        None if the stream has already ended or sent its last event."""
        ...

    async def close(self) -> None:
        """The response is over, however it ended (idempotent: the owner reports it once)."""
        ...


class SendWatchdog:
    """Ends a response whose client has stopped reading for ``timeout_s``.

    A per-chunk cancel scope costs more than serializing the chunk; instead each send stamps
    its start time and one watchdog per response checks the stamp a few times per timeout.
    """

    def __init__(self, send: Send, timeout_s: float) -> None:
        self._send = send
        self.timeout_s = timeout_s
        self._since: float | None = None
        self.timed_out = False
        self.started = False
        #: Headers sent and the body not yet ended: a last event may still be sent.
        self.open = False

    async def send(self, message: Message) -> None:
        self._since = time.monotonic()
        # the message is in the transport once send is entered (uvicorn writes, then waits
        # for the buffer to drain): mark it before awaiting
        self.open = message["type"] == "http.response.start" or message.get("more_body", False)
        self.started = True
        await self._send(message)
        self._since = None

    async def watch(self, scope: anyio.CancelScope) -> None:
        interval = self.timeout_s / 4
        while not self.timed_out:
            await anyio.sleep(interval)
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.timed_out = True
                scope.cancel()


class _Ping(ServerSentEvent):
    """A keep-alive that is a wire API's own event (Anthropic's ``ping``), framed already."""

    def __init__(self, framed: bytes) -> None:
        super().__init__()
        self.framed = framed

    def encode(self) -> bytes:
        return self.framed


class EventStream(EventSourceResponse):
    """An SSE response whose owner hears of its end however it ends, even if never iterated.

    On shutdown the owner has until the drain deadline; a stream still running then is stopped
    and ends with the owner's last event and a proper end of the body (never a silent cut).
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        owner: StreamOwner,
        *,
        request_id: str,
        headers: dict[str, str],
        drain: Drain,
        keepalive_s: float,
        send_timeout_s: float,
        ping: bytes | None = None,
        errors: ErrorDialect = OPENAI_ERRORS,
    ) -> None:
        """``ping``: the keep-alive event (None: an SSE comment); ``errors``: the shape of a
        503 sent instead of a stream stopped before its headers."""
        super().__init__(
            events,
            headers=headers,
            ping=keepalive_s,
            ping_message_factory=None if ping is None else lambda: _Ping(ping),
            # sse-starlette must never cut a stream on shutdown itself: the drain deadline does
            shutdown_grace_period=math.inf,
        )
        self.errors = errors
        self.owner = owner
        self.request_id = request_id
        self.extra_headers = headers
        self.drain = drain
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchdog = SendWatchdog(send, self.send_timeout_s)
        error = shutdown_error()
        last: bytes | None = None

        def stop(tg: anyio.abc.TaskGroup) -> None:
            nonlocal last
            last = self.owner.interrupt(error)
            if last is not None:
                tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog.watch, tg.cancel_scope)
                unwatch = self.drain.at_deadline(lambda: stop(tg))
                try:
                    await super().__call__(scope, receive, watchdog.send)
                finally:
                    unwatch()
                tg.cancel_scope.cancel()
            if last is not None and not watchdog.started:  # stopped before its headers: a 503
                await error_response(error, self.extra_headers, self.errors)(scope, receive, send)
            elif last is not None and watchdog.open:
                log.warning("request %s: ended by the shutdown deadline", self.request_id)
                await self._send_last(send, last)
            if watchdog.timed_out:
                log.warning("request %s: client stopped reading; stream ended", self.request_id)
        finally:
            await self.owner.close()

    async def _send_last(self, send: Send, event: bytes) -> None:
        with anyio.move_on_after(self.send_timeout_s):
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
