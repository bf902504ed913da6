"""Running a client request's generations on a backend: fan-out, merge, collect, usage."""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway.backend import Backend
from gateway.errors import EngineError, GatewayError
from gateway.types import Delta, Finish, GenerationRequest, TextDelta, Usage

_END = object()


async def merge(
    backend: Backend, generations: Sequence[GenerationRequest]
) -> AsyncGenerator[tuple[int, Delta], None]:
    """Yield ``(choice index, delta)`` from every generation as they come.

    Closing this iterator closes every backend stream at once (their ``finally`` runs).
    """
    if len(generations) == 1:
        gen = generations[0]
        async with aclosing(backend.stream(gen)) as stream:
            async for delta in stream:
                yield gen.index, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | object]] = asyncio.Queue()

    async def pump(gen: GenerationRequest) -> None:
        try:
            async with aclosing(backend.stream(gen)) as stream:
                async for delta in stream:
                    queue.put_nowait((gen.index, delta))
        except Exception as err:  # handed to the consumer, which raises it
            queue.put_nowait((gen.index, err))
        queue.put_nowait((gen.index, _END))

    tasks = [asyncio.create_task(pump(g), name=f"generate {g.request_id}") for g in generations]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, TextDelta | Finish):
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Progress:
    """What a request has produced so far, for the end hook and usage."""

    choices_per_prompt: int
    finishes: dict[int, Finish] = field(default_factory=dict)
    streamed_tokens: int = 0
    #: Seconds between consecutive tokens of each choice (a piece of k tokens adds k values).
    token_gaps: array[float] = field(default_factory=lambda: array("d"))
    _last_token_at: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def record(self, index: int, delta: Delta) -> None:
        if isinstance(delta, TextDelta):
            self.streamed_tokens += delta.tokens
            if delta.tokens:
                self._time_tokens(index, delta.tokens)
        else:
            self.finishes[index] = delta

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


def as_gateway_error(err: Exception) -> GatewayError:
    if isinstance(err, GatewayError):
        return err
    return EngineError(f"the engine failed: {type(err).__name__}: {err}")
