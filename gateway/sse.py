"""The SSE response of a streaming job: keep-alive pings, a send timeout, the drain deadline, a
job that always ends."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.config import ServerConfig
from gateway.drain import shutdown_error
from gateway.http import error_response

if TYPE_CHECKING:
    from gateway.completions import Job

log = logging.getLogger("gateway.sse")


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


class JobEventStream(EventSourceResponse):
    """An SSE response that ends its job however the response ends, even if never iterated.

    On shutdown the job has until the pool's drain deadline; a stream still running then is
    stopped and ends with one error event and a proper end of the body (never a silent cut).
    """

    def __init__(self, job: Job, server: ServerConfig) -> None:
        super().__init__(
            job.events(),
            headers=job.ctx.response_headers,
            ping=server.keepalive_s,
            # sse-starlette must never cut a stream on shutdown itself: the drain deadline does
            shutdown_grace_period=math.inf,
        )
        self.job = job
        self.send_timeout_s = server.send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchdog = SendWatchdog(send, self.send_timeout_s)
        error = shutdown_error()
        stopped = False

        def stop(tg: anyio.abc.TaskGroup) -> None:
            nonlocal stopped
            if self.job.interrupt(error):
                stopped = True
                tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog.watch, tg.cancel_scope)
                unwatch = self.job.services.pool.drain.at_deadline(lambda: stop(tg))
                try:
                    await super().__call__(scope, receive, watchdog.send)
                finally:
                    unwatch()
                tg.cancel_scope.cancel()
            if stopped and not watchdog.started:  # stopped before its headers: a plain 503
                await error_response(error, self.job.ctx.response_headers)(scope, receive, send)
            elif stopped and watchdog.open:
                log.warning("request %s: ended by the shutdown deadline", self.job.ctx.request_id)
                await self._send_last(send, self.job.error_frame(error))
            if watchdog.timed_out:
                log.warning(
                    "request %s: client stopped reading; stream ended", self.job.ctx.request_id
                )
        finally:
            await self.job.end("cancelled", 499)

    async def _send_last(self, send: Send, frame: bytes) -> None:
        with anyio.move_on_after(self.send_timeout_s):
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
