"""``[plugins.rate_limit]``: default limits and where the buckets live."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from gateway.config import PluginConfig


class RateLimitConfig(PluginConfig):
    #: Defaults for callers whose API key sets none (0: unlimited).
    requests_per_minute: int = Field(0, ge=0)
    tokens_per_minute: int = Field(0, ge=0)
    concurrent_requests: int = Field(0, ge=0)
    #: Share the buckets between gateway replicas through this Redis (``redis://host:6379/0``).
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    #: When Redis cannot be reached: let requests through unlimited, or refuse them (503).
    on_redis_error: Literal["open", "closed"] = "open"
    redis_timeout_s: float = Field(0.5, gt=0)
    redis_key_prefix: str = Field("gateway:ratelimit", min_length=1)
    #: A request's concurrency slot in Redis expires unless renewed this often (a replica that
    #: died cannot hold slots for longer than this).
    redis_lease_s: float = Field(30.0, ge=1)

    @model_validator(mode="after")
    def _redis_installed(self) -> RateLimitConfig:
        if self.redis_url is not None and importlib.util.find_spec("redis") is None:
            raise ValueError(
                "redis_url needs the Python package 'redis': pip install 'llm-gateway[redis]'"
            )
        return self
