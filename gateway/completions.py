"""``/v1/chat/completions`` and ``/v1/completions``: prepare, then stream or collect.

Everything that can fail because of the request happens in :func:`prepare`, before any
response byte: plugins' hooks, parsing, model lookup and load, the backend's validation and
admission. After that a :class:`Job` owns the admitted sequences until it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.backend import Backend
from gateway.config import GatewayConfig
from gateway.disconnect import ClientDisconnected, unless_disconnected
from gateway.errors import GatewayError, ModelUnavailable
from gateway.generation import Progress, as_gateway_error, check_complete, merge
from gateway.http import error_response, read_json_body
from gateway.plugins import Outcome, PluginChain, RequestContext, ResponseEnd
from gateway.pool import ModelEntry, ModelPool
from gateway.sse import JobEventStream
from gateway.types import ClientRequest, Delta, Endpoint, TextDelta, Usage
from gateway.wire.convert import chat_request, completion_request
from gateway.wire.responses import Choice, StreamEncoder, completion_body, error_event

log = logging.getLogger("gateway.completions")

_PARSERS: dict[Endpoint, Callable[[bytes, str], ClientRequest]] = {
    "chat": chat_request,
    "completion": completion_request,
}
_ID_PREFIX: dict[Endpoint, str] = {"chat": "chatcmpl-", "completion": "cmpl-"}
_DONE = b"data: [DONE]\n\n"


def _frame(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


@dataclass(frozen=True)
class Services:
    config: GatewayConfig
    pool: ModelPool
    plugins: PluginChain


class Job:
    """One admitted request: runs its generations and releases its sequences exactly once."""

    def __init__(
        self,
        services: Services,
        ctx: RequestContext,
        entry: ModelEntry,
        backend: Backend,
        request: ClientRequest,
        queue_wait_s: float,
    ) -> None:
        self.services = services
        self.ctx = ctx
        self.entry = entry
        self.backend = backend
        self.request = request
        self.queue_wait_s = queue_wait_s
        self.created = int(time.time())
        self.progress = Progress(choices_per_prompt=self._choices_per_prompt())
        self.ttft_s: float | None = None
        self._ended = False
        self._completed = False
        #: Why the server ended this job early (the drain deadline); None if it did not.
        self.interrupted: GatewayError | None = None
        self._deltas: AsyncGenerator[tuple[int, Delta], None] | None = None
        self._first: asyncio.Task[tuple[int, Delta] | None] | None = None

    def _choices_per_prompt(self) -> int:
        prompts = {(g.prompt, g.messages) for g in self.request.generations}
        return max(1, self.request.n // len(prompts))

    async def end(self, outcome: Outcome, status: int, error: GatewayError | None = None) -> None:
        """Release the sequences and tell the plugins; idempotent, safe under cancellation."""
        if self._ended:
            return
        self._ended = True
        if outcome == "cancelled" and self.interrupted is not None:
            outcome, status, error = "failed", self.interrupted.status, self.interrupted
        with anyio.CancelScope(shield=True):
            await self._close_stream()
        self.entry.admission.release(self.request.n)
        self.entry.release()
        end = ResponseEnd(
            outcome=outcome,
            status=status,
            usage=self.progress.usage(),
            duration_s=time.perf_counter() - self.ctx.started,
            queue_wait_s=self.queue_wait_s,
            ttft_s=self.ttft_s,
            error=error,
            inter_token_s=self.progress.token_gaps,
        )
        with anyio.CancelScope(shield=True):
            await self.services.plugins.on_response_end(self.ctx, end)

    async def open_stream(self, grace_s: float) -> None:
        """Start the generations and wait up to ``grace_s`` for the first delta.

        The response headers go out after this: an error a backend can only raise once it runs
        (a remote replica's 4xx, every replica down) gets its own HTTP status instead of a 200
        and an error event. A later first delta is awaited after the headers, under keep-alive
        pings (``grace_s`` is the keep-alive interval: no ping would have gone out before).
        """
        self._deltas = merge(self.backend, self.request.generations)
        self._first = asyncio.ensure_future(anext(self._deltas, None))
        try:
            done, _ = await asyncio.wait({self._first}, timeout=grace_s)
            if done:
                self._first.result()
        except BaseException:
            await self._close_stream()
            raise

    async def _opened(self) -> AsyncGenerator[tuple[int, Delta], None]:
        """The stream :meth:`open_stream` started: its first delta, then the rest."""
        assert self._first is not None and self._deltas is not None
        first = await self._first
        if first is None:
            return
        yield first
        async for item in self._deltas:
            yield item

    async def _close_stream(self) -> None:
        """Stop the generations (their backends' ``finally`` runs); idempotent."""
        if self._first is not None:
            self._first.cancel()
            await asyncio.gather(self._first, return_exceptions=True)
        if self._deltas is not None:
            await self._deltas.aclose()

    def interrupt(self, error: GatewayError) -> bool:
        """The server ends this job before it finishes (shutdown): its end reports ``error``.

        Returns False if the job has already ended or sent its last event. The caller stops the
        job's stream and sends :meth:`error_frame`.
        """
        if self._ended or self._completed:
            return False
        self.interrupted = error
        return True

    @staticmethod
    def error_frame(error: GatewayError) -> bytes:
        return _frame(error_event(error.to_body()))

    def _first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.ctx.started

    async def events(self) -> AsyncGenerator[bytes, None]:
        """SSE body: chunks, the usage chunk if asked, ``[DONE]``; one error event on failure."""
        enc = StreamEncoder(
            self.request.endpoint, self.ctx.request_id, self.created, self.request.model
        )
        outcome: Outcome = "cancelled"
        error: GatewayError | None = None
        try:
            for gen in self.request.generations:
                role = enc.role(gen.index)
                if role is not None:
                    yield _frame(role)
                if self.request.echo and gen.prompt:
                    yield _frame(enc.text(gen.index, gen.prompt))
            async with aclosing(self._opened()) as deltas:
                async for index, delta in deltas:
                    self.progress.record(index, delta)
                    if isinstance(delta, TextDelta):
                        self._first_token()
                        yield _frame(enc.text(index, delta.text))
                    else:
                        yield _frame(enc.finish(index, delta.reason))
            check_complete(self.request.generations, self.progress)
            if self.request.include_usage:
                yield _frame(enc.usage(self.progress.usage()))
            outcome = "completed"
            self._completed = True
            yield _DONE
        except Exception as exc:  # after the headers: one error event, then the stream ends
            error = as_gateway_error(exc)
            outcome = "failed"
            log.error("request %s failed while streaming: %s", self.ctx.request_id, error.message)
            self._completed = True
            yield self.error_frame(error)
        finally:
            await self.end(outcome, 200 if error is None else error.status, error)

    async def collect(self) -> Response:
        texts: dict[int, list[str]] = defaultdict(list)
        try:
            await self.services.pool.drain.bounded(self._gather(texts))
            check_complete(self.request.generations, self.progress)
        except Exception as exc:
            error = as_gateway_error(exc)
            log.error("request %s failed: %s", self.ctx.request_id, error.message)
            await self.end("failed", error.status, error)
            return error_response(error, self.ctx.response_headers)
        except asyncio.CancelledError:
            await self.end("cancelled", 499)
            raise
        await self.end("completed", 200)
        choices = [
            Choice(
                g.index,
                self._echo(g.prompt) + "".join(texts[g.index]),
                self.progress.finishes[g.index].reason,
            )
            for g in self.request.generations
        ]
        body = completion_body(
            self.request.endpoint,
            self.ctx.request_id,
            self.created,
            self.request.model,
            choices,
            self.progress.usage(),
        )
        return Response(body, media_type="application/json", headers=self.ctx.response_headers)

    async def _gather(self, texts: dict[int, list[str]]) -> None:
        async with aclosing(merge(self.backend, self.request.generations)) as deltas:
            async for index, delta in deltas:
                self.progress.record(index, delta)
                if isinstance(delta, TextDelta):
                    self._first_token()
                    texts[index].append(delta.text)

    def _echo(self, prompt: str | None) -> str:
        return prompt if self.request.echo and prompt else ""


def _new_context(request: Request, endpoint: Endpoint) -> RequestContext:
    request_id = _ID_PREFIX[endpoint] + uuid.uuid4().hex
    return RequestContext.of(request, request_id, response_headers={"x-request-id": request_id})


async def _validate(backend: Backend, request: ClientRequest) -> None:
    seen: set[int] = set()
    for gen in request.generations:
        key = hash((gen.prompt, gen.messages, gen.max_tokens))
        if key not in seen:
            seen.add(key)
            await backend.validate(gen)


async def prepare(
    services: Services, ctx: RequestContext, request: Request, endpoint: Endpoint
) -> Job:
    await services.plugins.on_request_headers(ctx)
    body = await read_json_body(request, services.config.server.max_body_bytes)
    client_request = _PARSERS[endpoint](body, ctx.request_id)
    entry = services.pool.resolve(client_request.model)
    ctx.model, ctx.request = entry.name, client_request
    await services.plugins.on_request(ctx, client_request)
    if services.pool.draining:
        raise ModelUnavailable("the server is shutting down")
    drain = services.pool.drain  # accepted before a shutdown: waits no longer than its deadline
    # the model's lease: held from before its load (if it needs one) until the Job ends
    backend = await unless_disconnected(drain.bounded(entry.acquire()), request.receive)
    try:
        await _validate(backend, client_request)
        queued = time.perf_counter()
        admitted = drain.bounded(entry.admission.acquire(client_request.n))
        await unless_disconnected(admitted, request.receive)
    except BaseException:
        entry.release()
        raise
    return Job(services, ctx, entry, backend, client_request, time.perf_counter() - queued)


async def _end_unadmitted(
    services: Services,
    ctx: RequestContext,
    outcome: Outcome,
    status: int,
    error: GatewayError | None = None,
) -> None:
    duration = time.perf_counter() - ctx.started
    await services.plugins.on_response_end(
        ctx, ResponseEnd(outcome, status, Usage(), duration, error=error)
    )


def endpoint_handler(
    services: Services, endpoint: Endpoint
) -> Callable[[Request], Awaitable[Response]]:
    server = services.config.server

    async def handle(request: Request) -> Response:
        ctx = _new_context(request, endpoint)
        try:
            job = await prepare(services, ctx, request, endpoint)
        except GatewayError as err:
            await _end_unadmitted(services, ctx, "failed", err.status, err)
            return error_response(err, ctx.response_headers)
        except (ClientDisconnected, ClientDisconnect):
            await _end_unadmitted(services, ctx, "cancelled", 499)
            return Response(status_code=499)
        except BaseException as exc:  # a bug or a shutdown: the end hook still runs (frees limits)
            with anyio.CancelScope(shield=True):
                outcome: Outcome = "failed" if isinstance(exc, Exception) else "cancelled"
                await _end_unadmitted(services, ctx, outcome, 500 if outcome == "failed" else 499)
            raise
        if job.request.stream:
            try:
                await unless_disconnected(job.open_stream(server.keepalive_s), request.receive)
            except ClientDisconnected:
                await job.end("cancelled", 499)
                return Response(status_code=499)
            except Exception as exc:  # before the headers: the error's own status
                error = as_gateway_error(exc)
                log.error("request %s failed: %s", ctx.request_id, error.message)
                await job.end("failed", error.status, error)
                return error_response(error, ctx.response_headers)
            return JobEventStream(job, server)
        try:
            return await unless_disconnected(job.collect(), request.receive)
        except ClientDisconnected:
            await job.end("cancelled", 499)
            return Response(status_code=499)

    return handle
