"""Rate limits per caller: requests/min, tokens/min and concurrent requests, as token buckets.

The caller is ``ctx.principal`` (the API key's name); requests without one share an anonymous
bucket. Limits come from the key (``ctx.limits``) or this plugin's defaults. State lives in
memory, or in Redis (``redis_url``) so that several gateway replicas enforce one limit.
"""

from plugins.rate_limit.config import RateLimitConfig
from plugins.rate_limit.plugin import RateLimitFactory, RateLimitPlugin

factory = RateLimitFactory()

__all__ = ["RateLimitConfig", "RateLimitFactory", "RateLimitPlugin", "factory"]
