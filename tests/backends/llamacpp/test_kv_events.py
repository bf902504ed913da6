"""KV events from the real engine (SmolLM2 over HTTP, the openai SDK as client), read by a ZMQ
subscriber as llm-d's indexer reads them: rebuilt from the events alone, each medium's blocks
are exactly the gateway's cached prefixes (the KV cells, the host tier), through stores,
evictions to the tier and restores; a salted prefix carries its salt; the model-server metrics
llm-d's picker scrapes are there under vLLM's names."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq
from openai import OpenAI

from gateway.config import parse_config
from gateway.kv_events import KVEvent, Medium
from gateway.kv_events.wire import decode_batch
from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, backend_of, model_table
from tests.gateway.kv_events.view import RouterView, expected_prefixes
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BS = 16
SYSTEM = "You answer briefly. " + " ".join(f"Fact {i}: item {i} is blue." for i in range(12))


class Subscriber:
    """A SUB socket on the gateway's topic, decoding batches into a :class:`RouterView`."""

    def __init__(self, endpoint: str) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.connect(endpoint)
        self.view = RouterView(late=True)
        self.topics: set[bytes] = set()
        self.seqs: list[int] = []
        self.events: list[KVEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, seq, payload = self.sock.recv_multipart()
            except zmq.Again:
                continue
            events = decode_batch(payload)[1]
            with self._lock:
                self.topics.add(topic)
                self.seqs.append(int.from_bytes(seq, "big"))
                self.events.extend(events)
                self.view.apply(events)

    def prefixes(self, medium: Medium) -> set[tuple[str, tuple[int, ...]]]:
        with self._lock:
            return self.view.prefixes(medium)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(0)


@pytest.fixture
def subscribed(tmp_path: Path) -> Iterator[tuple[str, Subscriber]]:
    endpoint = f"ipc://{tmp_path}/kv-events.sock"
    sub = Subscriber(endpoint)
    try:
        yield endpoint, sub
    finally:
        sub.close()


def gateway_prefixes(server: ServerThread) -> dict[Medium, set[tuple[str, tuple[int, ...]]]]:
    """What the engine's cells and the host tier hold now, as a router should see it."""
    backend = backend_of(server, SMOL)
    engine = backend._engine
    tiers = backend.tiers
    assert engine is not None and tiers is not None and tiers.host is not None
    cells = [(e.salt, tuple(e.tokens)) for e in engine.slots.entries if e.tokens]
    index = tiers.host.index
    host = [(index.salts[k], t) for k, t in index.tokens.items()]
    return {"GPU": expected_prefixes(cells, BS), "CPU": expected_prefixes(host, BS)}


def in_sync(server: ServerThread, sub: Subscriber) -> None:
    def same() -> bool:
        if not sub.view.cleared:
            return False
        want = gateway_prefixes(server)
        return all(sub.prefixes(m) == want[m] for m in want)

    wait_for(same, 10, "the subscriber's view to match the gateway's caches")


def ask(client: OpenAI, user: str, **extra: object) -> int:
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=8,
        temperature=0,
        extra_body=extra or None,
    )
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    return r.usage.prompt_tokens_details.cached_tokens or 0


def test_a_subscriber_rebuilds_the_cells_and_the_host_tier(
    smol_path: Path, subscribed: tuple[str, Subscriber]
) -> None:
    endpoint, sub = subscribed
    table = model_table(
        smol_path,
        batching={"max_concurrent": 1},
        kv_cache={"cached_prefixes": 1, "host_cache_bytes": 256 << 20, "disk_cache_bytes": 0},
        kv_events={"endpoint": endpoint, "block_size": BS},
    )
    raw = {"models": {SMOL: table}, "plugins": {"metrics": {}}}
    with (
        ServerThread(parse_config(raw, "<test>")) as server,
        OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client,
    ):
        ask(client, "alice: hello")
        in_sync(server, sub)
        assert sub.prefixes("GPU") and not sub.prefixes("CPU")
        ask(client, "bob: " + "other words " * 20)  # evicts alice's prefix to the host tier
        ask(client, "carol: " + "more words " * 20)
        in_sync(server, sub)
        assert sub.prefixes("CPU"), "an evicted prefix moved to the host tier"
        assert ask(client, "alice: hello") > 0  # restored from the tier
        in_sync(server, sub)
        ask(client, "dave: hi", cache_salt="tenant-d")
        in_sync(server, sub)
        salted = {salt for salt, _ in sub.prefixes("GPU")} - {""}
        assert len(salted) == 1, "the salted prefix's blocks carry its (digested) salt"
        late = Subscriber(endpoint)  # a router that starts now is told the whole state
        try:
            in_sync(server, late)
            in_sync(server, sub)  # and the restatement keeps the first one exact
        finally:
            late.close()
        metrics = httpx.get(server.base_url + "/metrics").text
    topics = {t.decode() for t in sub.topics}
    assert topics == {f"kv@127.0.0.1:8000@{SMOL}"}  # [server]'s address (the test binds port 0)
    assert sub.seqs == sorted(set(sub.seqs))
    # unloaded: the cells are gone, the host tier's prefixes stay for the next load
    assert not sub.prefixes("GPU") and sub.prefixes("CPU")
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert f"# TYPE vllm:{name} gauge" in metrics
    assert f'vllm:num_requests_running{{model_name="{SMOL}"}} 0.0' in metrics
    assert f'vllm:cache_config_info{{block_size="{BS}",model_name="{SMOL}",' in metrics
