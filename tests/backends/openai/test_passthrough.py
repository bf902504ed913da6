"""Capabilities a fleet declares pass through unchanged: tools, response_format, embeddings;
undeclared ones are a 400 naming the field, before any upstream request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.testing import ServerThread, scripted_embedding
from tests.backends.openai.fleet import fleet, front_config, scripted_upstream
from tests.support import openai_client

CALL = {"name": "lookup", "arguments": '{"query": "llama.cpp", "limit": 3}'}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "strict": True,
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
ASK = [{"role": "user", "content": "find it"}]
ALL = ["streaming", "completions", "tools", "json_schema", "embeddings"]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerThread, ServerThread]]:
    upstream = scripted_upstream(
        {
            "caller": {"capabilities": ALL, "tool_calls": [CALL]},
            "echo": {"capabilities": ALL, "echo": True},
            "emb": {"capabilities": ALL, "embedding_size": 12},
        }
    )
    with ServerThread(upstream) as up:
        replica = {"replicas": [{"url": up.base_url}], "health": {"path": "/ready"}}
        front = front_config(
            {
                "caller": {**replica, "capabilities": ["tools", "json_schema"]},
                "echo": {**replica, "capabilities": ["tools", "json_schema"]},
                "emb": {**replica, "capabilities": ["embeddings"]},
                "bare": {**replica, "upstream_model": "caller"},
            }
        )
        with ServerThread(front) as fr:
            yield up, fr


@pytest.fixture
def client(servers: tuple[ServerThread, ServerThread]) -> Iterator[OpenAI]:
    with openai_client(servers[1].base_url) as c:
        yield c


def test_tool_calls_come_back_through_the_fleet(client: OpenAI) -> None:
    r = client.chat.completions.create(model="caller", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    calls = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        (CALL["name"], CALL["arguments"])
    ]
    with client.chat.completions.stream(model="caller", messages=ASK, tools=TOOLS) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in streamed] == [CALL["arguments"]]


@contextmanager
def upstream_bodies(up: ServerThread, path: str) -> Iterator[list[bytes]]:
    """The request bodies the upstream's ``path`` route receives while the block runs."""
    seen: list[bytes] = []
    route = next(r for r in up.app.router.routes if getattr(r, "path", None) == path)
    original = route.app  # type: ignore[attr-defined]

    async def spy(scope: object, receive: object, send: object) -> None:
        async def tap() -> object:
            message = await receive()  # type: ignore[operator]
            seen.append(message.get("body", b""))
            return message

        await original(scope, tap, send)

    route.app = spy  # type: ignore[attr-defined]
    try:
        yield seen
    finally:
        route.app = original  # type: ignore[attr-defined]


def test_fields_reach_the_replica_unchanged(
    servers: tuple[ServerThread, ServerThread], client: OpenAI
) -> None:
    up, _ = servers
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_9", "content": "found 3"},
    ]  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with upstream_bodies(up, "/v1/chat/completions") as seen:
        extra: dict[str, Any] = {"messages": history, "tools": TOOLS, "response_format": fmt}
        client.chat.completions.create(
            model="echo",
            tool_choice={"type": "function", "function": {"name": "lookup"}},
            parallel_tool_calls=False,
            **extra,
        )
    body = json.loads(b"".join(seen))
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == fmt
    assert body["messages"][1]["tool_calls"][0]["id"] == "call_9"
    assert body["messages"][2] == {"role": "tool", "content": "found 3", "tool_call_id": "call_9"}


def test_completions_response_format_reaches_the_replica(
    servers: tuple[ServerThread, ServerThread], client: OpenAI
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with upstream_bodies(servers[0], "/v1/completions") as seen:
        client.completions.create(
            model="echo", prompt="as JSON:", max_tokens=4, extra_body={"response_format": fmt}
        )
    assert json.loads(b"".join(seen))["response_format"] == fmt


def test_embeddings_pass_through(client: OpenAI) -> None:
    r = client.embeddings.create(model="emb", input=["one", "two"], encoding_format="float")
    assert [d.embedding for d in r.data] == [
        pytest.approx(scripted_embedding(t, 12)) for t in ("one", "two")
    ]
    assert r.usage.prompt_tokens == 2
    short = client.embeddings.create(model="emb", input="one", dimensions=5)
    assert len(short.data[0].embedding) == 5


def test_undeclared_capabilities_are_400s_before_any_upstream_request(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    _, front = servers
    before = fleet(front, "bare").stats().active_sequences, up_requests(servers[0])
    url = front.base_url + "/v1"
    tools = httpx.post(url + "/chat/completions", json={"model": "bare", "messages": ASK,
                                                         "tools": TOOLS})  # fmt: skip
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    fmt = {"model": "bare", "messages": ASK, "response_format": {"type": "json_object"}}
    refused = httpx.post(url + "/chat/completions", json=fmt)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"
    for path, lp in (("/chat/completions", {"logprobs": True}), ("/completions", {"logprobs": 2})):
        body = {"model": "echo", "messages": ASK, "prompt": "x", **lp}
        refused = httpx.post(url + path, json=body)  # no fleet relays logprobs yet
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    emb = httpx.post(url + "/embeddings", json={"model": "bare", "input": "x"})
    assert emb.status_code == 400 and emb.json()["error"]["param"] == "model"
    assert (fleet(front, "bare").stats().active_sequences, up_requests(servers[0])) == before


def up_requests(up: ServerThread) -> int:
    return len(up.services.pool.resolve("caller").backend.record.started)  # type: ignore[attr-defined]
