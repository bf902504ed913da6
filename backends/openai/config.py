"""The ``[models.<name>]`` table of a model served by remote OpenAI-compatible replicas.

Every duration is in seconds; every limit is explicit (httpx's defaults suit short requests,
not streams that last minutes). API keys come from environment variables, never the file.
"""

from __future__ import annotations

from typing import Literal

import httpx
from pydantic import Field, field_validator, model_validator

from gateway.config import BatchingConfig, ModelConfig, StrictModel

Balancing = Literal["least_outstanding", "round_robin", "affinity"]


class ReplicaConfig(StrictModel):
    #: The server's root, e.g. ``http://10.0.0.5:8000`` (requests go to ``<url>/v1/...``).
    url: str
    #: Relative share of the traffic (least outstanding, round-robin and affinity all honour it).
    weight: float = Field(1.0, gt=0, le=1000)
    #: The environment variable holding this replica's API key (sent as a Bearer token).
    api_key_env: str | None = Field(None, min_length=1)

    @field_validator("url")
    @classmethod
    def _root_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as err:
            raise ValueError(f"not a URL: {err}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.userinfo:
            raise ValueError("credentials may not be in the URL: use api_key_env")
        if url.query or url.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")


class TimeoutsConfig(StrictModel):
    """How long to wait for a replica. Keep-alive comments from the replica reset none of these."""

    connect_s: float = Field(5.0, gt=0)
    #: From sending the request to the first generated text (prompt processing included).
    first_byte_s: float = Field(60.0, gt=0)
    #: Between two chunks once text flows.
    between_chunks_s: float = Field(30.0, gt=0)
    #: The whole upstream request.
    total_s: float = Field(600.0, gt=0)
    #: Waiting for a free connection in this replica's pool.
    pool_s: float = Field(5.0, gt=0)


class PoolConfig(StrictModel):
    """Connection pool per replica. ``max_connections`` defaults to ``batching.max_concurrent``."""

    max_connections: int | None = Field(None, ge=1, le=10_000)
    max_keepalive_connections: int = Field(16, ge=0)
    keepalive_expiry_s: float = Field(30.0, ge=0)


class HealthConfig(StrictModel):
    """Active probes and passive ejection.

    A probe is a GET of ``path`` on each replica every ``interval_s``; 2xx is healthy. Use a
    route that does no model work: ``/ready`` on this gateway, ``/health`` on llama-server and
    vLLM, ``/docs`` on llama-cpp-python's server (its ``/v1/models`` takes the model lock).
    """

    path: str = Field("/health", pattern=r"^/[^?#\s]*$")
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    #: Consecutive failures (requests that could not be served, failed probes) that eject it.
    eject_after_failures: int = Field(3, ge=1)
    #: Consecutive successful probes that bring an ejected replica back.
    readmit_after_successes: int = Field(1, ge=1)


class AffinityConfig(StrictModel):
    """Prefix affinity: rendezvous hashing over the leading messages, with bounded load."""

    #: A replica takes at most this factor times its weighted share of the outstanding requests.
    load_factor: float = Field(1.25, ge=1.0, le=100.0)
    #: ``/v1/completions``: the key is this many leading characters of the prompt.
    prompt_prefix_chars: int = Field(256, ge=1)


class OpenAIBatchingConfig(BatchingConfig):
    max_concurrent: int = Field(64, ge=1, le=1024)


class OpenAIConfig(ModelConfig):
    backend: str = "openai"
    replicas: tuple[ReplicaConfig, ...] = Field(min_length=1)
    #: The model name the replicas know (default: this model's name in config).
    upstream_model: str | None = Field(None, min_length=1)
    #: None: ask the replicas' ``/v1/models`` at start (vLLM and this gateway report it; set
    #: it for llama-server and llama-cpp-python's server, whose route takes the model lock).
    context_length: int | None = Field(None, ge=1)
    balancing: Balancing = "least_outstanding"
    affinity: AffinityConfig = AffinityConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    pool: PoolConfig = PoolConfig()
    health: HealthConfig = HealthConfig()
    #: Replicas one request may try before the first byte reaches the client.
    max_attempts: int = Field(3, ge=1)
    #: Another configured model that serves requests when every replica is down.
    fallback_model: str | None = Field(None, min_length=1)
    batching: OpenAIBatchingConfig = OpenAIBatchingConfig()
    #: What the replicas serve beyond streamed chat and text completions; requests that use
    #: these fields get them passed through unchanged (default: none, a 400 naming the field).
    capabilities: tuple[Literal["tools", "json_schema", "embeddings"], ...] = ()
    #: The replicas also serve Anthropic's ``/v1/messages`` (this gateway, llama-server, vLLM,
    #: Anthropic's API): requests that came in on it go there in kind; otherwise they are
    #: converted to chat completions.
    messages_api: bool = False

    @model_validator(mode="after")
    def _check(self) -> OpenAIConfig:
        urls = [r.url for r in self.replicas]
        if len(set(urls)) != len(urls):
            raise ValueError("replicas: each url may appear once")
        if (
            self.pool.max_connections is not None
            and self.pool.max_connections < self.batching.max_concurrent
        ):
            raise ValueError(
                "pool.max_connections must be at least batching.max_concurrent "
                "(affinity may send every request to one replica)"
            )
        return self

    @property
    def max_connections(self) -> int:
        return self.pool.max_connections or self.batching.max_concurrent
