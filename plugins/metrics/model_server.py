"""The model-server metrics llm-d's endpoint picker reads (the Gateway API Inference
Extension's model server protocol), under vLLM's names, beside the gateway's own.

The picker scrapes ``/metrics`` as Prometheus text and reads each value as a gauge:

- ``vllm:num_requests_waiting``: requests waiting for the model (admission queue and engine
  queue); its queue scorer prefers fewer, and it counts a server saturated past a threshold;
- ``vllm:num_requests_running``: sequences running (admitted and in the engine's batch);
- ``vllm:kv_cache_usage_perc`` (and its older name ``vllm:gpu_cache_usage_perc``, which the
  picker read up to v1.2): the fraction (0..1) of KV cells in use; it prefers the emptier;
- ``vllm:cache_config_info``: 1, its ``block_size`` and ``num_gpu_blocks`` labels sizing the
  picker's approximate prefix index.

The picker reads the first series of each name and ignores labels: behind llm-d, serve one
model per gateway (each model gets its own series here, labelled ``model_name``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.backend import EngineStats
from gateway.pool import ModelEntry, ModelPool

#: Tokens per block where a model publishes no KV events (vLLM's default block size).
DEFAULT_BLOCK_SIZE = 16


class ModelServerCollector(Collector):
    def __init__(self, pool: ModelPool, stats: Callable[[ModelEntry], EngineStats | None]) -> None:
        self._pool = pool
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name"]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting to be processed.", labels=labels
        )
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests running on the engine.", labels=labels
        )
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: 1 means 100 percent.",
            labels=labels,
        )
        usage_old = GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage: 1 means 100 percent (the name before vLLM 0.9).",
            labels=labels,
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache's configuration.",
            labels=[*labels, "block_size", "num_gpu_blocks"],
        )
        for name, entry in self._pool.entries.items():
            stats = self._stats(entry)
            queued = stats.queued_sequences if stats is not None else 0
            waiting.add_metric([name], entry.admission.queued + queued)
            running.add_metric([name], max(0, entry.admission.active - queued))
            fraction = _usage(stats)
            usage.add_metric([name], fraction)
            usage_old.add_metric([name], fraction)
            events = entry.config.kv_events
            block = events.block_size if events is not None else DEFAULT_BLOCK_SIZE
            blocks = stats.kv_cells_total // block if stats is not None else 0
            info.add_metric([name, str(block), str(blocks)], 1.0)
        yield from (waiting, running, usage, usage_old, info)


def _usage(stats: EngineStats | None) -> float:
    if stats is None or not stats.kv_cells_total:
        return 0.0
    return min(1.0, stats.kv_cells_used / stats.kv_cells_total)
