"""Prometheus metrics after real requests: counters, histograms, gauges at scrape time."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.backend import EngineStats
from gateway.config import GatewayConfig
from gateway.testing import ScriptedBackend, ServerThread
from tests.plugins.helpers import SLOW_REPLY, chat, config, post, sha256, wait_for

KEY = "sk-metrics-0000000000"


class StatsBackend(ScriptedBackend):
    """The scripted double plus engine counters (as a real engine reports them)."""

    tokens_after_cancel = 0

    def stats(self) -> EngineStats:
        rec = self.record
        return EngineStats(
            active_sequences=rec.active,
            tokens_generated=rec.tokens_generated,
            cancelled=len(rec.cancelled),
            tokens_after_cancel=self.tokens_after_cancel,
            kv_cells_used=7 * rec.active,
            kv_cells_total=4096,
        )


def with_stats_backend(cfg: GatewayConfig, model: str) -> ServerThread:
    server = ServerThread(cfg)
    entry = server.services.pool.entries[model]
    assert isinstance(entry.config, type(entry.config))
    entry.backend = StatsBackend(entry.name, entry.config)  # type: ignore[arg-type]
    return server


class Scrape:
    def __init__(self, server: ServerThread) -> None:
        r = httpx.get(server.base_url + "/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(self, sample: str, **labels: str) -> float:
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return float(s.value)
        raise KeyError(f"{sample}{labels}")

    def total(self, sample: str, **labels: str) -> float:
        """The sum over every sample whose labels include these."""
        return sum(
            float(s.value)
            for family in self.families.values()
            for s in family.samples
            if s.name == sample and labels.items() <= s.labels.items()
        )

    def has(self, sample: str, **labels: str) -> bool:
        try:
            self.value(sample, **labels)
        except KeyError:
            return False
        return True


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    cfg = config(
        {
            "m": {"reply": "one two three four five", "token_delay_s": 0.01, "load_delay_s": 0.05},
            "slow": {
                "reply": SLOW_REPLY,
                "token_delay_s": 0.02,
                "batching": {"max_concurrent": 1, "max_queue": 4},
            },
        },
        plugins={"metrics": {}},
    )
    with with_stats_backend(cfg, "slow") as srv:
        yield srv


def stream_body(server: ServerThread, body: dict[str, Any]) -> str:
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        return r.read().decode()


def test_metrics_after_real_requests(server: ServerThread) -> None:
    for _ in range(2):
        assert post(server, chat("m")).status_code == 200
    assert "[DONE]" in stream_body(server, chat("m", stream=True))
    assert post(server, chat("nope")).status_code == 404
    assert post(server, chat("m", max_tokens=10_000)).status_code == 400

    s = Scrape(server)
    completed = {"model": "m", "status": "200", "outcome": "completed"}
    assert s.value("gateway_requests_total", **completed) == 3
    assert s.value("gateway_requests_total", model="none", status="404", outcome="failed") == 1
    assert s.value("gateway_requests_total", model="m", status="400", outcome="failed") == 1
    # "user: hello there" is 3 prompt tokens; the reply is 5 tokens
    assert s.value("gateway_prompt_tokens_total", model="m") == 9
    assert s.value("gateway_completion_tokens_total", model="m") == 15
    assert not s.has("gateway_cached_prompt_tokens_total", model="m")
    assert s.value("gateway_time_to_first_token_seconds_count", model="m") == 3
    assert s.value("gateway_queue_wait_seconds_count", model="m") == 3
    assert s.value("gateway_request_duration_seconds_count", model="m") == 4
    # 4 gaps between 5 tokens in each of 3 requests, each about token_delay_s
    assert s.value("gateway_inter_token_latency_seconds_count", model="m") == 12
    itl_sum = s.value("gateway_inter_token_latency_seconds_sum", model="m")
    assert 12 * 0.008 < itl_sum < 12 * 0.5
    assert s.value("gateway_inter_token_latency_seconds_bucket", model="m", le="0.001") == 0
    assert s.value("gateway_inter_token_latency_seconds_bucket", model="m", le="+Inf") == 12
    # model load time and state, read from the pool at scrape time
    assert s.value("gateway_model_load_seconds", model="m") >= 0.04  # load_delay_s = 0.05
    assert s.value("gateway_model_loaded", model="m") == 1
    assert s.value("gateway_model_state", model="m", state="loaded") == 1
    assert s.value("gateway_model_state", model="m", state="unloaded") == 0
    assert s.total("gateway_model_state", model="m") == 1
    assert s.value("gateway_model_loads_total", model="m") == 1
    assert s.value("gateway_max_concurrent_sequences", model="slow") == 1


def test_active_and_queued_gauges_and_cancellations(server: ServerThread) -> None:
    backend = server.backend("slow")
    assert isinstance(backend, StatsBackend)
    backend.tokens_after_cancel = 3
    cancelled_before = len(backend.record.cancelled)
    url = server.base_url + "/v1/chat/completions"
    with (
        httpx.stream("POST", url, json=chat("slow", stream=True)) as first,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        lines = first.iter_lines()
        next(lines)
        # a second request waits in the model's queue (max_concurrent = 1)
        second = pool.submit(post, server, chat("slow", max_tokens=2))
        wait_for(lambda: Scrape(server).value("gateway_queued_requests", model="slow") == 1)
        s = Scrape(server)
        assert s.value("gateway_active_sequences", model="slow") == 1
        assert s.value("gateway_engine_active_sequences", model="slow") == 1
        assert s.value("gateway_engine_kv_cells_used", model="slow") == 7
        first.close()  # the first client leaves mid-stream
    assert second.result().status_code == 200
    wait_for(lambda: len(backend.record.cancelled) >= cancelled_before + 1)
    wait_for(lambda: Scrape(server).value("gateway_active_sequences", model="slow") == 0)
    s = Scrape(server)
    assert s.value("gateway_queued_requests", model="slow") == 0
    # the stream's 200 had gone out before its client left
    assert s.value("gateway_requests_total", model="slow", status="200", outcome="cancelled") >= 1
    assert s.value("gateway_engine_cancelled_sequences_total", model="slow") == len(
        backend.record.cancelled
    )
    assert s.value("gateway_engine_tokens_after_cancel_total", model="slow") == 3
    assert s.value("gateway_engine_kv_cells_total", model="slow") == 4096
    # tokens streamed before the client left are counted as completion tokens
    assert s.value("gateway_completion_tokens_total", model="slow") >= 1
    # the scripted double without stats has no engine samples, only the gateway's own
    assert not s.has("gateway_engine_cancelled_sequences_total", model="m")


def test_unauthenticated_requests_are_counted_without_a_model() -> None:
    cfg = config(
        plugins={
            "metrics": {"path": "/internal/metrics", "process_metrics": False},
            "api_keys": {"keys": [{"name": "k", "sha256": sha256(KEY)}]},
        }
    )
    with ServerThread(cfg) as server:
        assert post(server, chat("m")).status_code == 401
        assert post(server, chat("m"), key=KEY).status_code == 200
        assert httpx.get(server.base_url + "/metrics").status_code == 404
        text = httpx.get(server.base_url + "/internal/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.labels["model"], s.labels["status"]): s.value
        for s in families["gateway_requests"].samples
        if s.name == "gateway_requests_total"
    }
    assert samples == {("none", "401"): 1, ("m", "200"): 1}
    assert "process_cpu_seconds" not in families


def names(scrape: Scrape) -> set[str]:
    return {n for n in scrape.families if not n.endswith("_created")}


def test_same_metric_names_whatever_the_backend_and_one_registry_per_app() -> None:
    cfg = config({"m": {}}, plugins={"metrics": {}})
    with ServerThread(cfg) as plain, with_stats_backend(cfg, "m") as engine:
        post(plain, chat("m"))
        names_plain = names(Scrape(plain))
        scrape = Scrape(engine)
        names_engine = names(scrape)
        # the second app's registry is its own: it saw none of the first app's requests
        assert not scrape.has(
            "gateway_requests_total", model="m", status="200", outcome="completed"
        )
    assert names_plain == names_engine
    for name in (
        "gateway_requests",
        "gateway_time_to_first_token_seconds",
        "gateway_inter_token_latency_seconds",
        "gateway_queue_wait_seconds",
        "gateway_active_sequences",
        "gateway_queued_requests",
        "gateway_model_load_seconds",
        "gateway_engine_cancelled_sequences",
        "gateway_engine_tokens_after_cancel",
        "gateway_engine_prompt_tokens_processed",
    ):
        assert name in names_plain


def test_a_failing_stats_call_leaves_engine_metrics_out() -> None:
    class Broken(StatsBackend):
        def stats(self) -> EngineStats:
            raise RuntimeError("engine went away")

    cfg = config({"m": {}}, plugins={"metrics": {}})
    server = ServerThread(cfg)
    entry = server.services.pool.entries["m"]
    entry.backend = Broken(entry.name, entry.config)  # type: ignore[arg-type]
    with server:
        s = Scrape(server)
    assert s.value("gateway_active_sequences", model="m") == 0
    assert not s.has("gateway_engine_active_sequences", model="m")
