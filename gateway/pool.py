"""The model pool: every configured model, its aliases, its load state and its admission."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from enum import StrEnum

from gateway.admission import Admission
from gateway.backend import Backend, Delegating
from gateway.config import GatewayConfig, ModelConfig
from gateway.drain import Drain
from gateway.errors import ModelNotFound, ModelUnavailable
from gateway.registry import backend_factory
from gateway.types import Delta, GenerationRequest

log = logging.getLogger("gateway.pool")


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ModelEntry:
    """One configured model. Concurrent callers of :meth:`ensure_loaded` share one load."""

    def __init__(self, name: str, config: ModelConfig) -> None:
        self.name = name
        self.config = config
        self.backend: Backend = backend_factory(config.backend).create(name, config)
        b = config.batching
        self.admission = Admission(name, b.max_concurrent, b.max_queue, b.queue_timeout_s)
        self.state = ModelState.UNLOADED
        self.created = int(time.time())
        self.load_seconds: float | None = None
        self.error: str | None = None
        self._load: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return self.state is ModelState.LOADED

    async def ensure_loaded(self) -> Backend:
        if self.state is not ModelState.LOADED:
            if self._load is None or self._load.done():
                self._load = asyncio.create_task(self._do_load(), name=f"load {self.name}")
            await asyncio.shield(self._load)
            if not self.loaded:
                raise ModelUnavailable(f"model {self.name!r} failed to load: {self.error}")
        return self.backend

    async def _do_load(self) -> None:
        self.state = ModelState.LOADING
        started = time.perf_counter()
        try:
            await self.backend.start()
        except Exception as err:  # a load failure is reported to every waiter, not raised here
            self.state, self.error = ModelState.FAILED, str(err)
            log.error("model %s failed to load: %s", self.name, err)
            return
        self.load_seconds = time.perf_counter() - started
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

    async def unload(self) -> None:
        if self._load is not None and not self._load.done():
            await asyncio.shield(self._load)
        if self.state is ModelState.LOADED:
            await self.backend.aclose()
        self.state = ModelState.UNLOADED


class ModelPool:
    def __init__(self, config: GatewayConfig) -> None:
        self.entries = {name: ModelEntry(name, cfg) for name, cfg in config.models.items()}
        self._by_name: dict[str, ModelEntry] = {}
        for entry in self.entries.values():
            for alias in (entry.name, *entry.config.aliases):
                self._by_name[alias] = entry
        #: Started on shutdown: /ready 503, new requests 503, accepted ones end by its deadline.
        self.drain = Drain(config.server.drain_timeout_s)
        for entry in self.entries.values():
            if isinstance(entry.backend, Delegating):
                entry.backend.bind_router(self)

    @property
    def draining(self) -> bool:
        return self.drain.started

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
        backend = await entry.ensure_loaded()
        await backend.validate(request)
        async with entry.admission.admit(1), aclosing(backend.stream(request)) as deltas:
            async for delta in deltas:
                yield delta

    def names(self) -> list[tuple[str, ModelEntry]]:
        """Every model id clients may use (names and aliases) with its entry."""
        return list(self._by_name.items())

    @property
    def ready(self) -> bool:
        return not self.draining and all(
            e.state is ModelState.LOADED
            for e in self.entries.values()
            if e.config.load == "startup"
        )

    async def start(self) -> None:
        """Load every ``load = "startup"`` model; raise if any fails."""
        startup = [e for e in self.entries.values() if e.config.load == "startup"]
        results = await asyncio.gather(
            *(e.ensure_loaded() for e in startup), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    async def aclose(self) -> None:
        await asyncio.gather(*(e.unload() for e in self.entries.values()), return_exceptions=True)
