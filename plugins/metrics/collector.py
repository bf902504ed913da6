"""Gauges and engine counters read from the model pool at scrape time."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.backend import EngineStats, HasStats
from gateway.pool import ModelEntry, ModelPool, ModelState

log = logging.getLogger("plugins.metrics")
_STATES = tuple(s.value for s in ModelState)

#: EngineStats field -> (metric name, help, is it a counter)
_ENGINE: dict[str, tuple[str, str, bool]] = {
    "active_sequences": (
        "gateway_engine_active_sequences",
        "Sequences the engine is decoding now.",
        False,
    ),
    "queued_sequences": (
        "gateway_engine_queued_sequences",
        "Sequences admitted to the engine and waiting for a slot.",
        False,
    ),
    "decode_steps": ("gateway_engine_decode_steps", "Engine decode steps.", True),
    "tokens_generated": ("gateway_engine_generated_tokens", "Tokens the engine generated.", True),
    "tokens_after_cancel": (
        "gateway_engine_tokens_after_cancel",
        "Tokens the engine generated for a sequence after its client had gone.",
        True,
    ),
    "cancelled": ("gateway_engine_cancelled_sequences", "Sequences cancelled in the engine.", True),
    "kv_cells_used": ("gateway_engine_kv_cells_used", "KV-cache cells in use.", False),
    "kv_cells_total": ("gateway_engine_kv_cells_total", "KV-cache cells in all.", False),
    "max_batch_sequences": (
        "gateway_engine_max_batch_sequences",
        "The most sequences decoded together in one step so far.",
        False,
    ),
    "cached_prompt_tokens": (
        "gateway_engine_cached_prompt_tokens",
        "Prompt tokens served from the KV cache instead of prefilled.",
        True,
    ),
    "prompt_tokens_processed": (
        "gateway_engine_prompt_tokens_processed",
        "Prompt tokens run through the model (not taken from a cached prefix).",
        True,
    ),
    "kv_tier_hits": (
        "gateway_kv_tier_hits",
        "Prompts whose prefix was restored from a KV tier (host memory or disk).",
        True,
    ),
    "kv_tier_misses": (
        "gateway_kv_tier_misses",
        "Saved prefixes found but not restored (gone, damaged, no room).",
        True,
    ),
    "kv_tier_saved": ("gateway_kv_tier_saved", "Prefixes saved to the KV tiers.", True),
    "kv_tier_restored_tokens": (
        "gateway_kv_tier_restored_tokens",
        "Prompt tokens restored from a KV tier instead of prefilled (tokens saved).",
        True,
    ),
    "kv_tier_restore_seconds": (
        "gateway_kv_tier_restore_seconds",
        "Time spent restoring prefixes from the KV tiers.",
        True,
    ),
    "kv_host_tier_bytes": ("gateway_kv_host_tier_bytes", "Bytes in the host KV tier.", False),
    "kv_disk_tier_bytes": ("gateway_kv_disk_tier_bytes", "Bytes in the disk KV tier.", False),
    "draft_tokens": (
        "gateway_engine_draft_tokens",
        "Tokens drafted for speculative decoding and verified by the model.",
        True,
    ),
    "draft_accepted": (
        "gateway_engine_draft_accepted_tokens",
        "Drafted tokens the model's sampling accepted (speculative decoding).",
        True,
    ),
}


def _spec(field: str) -> tuple[str, str, bool]:
    """A field added to EngineStats later is exported as a gauge under its own name."""
    return _ENGINE.get(field, (f"gateway_engine_{field}", f"EngineStats.{field}", False))


def _family(name: str, doc: str, counter: bool) -> GaugeMetricFamily | CounterMetricFamily:
    if counter:
        return CounterMetricFamily(name, doc, labels=["model"])
    return GaugeMetricFamily(name, doc, labels=["model"])


class PoolCollector(Collector):
    """Admission gauges, model load state and engine stats, per configured model."""

    def __init__(self, pool: ModelPool) -> None:
        self._pool = pool
        self._stats_failed: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "gateway_active_sequences",
            "Sequences admitted and running (the model's admission).",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "gateway_queued_requests",
            "Requests waiting in the model's admission queue.",
            labels=["model"],
        )
        capacity = GaugeMetricFamily(
            "gateway_max_concurrent_sequences",
            "Sequences the model runs at once (admission capacity).",
            labels=["model"],
        )
        loaded = GaugeMetricFamily(
            "gateway_model_loaded", "1 if the model is loaded, else 0.", labels=["model"]
        )
        load_time = GaugeMetricFamily(
            "gateway_model_load_seconds", "How long the model took to load.", labels=["model"]
        )
        state = GaugeMetricFamily(
            "gateway_model_state",
            "1 for the state the model is in (unloaded, loading, loaded, draining, unloading, "
            "failed), 0 for the others.",
            labels=["model", "state"],
        )
        loads = CounterMetricFamily(
            "gateway_model_loads", "Times the model was loaded.", labels=["model"]
        )
        engine = {f.name: _family(*_spec(f.name)) for f in dataclasses.fields(EngineStats)}
        for name, entry in self._pool.entries.items():
            active.add_metric([name], entry.admission.active)
            queued.add_metric([name], entry.admission.queued)
            capacity.add_metric([name], entry.admission.capacity)
            loaded.add_metric([name], 1.0 if entry.loaded else 0.0)
            for value in _STATES:
                state.add_metric([name, value], 1.0 if entry.status == value else 0.0)
            loads.add_metric([name], entry.loads)
            if entry.load_seconds is not None:
                load_time.add_metric([name], entry.load_seconds)
            stats = self.stats(entry)
            if stats is not None:
                for field, family in engine.items():
                    family.add_metric([name], float(getattr(stats, field)))
        yield from (active, queued, capacity, loaded, load_time, state, loads, *engine.values())

    def stats(self, entry: ModelEntry) -> EngineStats | None:
        """The model's engine stats while it is loaded (None otherwise, or if they fail)."""
        backend = entry.backend
        if not entry.loaded or not isinstance(backend, HasStats):
            return None
        try:
            return backend.stats()
        except Exception as err:  # a broken stats() must not break the whole scrape
            if entry.name not in self._stats_failed:
                self._stats_failed.add(entry.name)
                log.warning(
                    "model %s: stats() failed, engine metrics left out: %s", entry.name, err
                )
            return None
