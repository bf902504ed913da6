"""Counters and histograms observed at each request's end, and the ``/metrics`` route."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.config import PluginConfig
from gateway.plugins import Plugin, RequestContext, ResponseEnd
from gateway.pool import ModelPool
from plugins.metrics.collector import PoolCollector
from plugins.metrics.model_server import ModelServerCollector

#: The model label of requests that never reached a model (bad key, unknown model...).
NO_MODEL = "none"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)


class MetricsConfig(PluginConfig):
    path: str = Field("/metrics", pattern=r"^/")
    #: Also export the process's CPU, memory, file descriptors and Python GC.
    process_metrics: bool = True


class MetricsPlugin(Plugin):
    def __init__(self, config: MetricsConfig, pool: ModelPool) -> None:
        self.config = config
        self.registry = reg = CollectorRegistry()
        if config.process_metrics:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        pool_collector = PoolCollector(pool)
        reg.register(pool_collector)
        reg.register(ModelServerCollector(pool, pool_collector.stats))
        labels = ["model"]
        self.requests = Counter(
            "gateway_requests",
            "Completion requests by model, HTTP status and outcome.",
            ["model", "status", "outcome"],
            registry=reg,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "From request arrival to its last byte.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time spent waiting for admission.",
            labels,
            buckets=_QUEUE_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one choice.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens processed.", labels, registry=reg
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens",
            "Completion tokens generated (cancelled requests included).",
            labels,
            registry=reg,
        )
        self.cached_tokens = Counter(
            "gateway_cached_prompt_tokens",
            "Prompt tokens served from a cache.",
            labels,
            registry=reg,
        )

    async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
        model = ctx.model or NO_MODEL
        self.requests.labels(model, str(end.status), end.outcome).inc()
        self.duration.labels(model).observe(end.duration_s)
        if ctx.model is None:
            return
        if end.queue_wait_s is not None:
            self.queue_wait.labels(model).observe(end.queue_wait_s)
        if end.ttft_s is not None:
            self.ttft.labels(model).observe(end.ttft_s)
        if end.inter_token_s:
            itl = self.itl.labels(model)
            for gap in end.inter_token_s:
                itl.observe(gap)
        usage = end.usage
        if usage.prompt_tokens:
            self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.completion_tokens.labels(model).inc(usage.completion_tokens)
        if usage.cached_tokens:
            self.cached_tokens.labels(model).inc(usage.cached_tokens)

    def routes(self) -> Sequence[BaseRoute]:
        async def scrape(request: Request) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return [Route(self.config.path, scrape, methods=["GET"])]


class MetricsFactory:
    config_type = MetricsConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> MetricsPlugin:
        assert isinstance(config, MetricsConfig)
        return MetricsPlugin(config, pool)
