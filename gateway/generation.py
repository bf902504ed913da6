"""Running a client request's generations on a backend: fan-out, merge, collect, usage."""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import assert_never

from gateway.backend import Backend
from gateway.errors import EngineError, GatewayError, InternalError
from gateway.output.parser import OutputParser
from gateway.types import (
    Delta,
    EmbeddingDelta,
    Finish,
    GenerationRequest,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("gateway.generation")


async def generate(backend: Backend, gen: GenerationRequest) -> AsyncGenerator[Delta, None]:
    """One generation's deltas; text parsed into content, reasoning and tool calls where the
    core parses this model's output."""
    plan = gen.output
    fmt = plan.format if plan is not None else None
    async with aclosing(backend.stream(gen)) as stream:
        if plan is None or fmt is None:
            async for delta in stream:
                yield delta
            return
        opened = gen.tokenized is not None and gen.tokenized.reasoning_open
        parser = OutputParser(fmt, parse_tools=plan.parse_tools, reasoning_open=opened)
        async for delta in stream:
            for out in parser.feed(delta):
                yield out


async def merge(
    backend: Backend, generations: Sequence[GenerationRequest], at_once: int | None = None
) -> AsyncGenerator[tuple[int, Delta], None]:
    """Yield ``(choice index, delta)`` from every generation as they come, at most
    ``at_once`` of them running at a time (the sequences admission granted; None: all).

    Closing this iterator closes every backend stream at once (their ``finally`` runs).
    """
    if len(generations) == 1:
        gen = generations[0]
        async with aclosing(generate(backend, gen)) as stream:
            async for delta in stream:
                yield gen.index, delta
        return
    #: a delta, the error that ended a generation, or None when a generation is over
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

    turns = asyncio.Semaphore(at_once or len(generations))

    async def pump(gen: GenerationRequest) -> None:
        try:
            async with turns, aclosing(generate(backend, gen)) as stream:
                async for delta in stream:
                    queue.put_nowait((gen.index, delta))
        except Exception as err:  # handed to the consumer, which raises it
            queue.put_nowait((gen.index, err))
        queue.put_nowait((gen.index, None))

    tasks = [asyncio.create_task(pump(g), name=f"generate {g.request_id}") for g in generations]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Progress:
    """What a request has produced so far, for the end hook and usage."""

    choices_per_prompt: int
    #: When the request started (``time.perf_counter()``), for the time to first token.
    started: float = field(default_factory=time.perf_counter)
    finishes: dict[int, Finish] = field(default_factory=dict)
    streamed_tokens: int = 0
    ttft_s: float | None = None
    #: Seconds between consecutive tokens of each choice (a piece of k tokens adds k values).
    token_gaps: array[float] = field(default_factory=lambda: array("d"))
    _last_token_at: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def record(self, index: int, delta: Delta) -> None:
        match delta:
            case (
                TextDelta(tokens=tokens)
                | ReasoningDelta(tokens=tokens)
                | ToolCallDelta(tokens=tokens)
            ):
                self._first_output()
                self.streamed_tokens += tokens
                if tokens:
                    self._time_tokens(index, tokens)
            case EmbeddingDelta():
                self._first_output()
            case PromptProgress():
                pass  # no output yet
            case Finish():
                self.finishes[index] = delta
            case _:
                assert_never(delta)

    def _first_output(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def _time_tokens(self, index: int, tokens: int) -> None:
        now = time.perf_counter()
        last = self._last_token_at.get(index)
        self._last_token_at[index] = now
        if last is not None:
            gap = (now - last) / tokens
            if tokens == 1:
                self.token_gaps.append(gap)
            else:
                self.token_gaps.extend([gap] * tokens)

    def usage(self) -> Usage:
        """Prompt tokens once per distinct prompt, completion tokens over every choice."""
        total = Usage()
        for index, fin in self.finishes.items():
            if index % self.choices_per_prompt == 0:
                total += fin.usage
            else:
                total += Usage(completion_tokens=fin.usage.completion_tokens)
        unfinished = self.streamed_tokens - sum(
            f.usage.completion_tokens for f in self.finishes.values()
        )
        return total + Usage(completion_tokens=max(0, unfinished))


def check_complete(generations: Sequence[GenerationRequest], progress: Progress) -> None:
    missing = [g.index for g in generations if g.index not in progress.finishes]
    if missing:
        raise EngineError(f"the backend ended choices {missing} without a finish")


def as_gateway_error(err: Exception, request_id: str) -> GatewayError:
    """A :class:`GatewayError` as it is; anything else is a bug: logged here, once, with its
    traceback, and answered with an :class:`InternalError` that shows nothing of it."""
    if isinstance(err, GatewayError):
        return err
    log.error("request %s: unexpected error", request_id, exc_info=err)
    return InternalError(request_id)
