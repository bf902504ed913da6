"""The backend contract: the one seam between the core and an inference engine.

A backend package registers a :class:`BackendFactory` under the entry-point group
``gateway.backends``; its name there is what ``backend = "..."`` says in config.toml.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from gateway import registry
from gateway.config import ModelConfig
from gateway.kv_events.events import KVEventSink
from gateway.output.formats import ChatFormat
from gateway.types import BackendInfo, Capability, Delta, GenerationRequest, TokenizedPrompt


@runtime_checkable
class Backend(Protocol):
    """One loaded (or loadable) model.

    ``start`` and ``aclose`` load and free the model off the event loop. ``info`` says what
    it can do (the core refuses requests needing a capability it lacks). ``validate`` runs
    before any response byte is sent and raises a :class:`gateway.errors.GatewayError`
    (context overflow: :func:`gateway.errors.context_length_exceeded`); it returns what it
    learned of the prompt, which the core hands back to ``stream`` as
    ``request.tokenized`` (generations of one prompt share one validation).
    ``stream`` yields deltas (:data:`gateway.types.Delta`: text or tool-call pieces, or an
    embedding for a request with ``embed`` set) and ends with one :class:`Finish`. Closing
    the iterator early (client gone) must free the sequence's slot and KV cells at once. The
    core may resume a stream from another task than the one that started it (it awaits the
    first delta before the response headers): hold no cancel scope or timeout across a
    ``yield``.

    Before ``start``, ``info.capabilities`` already says what the model's config declares
    (``/v1/models`` lists it for a model not loaded; its other fields may be estimates until
    then); a backend whose ``info`` exists only once started implements
    :class:`DeclaresModel` instead.
    """

    @property
    def info(self) -> BackendInfo: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def validate(self, request: GenerationRequest) -> TokenizedPrompt: ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]: ...


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters a backend with an engine exposes (for metrics, debug endpoints and tests)."""

    active_sequences: int = 0
    queued_sequences: int = 0
    decode_steps: int = 0
    tokens_generated: int = 0
    #: Tokens the engine produced for a sequence after its client had gone.
    tokens_after_cancel: int = 0
    cancelled: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    #: The most sequences decoded together in one step so far.
    max_batch_sequences: int = 0
    cached_prompt_tokens: int = 0
    #: Prompt tokens actually run through the model (not taken from a cached prefix).
    prompt_tokens_processed: int = 0
    #: Cache tiers below the KV cells (host memory, disk), for backends that have them.
    kv_tier_hits: int = 0
    kv_tier_misses: int = 0
    kv_tier_saved: int = 0
    kv_tier_restored_tokens: int = 0
    kv_tier_restore_seconds: float = 0.0
    kv_host_tier_bytes: int = 0
    kv_disk_tier_bytes: int = 0
    #: Speculative decoding: tokens drafted, and those of them the model's sampling accepted.
    draft_tokens: int = 0
    draft_accepted: int = 0


@runtime_checkable
class HasChatFormat(Protocol):
    """Optional: an in-process backend whose text the core parses (tool calls, reasoning) and
    constrains (grammars it applies): its model's chat format, once loaded."""

    @property
    def chat_format(self) -> ChatFormat | None: ...


@runtime_checkable
class PublishesKVEvents(Protocol):
    """Optional: a backend whose KV cache announces the blocks it stores and drops (KV events
    for a prefix-aware router, ``[models.NAME.kv_events]``). Called before ``start``, with
    the model's sink (the same for every load) and the block size to announce in."""

    def publish_kv_events(self, sink: KVEventSink, block_size: int) -> None: ...


@runtime_checkable
class HasCacheTiers(Protocol):
    """Optional: a backend with KV cache tiers beyond its cells, described for
    ``/admin/models`` (None while they are off)."""

    def cache_tiers(self) -> dict[str, object] | None: ...


@dataclass(frozen=True, slots=True)
class Declared:
    """What a model's config says it can do, known without loading it."""

    capabilities: frozenset[Capability]
    #: Tokens of one sequence, where the config sets it (None: only the load tells).
    context_length: int | None = None


@runtime_checkable
class DeclaresModel(Protocol):
    """Optional: a backend whose ``info`` exists only once started (a remote fleet's context
    length is asked of its replicas) says before that what its config declares."""

    def declared(self) -> Declared: ...


def chat_format_of(backend: Backend) -> ChatFormat | None:
    return backend.chat_format if isinstance(backend, HasChatFormat) else None


@runtime_checkable
class HasStats(Protocol):
    """Optional: a backend that can report :class:`EngineStats`."""

    def stats(self) -> EngineStats: ...


class ModelRouter(Protocol):
    """What the pool lends a backend that hands requests on to other configured models."""

    def model_config(self, model: str) -> ModelConfig:
        """A configured model's table (by name or alias); ``ModelNotFound`` if none."""
        ...

    def generate(self, model: str, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Run one sequence on ``model``, under that model's own validation and admission."""
        ...


@runtime_checkable
class Delegating(Protocol):
    """Optional: a backend that may hand a request to another model (e.g. a fallback)."""

    def bind_router(self, router: ModelRouter) -> None: ...


@runtime_checkable
class ReportsFailure(Protocol):
    """Optional: a backend whose engine can die after loading says why (``None`` while healthy).

    The pool then reports the model as failed (``/ready`` 503) and the next request reloads it.
    """

    @property
    def failure(self) -> str | None: ...


class BackendFactory(Protocol):
    """What an entry point in ``gateway.backends`` resolves to."""

    #: The pydantic model for this backend's ``[models.<name>]`` table.
    config_type: type[ModelConfig]

    def create(self, name: str, config: ModelConfig) -> Backend: ...


def backend_factory(name: str) -> BackendFactory:
    """The factory registered as ``name`` in ``gateway.backends`` (``LookupError`` if none)."""
    return cast(BackendFactory, registry.load(registry.BACKENDS_GROUP, "backend", name))


@dataclass(frozen=True, slots=True)
class MemoryOption:
    """A config change that would shrink a model's footprint (for ``gateway plan``)."""

    #: The key in the model's table, e.g. ``kv_cache.type_k``.
    setting: str
    value: str
    saves_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """What a model will hold once loaded, estimated from its files' headers (nothing loaded).

    ``weights_bytes + kv_cache_bytes + compute_bytes`` is split between the GPU devices
    (``gpu_bytes``, by device index) and host memory (``host_bytes``).
    """

    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    gpu_bytes: tuple[int, ...] = ()
    host_bytes: int = 0
    #: How the KV cache is sized, e.g. "4 slots x 2048 tokens, K f16, V f16".
    kv_cache_shape: str = ""
    options: tuple[MemoryOption, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes


@runtime_checkable
class EstimatesMemory(Protocol):
    """Optional, on a :class:`BackendFactory`: a model's footprint without loading it.

    ``gpu_devices`` is how many GPUs to plan for (0: the host only); ``gpu_bytes`` then has
    that many entries. Raises ``OSError`` or ``ValueError`` if the model files can't be read.
    The pool uses it to keep loaded models within ``[lifecycle]``, ``gateway plan`` to print.
    """

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate: ...
