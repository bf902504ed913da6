"""One admitted request from admission to its end, streamed or collected.

An :class:`Exchange` composes the parts that each own one thing: the :class:`Lease` (the
model's sequences), the :class:`DeltaSource` (the backend's streams), :class:`Progress`
(usage and timings), the :class:`EndReport` (the plugins' end hook), and the endpoint's
encoder (bytes). :meth:`end` stops the streams, releases the lease and reports, once, however
the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import anyio
from starlette.responses import Response

from gateway.drain import Drain
from gateway.errors import GatewayError
from gateway.flow.contract import EndpointSpec, Result, StreamEncoder
from gateway.flow.prepare import Admitted
from gateway.flow.report import EndReport
from gateway.flow.source import DeltaSource
from gateway.generation import Progress, as_gateway_error, check_complete
from gateway.http import error_response
from gateway.plugins import Outcome, PluginChain, RequestContext

log = logging.getLogger("gateway.flow")


class Exchange:
    def __init__(
        self,
        endpoint: EndpointSpec,
        admitted: Admitted,
        ctx: RequestContext,
        plugins: PluginChain,
        drain: Drain,
        encoder: StreamEncoder | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.request = admitted.request
        self.lease = admitted.lease
        self.ctx = ctx
        self.drain = drain
        self.created = int(time.time())
        self.progress = Progress(self.request.choices_per_prompt, ctx.started)
        self.report = EndReport(plugins, ctx, self.progress, admitted.queue_wait_s)
        self.source = DeltaSource(
            self.lease.backend, self.request.generations, self.lease.sequences
        )
        #: A background request's encoder comes from its endpoint (it began the response
        #: while the request waited in the queue).
        self.encoder: StreamEncoder | None = encoder or (
            endpoint.stream_encoder(self.request, ctx.request_id, self.created)
            if self.request.stream
            else None
        )
        #: The last event has been produced (or the request failed): too late to interrupt.
        self._finished = False

    async def end(self, outcome: Outcome, status: int, error: GatewayError | None = None) -> None:
        """Stop the generations, release the sequences, tell the plugins; idempotent."""
        if self.report.sent:
            return
        with anyio.CancelScope(shield=True):
            await self.source.aclose()
        self.lease.release()
        await self.report.send(outcome, status, error)

    # -- streaming (the :class:`gateway.sse.StreamOwner` of its EventStream) -----------------

    async def open_stream(self, grace_s: float) -> None:
        await self.source.open(grace_s)

    def interrupt(self, error: GatewayError) -> bytes | None:
        if self.report.sent or self._finished or self.encoder is None:
            return None
        self.report.interrupted = error
        return self.encoder.error(error)

    async def close(self) -> None:
        await self.end("cancelled", 499)

    async def events(self) -> AsyncGenerator[bytes, None]:
        """SSE body: the encoder's events for every delta; one error event on failure."""
        encoder = self.encoder
        assert encoder is not None, "events() of a non-streaming request"
        outcome: Outcome = "cancelled"
        error: GatewayError | None = None
        try:
            for event in encoder.start():
                yield event
            async with aclosing(self.source.items()) as deltas:
                async for index, delta in deltas:
                    self.progress.record(index, delta)
                    for event in encoder.delta(index, delta):
                        yield event
            check_complete(self.request.generations, self.progress)
            outcome = "completed"
            self._finished = True
            for event in await encoder.end(self.progress.usage()):
                yield event
        except Exception as exc:  # after the headers: one error event, then the stream ends
            error = as_gateway_error(exc, self.ctx.request_id)
            outcome = "failed"
            log.error("request %s failed while streaming: %s", self.ctx.request_id, error.message)
            self._finished = True
            yield encoder.error(error)
        finally:
            await self.end(outcome, 200 if error is None else error.status, error)

    # -- one JSON body -----------------------------------------------------------------------

    async def collect(self) -> Response:
        result = Result()
        try:
            await self.drain.bounded(self._gather(result))
            check_complete(self.request.generations, self.progress)
            result.usage = self.progress.usage()
            body = await self.endpoint.body(self.request, self.ctx.request_id, self.created, result)
        except Exception as exc:
            error = as_gateway_error(exc, self.ctx.request_id)
            log.error("request %s failed: %s", self.ctx.request_id, error.message)
            await self.end("failed", error.status, error)
            return error_response(error, self.ctx.response_headers, self.endpoint.errors)
        except asyncio.CancelledError:
            await self.end("cancelled", 499)
            raise
        await self.end("completed", 200)
        return Response(body, media_type="application/json", headers=self.ctx.response_headers)

    async def _gather(self, result: Result) -> None:
        async with aclosing(self.source.items()) as deltas:
            async for index, delta in deltas:
                self.progress.record(index, delta)
                result.add(index, delta)
