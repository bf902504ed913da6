"""The model pool: every configured model, its aliases, its load state and its admission."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from gateway.admission import Admission
from gateway.backend import (
    Backend,
    Delegating,
    MemoryEstimate,
    ModelRouter,
    PublishesKVEvents,
    ReportsFailure,
    backend_factory,
)
from gateway.config import GatewayConfig, ModelConfig
from gateway.drain import Drain
from gateway.errors import ModelNotFound, ModelUnavailable, Overloaded
from gateway.hub import (
    DownloadCancelled,
    DownloadProgress,
    HubError,
    HubSource,
    HubSourced,
    hub_source_of,
)
from gateway.kv_events.events import KVEventSink
from gateway.kv_events.hub import KVEventHub
from gateway.lifecycle import Lifecycle
from gateway.types import Delta, GenerationRequest

log = logging.getLogger("gateway.pool")

#: A failed fetch from the Hub is remembered this long: requests meanwhile get its 503 at once
#: (with Retry-After) instead of asking the Hub again each.
FETCH_RETRY_AFTER_S = 10.0


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    #: Its files are being fetched from the Hugging Face Hub (then it loads).
    DOWNLOADING = "downloading"
    LOADING = "loading"
    LOADED = "loaded"
    #: Loaded, being evicted: running requests finish, new ones wait for the reload.
    DRAINING = "draining"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelEntry:
    """One configured model and its lifecycle.

    A request holds a lease (:meth:`acquire` ... :meth:`release`) from before its model is
    loaded until it ends; concurrent requests share one load, and a draining model is unloaded
    only once its leases are back. Every load and unload goes through the pool's
    :class:`~gateway.lifecycle.Lifecycle`.
    """

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        lifecycle: Lifecycle[ModelEntry],
        router: ModelRouter | None = None,
        kv_events: KVEventHub | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.lifecycle = lifecycle
        self.router = router
        self._kv_events = kv_events
        #: Where its cache's KV events go, once its first load opened it.
        self._kv_sink: KVEventSink | None = None
        #: Its Hub files' local path (a GGUF or a folder), once fetched (None: not a Hub model,
        #: or not fetched yet); applied to the current table (:attr:`effective_config`).
        self._local: Path | None = None
        #: The latest fetch from the Hub (bytes, rate), if any.
        self.download: DownloadProgress | None = None
        self.backend: Backend = self._new_backend()
        # the config refused kv_events for a backend that says it has none; this one must
        assert config.kv_events is None or isinstance(self.backend, PublishesKVEvents)
        b = config.batching
        self.admission = Admission(name, b.max_concurrent, b.max_queue, b.queue_timeout_s)
        self.state = ModelState.UNLOADED
        self.created = int(time.time())
        self.load_seconds: float | None = None
        self.error: str | None = None
        #: Requests holding this model (from before its load to their end).
        self.leases = 0
        #: ``time.monotonic()`` of the last lease taken or returned (LRU order, idle timer).
        self.last_used = time.monotonic()
        self.loads = 0
        #: The memory estimate it was loaded with, while resident.
        self.footprint: MemoryEstimate | None = None
        #: Out of the configuration (removed or replaced): takes no new request.
        self.retired = False
        self._load: asyncio.Task[None] | None = None
        #: ``time.monotonic()`` of the last failed fetch (cleared by the next one that starts).
        self._fetch_failed_at: float | None = None
        #: Set once its Hub files are fetched (or found in the cache).
        self._fetched = asyncio.Event()
        self._failure: tuple[str, float] | None = None
        self._no_leases = asyncio.Event()
        self._no_leases.set()
        self._not_evicting = asyncio.Event()
        self._not_evicting.set()

    @property
    def effective_config(self) -> ModelConfig:
        """The table with its fetched Hub files in place (what is loaded and estimated)."""
        if self._local is not None and isinstance(self.config, HubSourced):
            return self.config.with_local_files(self._local)
        return self.config

    def _new_backend(self) -> Backend:
        config = self.effective_config
        backend = backend_factory(config.backend).create(self.name, config)
        if self.router is not None and isinstance(backend, Delegating):
            backend.bind_router(self.router)
        return backend

    @property
    def loaded(self) -> bool:
        return self.state in (ModelState.LOADED, ModelState.DRAINING)

    @property
    def engine_failure(self) -> str | None:
        """Why a loaded model's engine died (:class:`ReportsFailure` backends), if it did."""
        if self.loaded and isinstance(self.backend, ReportsFailure):
            return self.backend.failure
        return None

    @property
    def status(self) -> str:
        """The state clients see: ``failed`` also when a loaded model's engine died."""
        return ModelState.FAILED.value if self.engine_failure else self.state.value

    @property
    def evicting(self) -> bool:
        return self.state in (ModelState.DRAINING, ModelState.UNLOADING)

    # -- requests --------------------------------------------------------------------------------

    async def acquire(self) -> Backend:
        """A lease for one request, once the model is loaded (behind an eviction: reloaded)."""
        failure = self.engine_failure
        if failure is not None:  # a dead engine: unload it (after its requests) and load afresh
            log.error("model %s: its engine failed (%s); reloading it", self.name, failure)
            self.error = failure
            await self.lifecycle.unload(self)
        await self._not_evicted()
        self.leases += 1
        self._no_leases.clear()
        self.last_used = time.monotonic()
        self.lifecycle.cancel_idle(self)
        try:
            # waiting for a download is bounded like a wait in the queue (503, Retry-After)
            wait_s = self.config.batching.queue_timeout_s if self.needs_fetch else None
            return await self._loaded(wait_s)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Return a lease taken by :meth:`acquire`."""
        self.leases -= 1
        self.last_used = time.monotonic()
        if self.leases == 0:
            self._no_leases.set()
            self.lifecycle.on_idle(self)

    async def ensure_loaded(self) -> Backend:
        """Load the model if it is not (sharing a load under way) without taking a lease."""
        await self._not_evicted()
        return await self._loaded()

    async def _not_evicted(self) -> None:
        self._check_retired()
        while self.evicting:
            await self._not_evicting.wait()
            self._check_retired()

    @property
    def needs_fetch(self) -> bool:
        """A Hub model whose files are not fetched (or checked in the cache) yet."""
        return self._local is None and hub_source_of(self.config) is not None

    async def _loaded(self, wait_s: float | None = None) -> Backend:
        while not self.loaded:
            self._check_retired()
            if self.lifecycle.closed:
                raise ModelUnavailable("the server is shutting down")
            if self._load is None or self._load.done():
                self._check_fetch_backoff()
                self._load = asyncio.create_task(self._fetch_and_load(), name=f"load {self.name}")
            if wait_s is not None and self.needs_fetch:
                await self._download_wait(self._load, wait_s)
            await asyncio.shield(self._load)
            if not self.loaded:
                self._check_retired()
            if not self.loaded and self._failure is not None:
                message, retry_after_s = self._failure
                raise ModelUnavailable(message, retry_after_s=retry_after_s)
        return self.backend

    async def _download_wait(self, load: asyncio.Task[None], wait_s: float) -> None:
        """Wait while the model's files are fetched, for at most ``wait_s`` (then a 503 with
        Retry-After: the download goes on); its load after that is waited for as any load."""
        waiting = asyncio.timeout(wait_s)
        try:
            async with waiting:
                while self.needs_fetch and not load.done():
                    fetched = asyncio.ensure_future(self._fetched.wait())
                    try:
                        await asyncio.wait({load, fetched}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        fetched.cancel()
        except TimeoutError:
            if not waiting.expired():
                raise
            progress = f" ({self.download.describe()})" if self.download else ""
            raise Overloaded(
                f"model {self.name!r} is being downloaded{progress}: waited {wait_s:g} s",
                retry_after_s=wait_s,
            ) from None

    def _check_fetch_backoff(self) -> None:
        """Within :data:`FETCH_RETRY_AFTER_S` of a failed fetch: its 503, without a new one."""
        if self._fetch_failed_at is None or self._failure is None:
            return
        left = self._fetch_failed_at + FETCH_RETRY_AFTER_S - time.monotonic()
        if left > 0:
            raise ModelUnavailable(self._failure[0], retry_after_s=max(1.0, left))

    def _check_retired(self) -> None:
        if self.retired:
            raise ModelUnavailable(
                f"model {self.name!r} was reconfigured or removed just now: retry",
                retry_after_s=1,
            )

    async def _fetch_and_load(self) -> None:
        source = hub_source_of(self.config)
        if source is not None and self._local is None and not await self._fetch(source):
            return
        await self.lifecycle.load(self)

    async def _fetch(self, source: HubSource) -> bool:
        """Fetch the model's files into the Hugging Face cache (or find them there); a failure
        is recorded for every waiter, as a failed load is."""
        from gateway.hub.fetch import fetch

        assert isinstance(self.config, HubSourced)
        progress = self.download = DownloadProgress(f"model {self.name} ({source.label})")
        self.state, self._failure, self._fetch_failed_at = ModelState.DOWNLOADING, None, None
        try:
            path = await asyncio.to_thread(fetch, source, progress)
        except DownloadCancelled as err:  # retired or shutting down: not a failure to report
            self.state = ModelState.UNLOADED
            self._failure = (f"model {self.name!r}: its download was stopped: retry", 1.0)
            log.info("model %s: %s (the partial file is kept, to be resumed)", self.name, err)
            return False
        except HubError as err:
            message = f"model {self.name!r} could not be fetched (the server log has the reason)"
            retry = (message, FETCH_RETRY_AFTER_S)
            self.state, self.error, self._failure = ModelState.FAILED, str(err), retry
            self._fetch_failed_at = time.monotonic()
            log.error("model %s: %s (tried again after %g s)", self.name, err, FETCH_RETRY_AFTER_S)
            return False
        except BaseException:  # cancelled: the download stops at its next chunk, resumable
            progress.cancel()
            self.state = ModelState.UNLOADED
            raise
        self._local = path
        self._fetched.set()
        self.backend = self._new_backend()  # the old one never started
        self.state = ModelState.UNLOADED
        log.info("model %s: %s is in the Hugging Face cache: %s", self.name, source.label, path)
        return True

    def stop_download(self) -> None:
        if self.download is not None:
            self.download.cancel()

    # -- transitions, driven by the lifecycle --------------------------------------------------

    def mark_queued(self) -> None:
        if self.state in (ModelState.UNLOADED, ModelState.FAILED):
            self.state = ModelState.LOADING

    def mark_loading(self) -> None:
        self.state, self._failure = ModelState.LOADING, None

    def mark_no_room(self, message: str, retry_after_s: float) -> None:
        log.error("model %s not loaded: %s", self.name, message)
        self.state, self.error = ModelState.UNLOADED, message
        self._failure = (message, max(1.0, retry_after_s))

    def mark_not_queued(self) -> None:
        if self.state is ModelState.LOADING:  # cancelled, or retired while queued
            self.state = ModelState.UNLOADED

    def _attach_kv_events(self) -> None:
        """Hand the backend its KV-event sink (opened on the first load: a bad endpoint fails
        the load)."""
        cfg = self.config.kv_events
        if cfg is None or self._kv_events is None:
            return
        if self._kv_sink is None:
            self._kv_sink = self._kv_events.sink(self.name, cfg)
        assert isinstance(self.backend, PublishesKVEvents)
        self.backend.publish_kv_events(self._kv_sink, cfg.block_size)

    async def start_backend(self) -> bool:
        started = time.perf_counter()
        try:
            self._attach_kv_events()
            await self.backend.start()
        except Exception as err:  # a load failure is reported to every waiter, not raised here
            # the reason (paths, replica URLs, library messages) goes to the log and /admin
            message = f"model {self.name!r} failed to load (the server log has the reason)"
            self.state, self.error, self._failure = ModelState.FAILED, str(err), (message, 5.0)
            log.error("model %s failed to load: %s", self.name, err)
            await self._discard_backend()
            return False
        self.load_seconds = time.perf_counter() - started
        self.loads += 1
        capacity = min(self.admission.capacity, self.backend.info.max_concurrent)
        if capacity < self.admission.capacity:
            log.warning(
                "model %s: backend runs at most %d sequences at once (config asked for %d)",
                self.name,
                capacity,
                self.admission.capacity,
            )
            self.admission.resize(capacity)
        self.state, self.error = ModelState.LOADED, None
        log.info("model %s loaded in %.2f s", self.name, self.load_seconds)
        return True

    def begin_drain(self) -> None:
        self.state = ModelState.DRAINING
        self._not_evicting.clear()

    def cancel_drain(self) -> None:
        self.state = ModelState.LOADED
        self._not_evicting.set()

    async def drained(self) -> None:
        """Return once no request holds the model."""
        await self._no_leases.wait()

    async def settled(self) -> None:
        """Return once the load under way, if any, has ended."""
        if self._load is not None:
            await asyncio.gather(asyncio.shield(self._load), return_exceptions=True)

    async def stop_backend(self) -> None:
        """Free the backend (a fresh one, not started, takes its place for the next load)."""
        self.state = ModelState.UNLOADING
        self._not_evicting.clear()
        try:
            await self._discard_backend()
            log.info("model %s unloaded", self.name)
        finally:
            self.state = ModelState.UNLOADED
            self._not_evicting.set()

    async def _discard_backend(self) -> None:
        backend, self.backend = self.backend, self._new_backend()
        try:
            await backend.aclose()
        except Exception as err:  # freeing must go on; the old backend object is dropped
            log.error("model %s: closing its backend failed: %s", self.name, err)

    def retire(self) -> None:
        self.retired = True
        self.stop_download()  # stops at its next chunk; the partial file is kept
        if self.state is ModelState.LOADED:
            self.begin_drain()


_IN_PLACE = frozenset({"aliases", "load", "idle_unload_after_s"})


def _in_place(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a model's new table differs from the old only in keys applied without reload."""
    if type(old) is not type(new):
        return False
    keep = {k: getattr(old, k) for k in _IN_PLACE}
    return new.model_copy(update=keep) == old


def _names(entries: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    by_name: dict[str, ModelEntry] = {}
    for entry in entries.values():
        for alias in (entry.name, *entry.config.aliases):
            by_name[alias] = entry
    return by_name


@dataclass
class Reconfigured:
    """What :meth:`ModelPool.reconfigure` did, by model name."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: Reloaded with their new table (once their running requests are done).
    changed: list[str] = field(default_factory=list)
    #: Changed only in keys applied in place (aliases, load, idle_unload_after_s).
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class ModelPool:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.lifecycle: Lifecycle[ModelEntry] = Lifecycle(config.lifecycle)
        self.kv_events = KVEventHub(config.server)
        self.entries = {name: self._entry(name, cfg) for name, cfg in config.models.items()}
        self._by_name = _names(self.entries)
        #: Set once the ``load = "startup"`` models have loaded (``/ready``).
        self.started = False
        #: Started on shutdown: /ready 503, new requests 503, accepted ones end by its deadline.
        self.drain = Drain(config.server.drain_timeout_s)

    @property
    def draining(self) -> bool:
        return self.drain.started

    def _entry(self, name: str, config: ModelConfig) -> ModelEntry:
        return ModelEntry(name, config, self.lifecycle, router=self, kv_events=self.kv_events)

    def reconfigure(self, config: GatewayConfig) -> Reconfigured:
        """Apply a new (validated) config's models and ``[lifecycle]``; ``[server]`` and plugins
        stay as they are (the caller says they need a restart).

        Added models are served at once (``load = "startup"`` ones load now). Removed and
        changed ones stop taking requests, finish the running ones, and unload; a changed model
        that was loaded then loads again with its new table. A change only to ``aliases``,
        ``load`` or ``idle_unload_after_s`` applies in place.
        """
        old = self.entries
        report = Reconfigured()
        entries: dict[str, ModelEntry] = {}
        for name, cfg in config.models.items():
            entry = old.get(name)
            if entry is None:
                entries[name] = self._entry(name, cfg)
                report.added.append(name)
            elif _in_place(entry.config, cfg):
                (report.unchanged if entry.config == cfg else report.updated).append(name)
                entry.config = cfg
                entries[name] = entry
            else:
                entries[name] = self._entry(name, cfg)
                report.changed.append(name)
        report.removed = [name for name in old if name not in config.models]
        self.config = config
        self.lifecycle.configure(config.lifecycle)
        self.entries, self._by_name = entries, _names(entries)
        for name in report.removed:
            self.lifecycle.retire(old[name])
        for name in report.changed:
            reload = old[name].loaded or old[name].state is ModelState.LOADING
            if reload or entries[name].config.load == "startup":
                self.lifecycle.retire(old[name], then=self._load_later(entries[name]))
            else:
                self.lifecycle.retire(old[name])
        for name in report.added:
            if entries[name].config.load == "startup":
                self.lifecycle.spawn(self._load_later(entries[name]), f"load {name}")
        for name in report.updated:
            self.lifecycle.on_idle(entries[name])
        return report

    async def _load_later(self, entry: ModelEntry) -> None:
        try:
            await entry.ensure_loaded()
        except ModelUnavailable as err:  # already logged; requests get the 503
            log.debug("background load of %s: %s", entry.name, err)

    def resolve(self, name: str) -> ModelEntry:
        entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return entry

    def model_config(self, model: str) -> ModelConfig:
        return self.resolve(model).config

    async def generate(self, model: str, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """One sequence on ``model`` for a delegating backend (a fallback): that model's load,
        validation and admission apply (its queue full: 503)."""
        entry = self.resolve(model)
        backend = await entry.acquire()
        try:
            request = replace(request, tokenized=await backend.validate(request))
            async with entry.admission.admit(1), aclosing(backend.stream(request)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            entry.release()

    def names(self) -> list[tuple[str, ModelEntry]]:
        """Every model id clients may use (names and aliases) with its entry."""
        return list(self._by_name.items())

    @property
    def ready(self) -> bool:
        """The startup models have loaded (later they may be unloaded: requests reload them),
        none has a dead engine, and the server is not shutting down."""
        dead = any(e.engine_failure for e in self.entries.values())
        return self.started and not self.draining and not dead

    async def start(self) -> None:
        """Load every ``load = "startup"`` model; raise if any fails."""
        startup = [e for e in self.entries.values() if e.config.load == "startup"]
        results = await asyncio.gather(
            *(e.ensure_loaded() for e in startup), return_exceptions=True
        )
        failed = [
            (e, r) for e, r in zip(startup, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            entry, err = failed[0]
            if entry.error is None or not isinstance(err, ModelUnavailable):
                raise err
            # for the operator (the CLI's one line): the reason clients are not told
            raise ModelUnavailable(f"model {entry.name!r} failed to load: {entry.error}") from err
        self.started = True

    async def aclose(self) -> None:
        for entry in self.entries.values():
            entry.stop_download()  # a download thread must not hold the process open
        await self.lifecycle.aclose()
        await asyncio.to_thread(self.kv_events.close)
