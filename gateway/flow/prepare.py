"""Everything that can fail because of the request, before any response byte is sent."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from starlette.requests import Request
from starlette.types import Receive

from gateway.backend import Backend, chat_format_of
from gateway.disconnect import unless_disconnected
from gateway.drain import Drain
from gateway.errors import ContextLengthExceeded, InvalidRequest, ModelUnavailable
from gateway.flow.contract import Parser
from gateway.flow.lease import Lease
from gateway.http import read_json_body
from gateway.output.plan import plan_request, with_messages
from gateway.plugins import RequestContext
from gateway.pool import ModelEntry
from gateway.services import Services
from gateway.types import BackendInfo, ChatMessage, ClientRequest


class CapabilityMissing(InvalidRequest):
    default_code = "unsupported_parameter"


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check and holds its sequences (``request`` now carries
    what the backend's validation learned of each prompt)."""

    request: ClientRequest
    lease: Lease
    queue_wait_s: float


def check_capabilities(model: str, info: BackendInfo, request: ClientRequest) -> None:
    """A 400 naming the first field the model's backend cannot serve."""
    for need in request.requires:
        if need.capability in info.capabilities:
            continue
        if need.param == "model":
            raise CapabilityMissing(
                f"model {model!r} does not serve {request.endpoint} requests "
                f"(it lacks the {need.capability.value!r} capability)",
                param="model",
                code="model_not_supported",
            )
        raise CapabilityMissing(
            f"'{need.param}' is not supported by model {model!r} (its backend lacks the "
            f"{need.capability.value!r} capability)",
            param=need.param,
        )


async def validate(backend: Backend, request: ClientRequest) -> ClientRequest:
    """Each prompt validated (tokenized) once; its generations carry what the backend learned."""
    gens = list(request.generations)
    per = max(1, request.choices_per_prompt)
    for first in range(0, len(gens), per):
        tokenized = await backend.validate(gens[first])
        for i in range(first, min(first + per, len(gens))):
            gens[i] = replace(gens[i], tokenized=tokenized)
    return replace(request, generations=tuple(gens))


def salted(request: ClientRequest, salt: str | None) -> ClientRequest:
    """Each generation's ``cache_salt`` with the caller's (``ctx.cache_salt``) mixed in: a
    client's own salt partitions its key's cache further, never joins another key's."""
    if salt is None:
        return request
    gens = tuple(replace(g, cache_salt=mixed_salt(salt, g.cache_salt)) for g in request.generations)
    return replace(request, generations=gens)


def mixed_salt(caller: str, own: str | None) -> str:
    if own is None:
        return caller
    return hashlib.sha256(f"{caller}\0{own}".encode()).hexdigest()


def with_default_max_tokens(request: ClientRequest, default: int | None) -> ClientRequest:
    """Each generation without a token limit gets the model's ``default_max_tokens``."""
    if default is None or all(g.max_tokens is not None for g in request.generations):
        return request
    gens = tuple(
        g if g.max_tokens is not None else replace(g, max_tokens=default)
        for g in request.generations
    )
    return replace(request, generations=gens)


def turn_starts(messages: Sequence[ChatMessage]) -> tuple[int, tuple[int, ...]]:
    """The leading system messages' count, and where each turn after the oldest one starts
    (a user message; a call's results go with the turn that made the call). Dropping the
    ``k`` oldest turns keeps ``messages[:head]`` and ``messages[starts[k - 1]:]``."""
    head = 0
    while head < len(messages) and messages[head].role in ("system", "developer"):
        head += 1
    starts = tuple(i for i in range(head + 1, len(messages)) if messages[i].role == "user")
    return head, starts


async def fit(backend: Backend, request: ClientRequest) -> ClientRequest:
    """The request planned and validated; with ``truncate``, as few of its oldest turns
    dropped as make it fit the context (the last user turn always stays).

    The plan (tool schemas, grammars) is made once; the shortest fit is found by a binary
    search over how many turns go, so a conversation of ``t`` turns is rendered and
    tokenized about ``log2(t) + 2`` times, not ``t`` times."""
    fmt = chat_format_of(backend)
    planned = await plan_request(request, fmt)
    try:
        return await validate(backend, planned)
    except ContextLengthExceeded:
        messages = request.generations[0].messages if request.truncate else None
        if messages is None:
            raise
        head, starts = turn_starts(messages)
        if not starts:
            raise

    def dropping(k: int) -> ClientRequest:
        return with_messages(planned, (*messages[:head], *messages[starts[k - 1] :]), fmt)

    # the fewest turns to drop: ``low`` do not fit, ``high`` does
    best = await validate(backend, dropping(len(starts)))  # only the last turn: or a 400
    low, high = 0, len(starts)
    while high - low > 1:
        mid = (low + high) // 2
        try:
            fitted = await validate(backend, dropping(mid))
        except ContextLengthExceeded:
            low = mid
        else:
            high, best = mid, fitted
    return best


@dataclass(frozen=True)
class Checked:
    """A request that passed every check and holds its model's lease (loaded, not evicted),
    but not yet its sequences: :meth:`admit` waits for them in the model's queue."""

    request: ClientRequest
    entry: ModelEntry
    backend: Backend
    sequences: int
    drain: Drain

    @property
    def prompt_tokens(self) -> int:
        """The first prompt's tokens, as the backend counted them (0 if it could not)."""
        tokenized = self.request.generations[0].tokenized if self.request.generations else None
        return tokenized.count if tokenized is not None else 0

    def release(self) -> None:
        """Give up the model's lease without running (a request that only counts tokens)."""
        self.entry.release()

    async def admit(self, receive: Receive | None = None) -> Admitted:
        """The sequences, given up if ``receive`` tells the client left; the model's lease is
        released if this fails (a full queue, its timeout, the shutdown, a cancel)."""
        queued = time.perf_counter()
        try:
            acquired = self.drain.bounded(self.entry.admission.acquire(self.sequences))
            if receive is None:
                await acquired
            else:
                await unless_disconnected(acquired, receive)
        except BaseException:
            self.entry.release()
            raise
        lease = Lease(self.entry, self.backend, self.sequences)
        return Admitted(self.request, lease, time.perf_counter() - queued)


async def check(services: Services, ctx: RequestContext, http: Request, parser: Parser) -> Checked:
    """Everything that can fail because of the request, up to the model's queue: what every
    endpoint and every token-counting route runs (the plugins, the body, the model's lookup
    and load, the shutdown, disconnects, default limits, capabilities, the context)."""
    await services.plugins.on_request_headers(ctx)
    server = services.config.server
    body = await read_json_body(http, server.max_body_bytes, server.body_timeout_s)
    request = parser.parse(body, ctx.request_id)
    request = await parser.resolve(request, ctx)
    ctx.response_headers.update(request.headers)
    entry = services.pool.resolve(request.model)
    request = with_default_max_tokens(request, entry.config.default_max_tokens)
    request = salted(request, ctx.cache_salt)
    ctx.model, ctx.request = entry.name, request
    await services.plugins.on_request(ctx, request)
    if services.pool.draining:
        raise ModelUnavailable("the server is shutting down")
    drain = services.pool.drain  # accepted before a shutdown: waits no longer than its deadline
    # the model's lease: held from before its load (if it needs one) until the request ends
    backend = await unless_disconnected(drain.bounded(entry.acquire()), http.receive)
    try:
        check_capabilities(request.model, backend.info, request)
        # rendering and tokenizing a long conversation (several times, with truncation):
        # not for a client that left
        request = await unless_disconnected(fit(backend, request), http.receive)
    except BaseException:
        entry.release()
        raise
    return Checked(request, entry, backend, request.sequences(entry.admission.capacity), drain)
