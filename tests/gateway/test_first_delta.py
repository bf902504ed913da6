"""Streams wait up to the keep-alive interval for their first delta before the headers: a
backend's error before its first delta gets its own HTTP status; a slow first delta is awaited
after the headers, under pings; a client leaving during the wait cancels the generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config, sse_events


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "fails-at-once": {"fail_after_tokens": 0},
            "late": {"prefill_delay_s": 3.0, "reply": "finally"},
            "fine": {"reply": "ok"},
        },
        server={"keepalive_s": 0.5},
    )
    with ServerThread(config) as srv:
        yield srv


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}


def test_error_before_the_first_delta_is_an_http_status(server: ServerThread) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body("fails-at-once"))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "engine_error"
    assert "x-request-id" in r.headers
    assert scripted(server.backend("fails-at-once")).record.failed
    assert server.services.pool.resolve("fails-at-once").admission.active == 0


def test_headers_go_out_after_the_grace_and_pings_cover_the_wait(server: ServerThread) -> None:
    started = time.monotonic()
    url = server.base_url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body("late"), timeout=10) as r:
        headers_after = time.monotonic() - started
        text = "".join(r.iter_text())
    assert r.status_code == 200 and 0.4 < headers_after < 2.0
    lines = [line for line in text.splitlines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"finally"' in line)
    assert any(line.startswith(":") for line in lines[:first_content])
    assert sse_events(text)[-1] == "[DONE]"


def test_client_leaving_during_the_grace_cancels_the_generation(server: ServerThread) -> None:
    record = scripted(server.backend("late")).record
    before = len(record.cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body("late"), timeout=0.2)
    deadline = time.monotonic() + 5
    while len(record.cancelled) == before:
        assert time.monotonic() < deadline, "the backend never saw the cancellation"
        time.sleep(0.01)
    assert record.active == 0
    assert server.services.pool.resolve("late").admission.active == 0


def test_fast_streams_are_unchanged(server: ServerThread) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body("fine"))
    events = sse_events(r.text)
    assert r.status_code == 200 and '"role":"assistant"' in events[0] and events[-1] == "[DONE]"
