"""Which models are resident: one load at a time, eviction within a budget, idle unload.

Every load goes through one FIFO lock per pool, and a model has at most one load pending, so
queued loads run model by model in arrival order and the requests waiting for a model are served
together once it is in (two models that do not fit together alternate in batches, not request
by request). Before a load, :class:`Lifecycle` makes room within ``[lifecycle]``: it evicts the
least recently used model, idle ones first; an evicted model takes no new requests (they queue
behind its unload and reload), and its running requests finish first, for at most
``drain_timeout_s``: a stream is never cut off, the eviction is given up instead and the load
that needed room fails with a 503. A model idle for its ``idle_unload_after_s`` is unloaded.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gateway.backend import EstimatesMemory, MemoryEstimate, backend_factory
from gateway.config import LifecycleConfig, ModelConfig

log = logging.getLogger("gateway.lifecycle")


class Resident(Protocol):
    """What the lifecycle needs of a model it loads and unloads (the pool's ``ModelEntry``)."""

    name: str
    config: ModelConfig
    footprint: MemoryEstimate | None
    retired: bool
    leases: int
    last_used: float

    @property
    def loaded(self) -> bool: ...

    @property
    def effective_config(self) -> ModelConfig:
        """``config`` with its fetched Hub files in place (``config`` itself otherwise)."""
        ...

    def mark_queued(self) -> None: ...

    def mark_loading(self) -> None: ...

    def mark_no_room(self, message: str, retry_after_s: float) -> None: ...

    def mark_not_queued(self) -> None: ...

    async def start_backend(self) -> bool: ...

    async def stop_backend(self) -> None: ...

    def begin_drain(self) -> None: ...

    def cancel_drain(self) -> None: ...

    async def drained(self) -> None: ...

    async def settled(self) -> None: ...

    def retire(self) -> None: ...


ModelEntry = TypeVar("ModelEntry", bound=Resident)


class NoRoom(Exception):
    """A model can't be loaded within the budget now (or ever, if it doesn't fit alone)."""


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Budget:
    """The limits of ``[lifecycle]`` applied to memory estimates (``None``: not enforced)."""

    gpu_bytes: tuple[int, ...] = ()
    host_bytes: int | None = None
    max_models: int | None = None

    @classmethod
    def of(cls, config: LifecycleConfig) -> Budget:
        return cls(config.gpu_memory_bytes, config.host_memory_bytes, config.max_loaded_models)

    @property
    def limits_memory(self) -> bool:
        return bool(self.gpu_bytes) or self.host_bytes is not None

    def overflow(
        self, need: MemoryEstimate | None, resident: Iterable[MemoryEstimate | None]
    ) -> str | None:
        """Why ``need`` does not fit beside ``resident``; None if it fits."""
        others = list(resident)
        if self.max_models is not None and len(others) + 1 > self.max_models:
            return f"max_loaded_models = {self.max_models} are loaded"
        if need is None:
            return None
        for device, limit in enumerate(self.gpu_bytes):
            used = sum(_gpu(e, device) for e in others)
            if used + _gpu(need, device) > limit:
                return _short(f"on GPU {device}", _gpu(need, device), limit, used)
        if self.host_bytes is not None:
            used = sum(_host(e, len(self.gpu_bytes)) for e in others)
            host = _host(need, len(self.gpu_bytes))
            if used + host > self.host_bytes:
                return _short("of host memory", host, self.host_bytes, used)
        return None


def _short(where: str, need: int, limit: int, used: int) -> str:
    return (
        f"it needs {format_bytes(need)} {where}; the budget is {format_bytes(limit)}, "
        f"{format_bytes(used)} of it held by other models"
    )


def _gpu(estimate: MemoryEstimate | None, device: int) -> int:
    if estimate is None or device >= len(estimate.gpu_bytes):
        return 0
    return estimate.gpu_bytes[device]


def _host(estimate: MemoryEstimate | None, gpu_devices: int) -> int:
    """Host bytes; GPU bytes on devices the budget does not declare land on the host too."""
    if estimate is None:
        return 0
    return estimate.host_bytes + sum(estimate.gpu_bytes[gpu_devices:])


def estimate_memory(entry: Resident, gpu_devices: int) -> MemoryEstimate | None:
    """The backend's estimate for a model, or None if it gives none (logged if it fails).

    A Hub model is estimated from the files it was fetched to (its ``effective_config``); the
    estimate never asks the network (it runs under the load lock).
    """
    config = entry.effective_config
    factory = backend_factory(config.backend)
    if not isinstance(factory, EstimatesMemory):
        return None
    try:
        return factory.memory_estimate(config, gpu_devices)
    except (OSError, ValueError) as err:
        log.warning("model %s: no memory estimate (%s); counted as 0 bytes", entry.name, err)
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def trim_heap() -> None:
    """Hand the heap pages an unload freed back to the OS.

    glibc keeps freed memory in its arenas; without this an unloaded model's buffers (the
    engine's allocations) would stay in the process's RSS until reused.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Lifecycle(Generic[ModelEntry]):
    """One per pool: the load lock, the resident models and their footprints, idle timers."""

    def __init__(self, config: LifecycleConfig) -> None:
        self.config = config
        self.budget = Budget.of(config)
        #: Models holding memory (loading, loaded, draining, unloading), retired ones included.
        self.resident: set[ModelEntry] = set()
        self._lock = asyncio.Lock()  # FIFO: loads and unloads run one at a time, in order
        self._timers: dict[ModelEntry, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def configure(self, config: LifecycleConfig) -> None:
        """New limits apply to the next load (nothing is evicted to meet them at once)."""
        self.config = config
        self.budget = Budget.of(config)

    # -- loading -------------------------------------------------------------------------------

    async def load(self, entry: ModelEntry) -> None:
        """Load ``entry`` (the body of its one shared load task): room first, then its backend.

        A failure is recorded on the entry for every waiter, not raised.
        """
        entry.mark_queued()
        try:
            async with self._lock:
                if entry.loaded or entry.retired or self.closed:
                    return
                entry.mark_loading()
                try:
                    footprint = await self._make_room(entry)
                except NoRoom as err:
                    entry.mark_no_room(str(err), self.config.drain_timeout_s)
                    return
                self.resident.add(entry)
                entry.footprint = footprint
                if not await entry.start_backend():
                    self._gone(entry)
                    return
        finally:
            entry.mark_not_queued()
        self.on_idle(entry)

    async def _make_room(self, entry: ModelEntry) -> MemoryEstimate | None:
        budget = self.budget
        need = None
        if budget.limits_memory:
            need = await asyncio.to_thread(estimate_memory, entry, len(budget.gpu_bytes))
        alone = budget.overflow(need, [])
        if alone is not None:
            raise NoRoom(f"model {entry.name!r} does not fit in [lifecycle]: {alone}")
        while (problem := budget.overflow(need, self._footprints(entry))) is not None:
            victim = self._victim(entry)
            if victim is None:
                raise NoRoom(f"no room for model {entry.name!r}: {problem}")
            log.info("evicting model %s to load %s: %s", victim.name, entry.name, problem)
            await self._evict(victim)
        return need

    def _footprints(self, entry: ModelEntry) -> list[MemoryEstimate | None]:
        return [e.footprint for e in self.resident if e is not entry]

    def _victim(self, entry: ModelEntry) -> ModelEntry | None:
        """Retired models first (they are going anyway), then idle ones, least recently used."""
        candidates = [e for e in self.resident if e is not entry and e.loaded]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (not e.retired, e.leases > 0, e.last_used))

    async def _evict(self, victim: ModelEntry) -> None:
        """Drain ``victim`` (bounded) and unload it; :class:`NoRoom` if its requests run on."""
        if not victim.retired:
            victim.begin_drain()
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await victim.drained()
        except TimeoutError:
            if not victim.retired:
                victim.cancel_drain()
            raise NoRoom(
                f"model {victim.name!r} still runs {victim.leases} request(s) after "
                f"drain_timeout_s = {self.config.drain_timeout_s:g}"
            ) from None
        except BaseException:
            if not victim.retired:
                victim.cancel_drain()
            raise
        await self._unload(victim)

    async def _unload(self, entry: ModelEntry) -> None:
        self.cancel_idle(entry)
        try:
            await entry.stop_backend()
        finally:
            self._gone(entry)
        await asyncio.to_thread(trim_heap)

    def _gone(self, entry: ModelEntry) -> None:
        self.resident.discard(entry)
        entry.footprint = None

    # -- unloading by hand, by idleness, by reconfiguration ------------------------------------

    async def unload(self, entry: ModelEntry) -> None:
        """Unload now, after its running requests (bounded); :class:`NoRoom` if they run on."""
        async with self._lock:
            if entry.loaded:
                await self._evict(entry)

    def on_idle(self, entry: ModelEntry) -> None:
        """``entry`` has no request left: arm its idle timer (if it has one)."""
        self.cancel_idle(entry)
        after = entry.config.idle_unload_after_s
        if after is None or entry.leases or not entry.loaded or entry.retired:
            return
        loop = asyncio.get_running_loop()
        self._timers[entry] = loop.call_later(after, self._idle_expired, entry)

    def cancel_idle(self, entry: ModelEntry) -> None:
        timer = self._timers.pop(entry, None)
        if timer is not None:
            timer.cancel()

    def _idle_expired(self, entry: ModelEntry) -> None:
        self._timers.pop(entry, None)
        self.spawn(self._unload_idle(entry), f"idle unload {entry.name}")

    async def _unload_idle(self, entry: ModelEntry) -> None:
        async with self._lock:
            after = entry.config.idle_unload_after_s
            idle_s = time.monotonic() - entry.last_used
            if entry.leases or not entry.loaded or entry.retired or after is None:
                return
            if idle_s < after:  # used meanwhile: wait for the rest of the interval
                self._timers[entry] = asyncio.get_running_loop().call_later(
                    after - idle_s, self._idle_expired, entry
                )
                return
            log.info("unloading model %s: idle for %.1f s", entry.name, idle_s)
            await self._unload(entry)

    def retire(self, entry: ModelEntry, then: Coroutine[Any, Any, object] | None = None) -> None:
        """``entry`` left the configuration: unload it once its requests are done, then ``then``.

        It takes no new request; running ones are never cut off (no timeout here), and a load
        that needs its memory meanwhile waits for them up to ``drain_timeout_s``.
        """
        entry.retire()
        self.cancel_idle(entry)
        self.spawn(self._retire(entry, then), f"retire {entry.name}")

    async def _retire(self, entry: ModelEntry, then: Coroutine[Any, Any, object] | None) -> None:
        try:
            await entry.settled()
            await entry.drained()
            async with self._lock:
                if entry in self.resident and entry.loaded:
                    await self._unload(entry)
            if then is not None:
                await then
                then = None
        finally:
            if then is not None:
                then.close()

    # -- tasks and shutdown --------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """Run background work owned by the pool; failures are logged."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        """Stop timers and background work, then unload every resident model (after the load
        running now, if any; loads queued behind it are dropped)."""
        self.closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self._lock:
            results = await asyncio.gather(
                *(self._unload(e) for e in list(self.resident)), return_exceptions=True
            )
        for err in results:
            if isinstance(err, BaseException):
                log.error("unloading a model at shutdown failed: %s", err)
