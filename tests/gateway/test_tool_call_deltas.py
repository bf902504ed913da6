"""Tool-call deltas through the chat encoder: the first piece of each call names it, later
pieces carry only arguments; the SDK's stream helper and a plain body agree."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config, sse_json
from tests.support import openai_client

CALLS = [
    {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
]
TOOLS = [
    {"type": "function", "function": {"name": c["name"], "parameters": {"type": "object"}}}
    for c in CALLS
]
ASK = [{"role": "user", "content": "weather and time in Paris?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config({"tools": {"capabilities": ["streaming", "completions", "tools"],
                                        "tool_calls": CALLS}, "plain": {}})  # fmt: skip
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def test_non_streaming_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert [json.loads(c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        json.loads(c["arguments"]) for c in CALLS
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_the_sdk_stream_helper_reassembles_the_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="tools", messages=ASK, tools=TOOLS) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in calls] == [c["arguments"] for c in CALLS]
    assert final.choices[0].finish_reason == "tool_calls"


def test_stream_pieces_follow_openai_shape(server: ServerThread) -> None:
    body = {"model": "tools", "messages": ASK, "tools": TOOLS, "stream": True}
    chunks = sse_json(httpx.post(server.base_url + "/v1/chat/completions", json=body).text)
    pieces = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    pieces = [p[0] for p in pieces if p]
    firsts = [p for p in pieces if "id" in p]
    assert [p["index"] for p in firsts] == [0, 1]
    assert all(p["type"] == "function" and p["function"]["name"] for p in firsts)
    later = [p for p in pieces if "id" not in p]
    assert later and all(set(p) == {"index", "function"} for p in later)
    assert all(set(p["function"]) == {"arguments"} for p in later)
    for i, call in enumerate(CALLS):
        args = "".join(p["function"]["arguments"] for p in pieces if p["index"] == i)
        assert args == call["arguments"]
    assert all("content" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])


def test_tools_on_a_model_without_the_capability_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert info.value.param == "tools"


def test_assistant_tool_calls_in_history_need_the_capability(server: ServerThread) -> None:
    history = [
        *ASK,
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    r = httpx.post(
        server.base_url + "/v1/chat/completions", json={"model": "plain", "messages": history}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls"


def test_tool_choice_without_tools_is_a_400(server: ServerThread) -> None:
    body = {"model": "tools", "messages": ASK, "tool_choice": "required"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
