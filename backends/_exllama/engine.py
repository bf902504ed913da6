"""The engine loop: one thread drives a dynamic generator; requests talk to it through queues.

ExLlamaV2's ``ExLlamaV2DynamicGenerator`` and exllamav3's ``Generator`` share one shape:
``enqueue(job)``, ``cancel(job)``, ``iterate() -> list[dict]``, ``num_remaining_jobs()``. Each
``iterate()`` starts the pending jobs that fit (batch size, free cache pages), runs one chunk of
prefill and one decode step for the batch, and returns the results. Jobs join and leave the
batch between steps.

The generator is not thread-safe, so only this thread touches it. Requests are *tickets*:
``submit`` and ``cancel`` put a command on the queue and wake the thread, which applies them
between steps. Each ticket has a :class:`Sink` the thread hands deltas to (the asyncio side's
queue). Stop strings are matched here, on the engine thread, so a job that hits one is
cancelled before the next step and its cache pages freed at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends._exllama.results import Chunk, End, Failed, read_result
from gateway.backend import EngineStats
from gateway.errors import EngineError, GatewayError, ModelUnavailable
from gateway.output.matchers import Constraint
from gateway.stops import StopMatcher
from gateway.types import Delta, Finish, FinishReason, SamplingParams, TextDelta, Usage

log = logging.getLogger("backends.exllama.engine")


class DynamicGenerator(Protocol):
    """The part of the libraries' dynamic generators the engine uses."""

    def enqueue(self, job: Any) -> Any: ...

    def cancel(self, job: Any) -> None: ...

    def iterate(self) -> Sequence[Mapping[str, Any]]: ...

    def num_remaining_jobs(self) -> int: ...

    def clear_queue(self) -> None: ...


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One generation as the library job is built from it (on the engine thread)."""

    input_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...]
    #: The grammar the output must follow (the job gets it as a filter).
    constraint: Constraint | None = None
    #: Decode special tokens into the text (the model's tool-call markers are some).
    decode_special: bool = False


class EngineModel(Protocol):
    """A loaded model as the engine sees it: its generator and how to make jobs for it."""

    @property
    def generator(self) -> DynamicGenerator: ...

    def make_job(self, spec: JobSpec, identifier: int) -> Any:
        """A library job for ``spec`` that reports ``identifier`` in its results."""
        ...

    def cached_tokens(self, job: Any) -> int:
        """Prompt tokens of ``job`` whose keys/values came from the cache (prefix reuse)."""
        ...

    def kv_usage(self) -> tuple[int, int]:
        """(tokens in pages referenced by live jobs, tokens the cache holds)."""
        ...


class Sink(Protocol):
    """Where the engine thread puts a ticket's deltas, then its Finish or one error."""

    def put(self, item: Delta | GatewayError) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One submitted generation, shared by the asyncio side and the engine thread."""

    id: int
    spec: JobSpec
    stops: tuple[str, ...]
    prompt_tokens: int
    sink: Sink
    #: Set by the requester when its client has gone; read by the engine thread.
    cancel_requested: bool = False


@dataclass(eq=False)
class _Running:
    """Engine-thread state of a ticket whose job is in the generator."""

    ticket: Ticket
    job: Any
    matcher: StopMatcher
    tokens: int = 0
    unsent_tokens: int = 0


@dataclass
class _Counters:
    decode_steps: int = 0
    tokens_generated: int = 0
    tokens_after_cancel: int = 0
    cancelled: int = 0
    max_batch_sequences: int = 0
    cached_prompt_tokens: int = 0
    kv_used: int = 0
    kv_total: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0


@dataclass
class _Inbox:
    submits: deque[Ticket] = field(default_factory=deque)
    cancels: deque[Ticket] = field(default_factory=deque)
    stop: bool = False

    def __bool__(self) -> bool:
        return bool(self.submits or self.cancels or self.stop)


class _WaitingSink:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.last: Delta | GatewayError | None = None

    def put(self, item: Delta | GatewayError) -> None:
        if isinstance(item, Finish | GatewayError):
            self.last = item
            self.done.set()


class EngineStopped(ModelUnavailable):
    """The model is being unloaded; no new work is taken (503 with Retry-After)."""


class EngineLoop:
    """Runs a generator on its own thread. ``start`` once, ``stop`` once."""

    def __init__(self, model: EngineModel, name: str) -> None:
        self.model = model
        self.name = name
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._running: dict[int, _Running] = {}
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: Why the loop crashed, if it did (the model must then be reloaded).
        self.failure: str | None = None
        #: The last failed generator step's error (the log's and the operator's, not clients').
        self.step_error: str | None = None

    # ---- the requesters' side (any thread) ----

    def start(self) -> None:
        self._update_kv()
        self._thread = threading.Thread(target=self._run, name=f"engine {self.name}", daemon=True)
        self._thread.start()

    def submit(
        self, spec: JobSpec, *, stops: Sequence[str], prompt_tokens: int, sink: Sink
    ) -> Ticket:
        ticket = Ticket(next(self._ids), spec, tuple(stops), prompt_tokens, sink)
        with self._cond:
            if self._stopped or self._inbox.stop:
                raise EngineStopped(f"model {self.name!r} is unloading")
            self._inbox.submits.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop ``ticket`` wherever it is (queued, prefill, decoding) and free its pages."""
        ticket.cancel_requested = True
        with self._cond:
            self._inbox.cancels.append(ticket)
            self._cond.notify()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Fail every ticket still open, drop the generator's jobs and end the thread."""
        with self._cond:
            self._inbox.stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("engine %s: thread did not stop within %.0f s", self.name, timeout_s)

    def warm_up(self, input_ids: Sequence[int], timeout_s: float = 600.0) -> None:
        """Generate two tokens on the engine thread and wait: kernels compile, the whole path
        runs once before the first request. Raises :class:`EngineError`."""
        sink = _WaitingSink()
        job = JobSpec(tuple(input_ids), 2, SamplingParams(temperature=0.0), ())
        ticket = self.submit(job, stops=(), prompt_tokens=len(input_ids), sink=sink)
        if not sink.done.wait(timeout_s):
            self.cancel(ticket)
            raise EngineError(f"the warm-up generation took longer than {timeout_s:.0f} s")
        if isinstance(sink.last, GatewayError):  # a load error: for the log and the operator
            reason = self.failure or self.step_error or sink.last.message
            raise EngineError(f"the warm-up generation failed: {reason}")

    def stats(self) -> EngineStats:
        c = self._counters
        running = len(self._running)
        return EngineStats(
            active_sequences=running,
            queued_sequences=len(self._inbox.submits),
            decode_steps=c.decode_steps,
            tokens_generated=c.tokens_generated,
            tokens_after_cancel=c.tokens_after_cancel,
            cancelled=c.cancelled,
            kv_cells_used=c.kv_used,
            kv_cells_total=c.kv_total,
            max_batch_sequences=c.max_batch_sequences,
            cached_prompt_tokens=c.cached_prompt_tokens,
            draft_tokens=c.draft_tokens,
            draft_accepted=c.draft_accepted,
        )

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as err:  # logged, recorded, every ticket failed: never silent
            log.exception("engine %s: loop crashed", self.name)
            self.failure = f"{type(err).__name__}: {err}"
            self._fail_all(EngineError("the engine loop crashed (the server log has why)"))
        finally:
            with self._cond:
                self._stopped = True
                leftovers = list(self._inbox.submits)
                self._inbox.submits.clear()
            for ticket in leftovers:
                ticket.sink.put(EngineStopped(f"model {self.name!r} is unloading"))

    def _take_inbox(self) -> _Inbox:
        with self._cond:
            while not self._inbox and not self._running:
                self._cond.wait()
            inbox, self._inbox = self._inbox, _Inbox()
            return inbox

    def _step(self) -> bool:
        """Apply commands, then one ``iterate()``; False when told to stop."""
        inbox = self._take_inbox()
        for ticket in inbox.cancels:
            self._cancel(ticket)
        for ticket in inbox.submits:
            self._enqueue(ticket)
        if inbox.stop:
            self._fail_all(EngineStopped(f"model {self.name!r} is unloading"))
            return False
        if self._running:
            self._iterate()
        return True

    def _enqueue(self, ticket: Ticket) -> None:
        if ticket.cancel_requested:
            self._counters.cancelled += 1
            return
        try:
            job = self.model.make_job(ticket.spec, ticket.id)
            self.model.generator.enqueue(job)
        except Exception as err:  # a job the library refuses fails alone
            log.exception("engine %s: could not enqueue request", self.name)
            ticket.sink.put(EngineError(f"the engine refused the request: {err}"))
            return
        self._running[ticket.id] = _Running(ticket, job, StopMatcher(ticket.stops))

    def _cancel(self, ticket: Ticket) -> None:
        run = self._running.get(ticket.id)
        if run is None:
            return
        self._retire(run)
        self._counters.cancelled += 1
        self._drop(run)

    def _retire(self, run: _Running) -> None:
        """Take ``run`` off the running table, counting its job's drafted tokens (speculative
        decoding: the libraries' jobs keep ``accepted_draft_tokens`` and
        ``rejected_draft_tokens``)."""
        self._running.pop(run.ticket.id, None)
        accepted = getattr(run.job, "accepted_draft_tokens", 0)
        rejected = getattr(run.job, "rejected_draft_tokens", 0)
        if isinstance(accepted, int) and isinstance(rejected, int):
            self._counters.draft_tokens += accepted + rejected
            self._counters.draft_accepted += accepted

    def _drop(self, run: _Running) -> None:
        """Take ``run``'s job out of the generator, freeing its pages."""
        try:
            self.model.generator.cancel(run.job)
        except Exception:
            log.exception("engine %s: cancel failed; clearing the generator", self.name)
            self._fail_all(EngineError("the engine failed to cancel a request"))
        self._update_kv()

    def _iterate(self) -> None:
        try:
            results = self.model.generator.iterate()
        except Exception as err:
            log.exception("engine %s: generator step failed", self.name)
            self.step_error = f"{type(err).__name__}: {err}"
            self._fail_all(EngineError("the engine failed (the server log has why)"))
            return
        # Counters first, deliveries after: a requester that has its Finish sees them current.
        self._update_kv()
        events = [e for e in map(read_result, results) if e is not None]
        stepped = {e.identifier for e in events if not isinstance(e, Failed)} & set(self._running)
        if stepped:
            c = self._counters
            c.decode_steps += 1
            c.max_batch_sequences = max(c.max_batch_sequences, len(stepped))
        for event in events:
            run = self._running.get(event.identifier)
            if run is None:  # not ours, or ended earlier in this step
                continue
            if isinstance(event, Failed):
                self._retire(run)
                run.ticket.sink.put(EngineError(event.message))
            else:
                self._on_output(run, event)

    def _on_output(self, run: _Running, event: Chunk | End) -> None:
        c = self._counters
        tokens = event.tokens
        if isinstance(event, End):
            tokens = max(tokens, event.new_tokens - run.tokens)
        c.tokens_generated += tokens
        run.tokens += tokens
        if run.ticket.cancel_requested:
            c.tokens_after_cancel += tokens
            if isinstance(event, Chunk):  # still in the generator: take it out now
                self._retire(run)
                c.cancelled += 1
                self._drop(run)
            else:
                self._retire(run)
            return
        constraint = run.ticket.spec.constraint
        if constraint is not None and constraint.failed is not None:
            self._retire(run)
            if isinstance(event, Chunk):
                self._drop(run)
            run.ticket.sink.put(EngineError(f"the output grammar failed: {constraint.failed}"))
            return
        run.unsent_tokens += event.tokens
        self._send(run, run.matcher.feed(event.text))
        if run.matcher.stopped:
            self._retire(run)
            cached = self.model.cached_tokens(run.job)
            self._drop(run)
            self._finish(run, "stop", cached)
        elif isinstance(event, End):
            self._retire(run)
            self._send(run, run.matcher.flush())
            self._finish(run, event.reason, event.cached_tokens)

    def _send(self, run: _Running, text: str) -> None:
        if text:
            run.ticket.sink.put(TextDelta(text, run.unsent_tokens))
            run.unsent_tokens = 0

    def _finish(self, run: _Running, reason: FinishReason, cached: int) -> None:
        ticket = run.ticket
        cached = min(cached, ticket.prompt_tokens)
        self._counters.cached_prompt_tokens += cached
        usage = Usage(ticket.prompt_tokens, run.tokens, cached)
        ticket.sink.put(Finish(reason, usage, run.matcher.matched))

    def _fail_all(self, error: GatewayError) -> None:
        running = list(self._running.values())
        for run in running:
            self._retire(run)
            run.ticket.sink.put(error)
        try:
            self.model.generator.clear_queue()
        except Exception:
            log.exception("engine %s: clearing the generator failed", self.name)
        self._update_kv()

    def _update_kv(self) -> None:
        try:
            used, total = self.model.kv_usage()
        except Exception:  # stats are best effort; never let them stop the engine
            log.debug("engine %s: kv usage unavailable", self.name, exc_info=True)
            return
        self._counters.kv_used, self._counters.kv_total = used, total
