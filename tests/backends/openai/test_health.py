"""Replica health with real processes: killed, ejected, started again, re-admitted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing import ServerThread
from tests.backends.openai.fleet import (
    FAST_HEALTH,
    Process,
    chat,
    fleet,
    front_config,
    gateway_process,
    scripted_upstream,
    wait_for,
)
from tests.gateway.helpers import scripted

pytestmark = pytest.mark.slow


def who_config(name: str) -> dict[str, dict[str, Any]]:
    return {"models": {"who": {"backend": "scripted", "reply": f"replica-{name}"}}}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    a = gateway_process(tmp_path, "a", who_config("a"))
    b = gateway_process(tmp_path, "b", who_config("b"))
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


def front_for(*replicas: Process | ServerThread, **table: Any) -> ServerThread:
    urls = [{"url": r.url if isinstance(r, Process) else r.base_url} for r in replicas]
    model = {"replicas": urls, "upstream_model": "who", "context_length": 4096, **table}
    return ServerThread(front_config({"who": model}))


def who(front: ServerThread) -> str:
    r = httpx.post(front.base_url + "/v1/chat/completions", json=chat("who"), timeout=30)
    assert r.status_code == 200, r.text
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


def test_killed_replica_is_ejected_by_probes_and_readmitted_when_back(
    pair: tuple[Process, Process],
) -> None:
    a, b = pair
    health = {**FAST_HEALTH, "eject_after_failures": 2, "readmit_after_successes": 2}
    with front_for(a, b, balancing="round_robin", health=health) as front:
        backend = fleet(front, "who")
        replica_a = backend.replica(a.url)
        assert {who(front) for _ in range(4)} == {"replica-a", "replica-b"}
        a.kill()
        wait_for(lambda: not replica_a.up, timeout=5, what="A ejected")
        assert "ConnectError" in replica_a.reason
        assert [who(front) for _ in range(6)] == ["replica-b"] * 6
        assert backend.retries == 0  # ejected before any request was sent to it
        a.start()  # same port
        wait_for(lambda: replica_a.up, timeout=10, what="A re-admitted")
        assert replica_a.readmissions == 1 and replica_a.ejections == 1
        assert {who(front) for _ in range(4)} == {"replica-a", "replica-b"}


def test_requests_that_fail_eject_a_replica_before_any_probe(
    pair: tuple[Process, Process],
) -> None:
    a, b = pair
    health = {"path": "/ready", "interval_s": 3600, "eject_after_failures": 2}
    with front_for(a, b, health=health) as front:
        backend = fleet(front, "who")
        replica_a = backend.replica(a.url)
        a.kill()
        answers = []
        while replica_a.up:
            answers.append(who(front))  # each one served: A's refusals are retried on B
            assert len(answers) < 10
        assert set(answers) == {"replica-b"} and backend.retries == 2
        assert [who(front) for _ in range(4)] == ["replica-b"] * 4
        assert backend.retries == 2 and backend.health is not None
        assert backend.health.rounds == 1  # only the probe at start ran


def test_a_replica_still_loading_is_admitted_once_ready() -> None:
    late = scripted_upstream({"who": {"reply": "replica-late", "load_delay_s": 1.5}})
    early = scripted_upstream({"who": {"reply": "replica-early"}})
    with (
        ServerThread(early) as up,
        ServerThread(late, wait_ready=False) as loading,
        front_for(up, loading, balancing="round_robin", health=FAST_HEALTH) as front,
    ):
        replica_late = fleet(front, "who").replica(loading.base_url)
        assert not replica_late.up and "503" in replica_late.reason
        assert {who(front) for _ in range(3)} == {"replica-early"}
        wait_for(lambda: replica_late.up, timeout=10, what="late replica admitted")
        assert {who(front) for _ in range(4)} == {"replica-early", "replica-late"}
        # probes never made a replica do model work
        record = scripted(up.backend("who")).record
        monitor = fleet(front, "who").health
        assert monitor is not None
        before, rounds = len(record.started), monitor.rounds
        wait_for(lambda: monitor.rounds >= rounds + 5, what="5 probe rounds")
        assert len(record.started) == before
