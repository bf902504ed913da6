"""``truncation: "auto"`` (Responses): bounded work for long conversations, none for a client
that left (issue 23 finding 3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ResponsesConfig
from gateway.output import schemas
from gateway.testing import ServerThread
from gateway.types import GenerationRequest, TokenizedPrompt
from tests.gateway.helpers import scripted_config

pytestmark = pytest.mark.timeout(30)

TOOLS = ["streaming", "completions", "tools", "json_schema"]


def conversation(turns: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i in range(turns):
        out += [
            {"role": "user", "content": f"question {i} a b c"},
            {"role": "assistant", "content": f"answer {i} d e f"},
        ]
    return [*out, {"role": "user", "content": "the last question"}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    models = {"m": {"context_length": 200, "capabilities": TOOLS, "tool_format": "hermes"}}
    config = replace(scripted_config(models), responses=ResponsesConfig(path=str(tmp_path / "s")))
    with ServerThread(config) as srv:
        yield srv


class Counted:
    """The backend's ``validate`` wrapped: how often it ran, optionally slowed down."""

    def __init__(self, srv: ServerThread, monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
        backend = srv.backend("m")
        real = backend.validate
        self.calls = 0

        async def validate(request: GenerationRequest) -> TokenizedPrompt:
            self.calls += 1
            await asyncio.sleep(delay_s)
            return await real(request)

        monkeypatch.setattr(backend, "validate", validate)


def body(turns: int, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "input": conversation(turns), "truncation": "auto", **extra}


def test_truncation_renders_the_conversation_a_logarithmic_number_of_times(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 finding 3: ``truncation: "auto"`` re-planned and re-rendered the whole
    conversation once per dropped turn (O(turns²): 512 turns took 22 s on SmolLM2); it
    searches how many turns to drop, and keeps as many as fit."""
    counted = Counted(server, monkeypatch, 0)
    r = httpx.post(server.base_url + "/v1/responses/input_tokens", json=body(512), timeout=20)
    assert r.status_code == 200, r.text
    kept = r.json()["input_tokens"]
    assert 190 < kept <= 200  # the turns that fit, not fewer (each turn is 12 tokens)
    assert counted.calls <= 12  # 1 + 1 + log2(512); was 500
    r = httpx.post(
        server.base_url + "/v1/responses",
        json=body(512, max_output_tokens=4, store=False),
        timeout=20,
    )
    assert r.status_code == 200 and 180 < r.json()["usage"]["input_tokens"] <= 196
    # only the last user turn, still too long: the 400, as without truncation
    alone = {"model": "m", "input": "word " * 300, "truncation": "auto"}
    r = httpx.post(server.base_url + "/v1/responses/input_tokens", json=alone, timeout=20)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_truncation_stops_when_the_client_leaves(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 finding 3: the truncation loop went on rendering after the client left; the
    whole check (plan, render, tokenize) is given up at the disconnect."""
    counted = Counted(server, monkeypatch, 0.3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/responses", json=body(512, store=False), timeout=0.45)
    left = counted.calls
    time.sleep(1.0)
    assert left <= 2 and counted.calls == left


def test_truncation_compiles_each_tool_schema_once(server: ServerThread) -> None:
    """Issue 23 finding 3: with more than 256 distinct schemas (256 tools and the text
    format), every dropped turn compiled every schema again (the compile cache holds 256, so
    each lookup missed); the plan is made once."""
    stamp = time.time_ns()
    tools = [
        {
            "type": "function",
            "name": f"tool_{i}",
            "parameters": {"type": "object", "properties": {f"unique_{i}_{stamp}": {}}},
        }
        for i in range(256)
    ]
    schema = {"type": "object", "properties": {f"answer_{stamp}": {"type": "string"}}}
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema}}
    before = schemas._schema_error.cache_info().misses
    url = server.base_url + "/v1/responses/input_tokens"
    r = httpx.post(url, json=body(64, tools=tools, text=text), timeout=20)
    assert r.status_code == 200 and 0 < r.json()["input_tokens"] <= 200, r.text
    assert schemas._schema_error.cache_info().misses - before == 257  # was 257 per try
