"""The SSE response of a streaming job: keep-alive pings, a send timeout, a job that always ends."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.config import ServerConfig

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

    async def send(self, message: Message) -> None:
        self._since = time.monotonic()
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
    """An SSE response that ends its job however the response ends, even if never iterated."""

    def __init__(self, job: Job, server: ServerConfig) -> None:
        super().__init__(
            job.events(),
            headers=job.ctx.response_headers,
            ping=server.keepalive_s,
            shutdown_grace_period=server.drain_timeout_s,
        )
        self.job = job
        self.send_timeout_s = server.send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchdog = SendWatchdog(send, self.send_timeout_s)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog.watch, tg.cancel_scope)
                await super().__call__(scope, receive, watchdog.send)
                tg.cancel_scope.cancel()
            if watchdog.timed_out:
                log.warning(
                    "request %s: client stopped reading; stream ended", self.job.ctx.request_id
                )
        finally:
            await self.job.end("cancelled", 499)
