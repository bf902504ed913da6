"""``/v1/responses`` with the official openai SDK over real HTTP (scripted backend): bodies,
events in the order the SDK accumulates them, tools, stored conversations, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from gateway.testing import ServerThread, count_tokens
from tests.gateway.helpers import scripted, scripted_config
from tests.support import sse_events, wait_for

REPLY = "The quick brown fox jumps over the lazy dog"
ARGS = '{"city": "Paris", "days": 3}'
TOOLS = ["streaming", "completions", "tools", "json_schema"]
WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The forecast",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


MIXED = (
    'Let me check. <tool_call>{"name": "weather", "arguments": {"city": "Paris", "days": 3}}'
    "</tool_call> Done."
)


def text_of(item: Any) -> str:
    """The text of an item's first content part (the SDK's item union has no common field)."""
    return str(item.content[0].text)


def models(store: Path) -> dict[str, dict[str, Any]]:
    return {
        "m": {"reply": REPLY, "capabilities": TOOLS, "tool_format": "hermes"},
        "echo": {"echo": True},
        "mixed": {"reply": MIXED, "capabilities": TOOLS, "tool_format": "hermes"},
        "caller": {"capabilities": TOOLS, "tool_calls": [{"name": "weather", "arguments": ARGS}]},
        "json": {
            "reply": '{"city": "Paris", "days": 3}',
            "capabilities": TOOLS,
            "tool_format": "hermes",
        },
    }


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses") / "responses.sqlite3"


@pytest.fixture(scope="module")
def server(store_path: Path) -> Iterator[ServerThread]:
    config = scripted_config(models(store_path))
    config = _with_store(config, store_path)
    with ServerThread(config) as srv:
        yield srv


def _with_store(config: Any, path: Path) -> Any:
    from dataclasses import replace

    from gateway.config import ResponsesConfig

    return replace(config, responses=ResponsesConfig(path=str(path)))


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_create_from_a_string(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hello there", instructions="Be brief.")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == REPLY
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_")
    assert r.instructions == "Be brief." and r.model == "m" and r.to_dict()["store"] is True
    assert r.usage is not None
    assert r.usage.output_tokens == len(REPLY.split())
    assert r.usage.input_tokens == count_tokens("system: Be brief.\nuser: hello there")
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens == 0


def test_create_from_messages_and_items(client: OpenAI) -> None:
    items: Any = [
        {"role": "system", "content": "sys"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [{"type": "input_text", "text": "sunny"}],
        },
    ]
    r = client.responses.create(model="echo", input=items)
    assert r.output_text == "sunny"  # the last message (the tool result) echoed


def test_item_references_replay_stored_items(client: OpenAI) -> None:
    """``item_reference`` names an item of a stored response (its input or its output): the
    item takes its place in the input, and is listed (with its id) as the new input."""
    first = client.responses.create(model="m", input="first question")
    asked = client.responses.input_items.list(first.id).data[0].id
    answered = str(first.output[0].id)
    r = client.responses.create(model="echo", input=[{"type": "item_reference", "id": answered}])
    assert r.output_text == REPLY  # the referenced assistant message is the conversation
    listed = client.responses.input_items.list(r.id, order="asc").data
    assert [i.id for i in listed] == [answered] and listed[0].type == "message"
    mixed: Any = [
        {"type": "item_reference", "id": asked},
        {"role": "user", "content": "and now"},
        {"type": "item_reference", "id": answered},
    ]
    r = client.responses.create(model="echo", input=mixed)
    assert r.output_text == REPLY
    listed = client.responses.input_items.list(r.id, order="asc").data
    assert [text_of(i) for i in listed] == ["first question", "and now", REPLY]
    assert listed[0].id == asked and listed[2].id == answered
    # an item of a later response is found too, and referencing works with a chain
    chained = client.responses.create(
        model="m", input=[{"type": "item_reference", "id": asked}], previous_response_id=first.id
    )
    assert chained.status == "completed"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "item_reference", "id": "msg_unknown"}, "not found"),
        ({"type": "item_reference"}, "required"),
        ({"type": "item_reference", "id": 7}, "required"),
    ],
)
def test_a_bad_item_reference_is_a_400(client: OpenAI, entry: Any, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input=[{"role": "user", "content": "x"}, entry])
    assert err.value.body["param"] == "input[1].id"  # type: ignore[index]
    assert message in err.value.body["message"]  # type: ignore[index]


def test_a_deleted_response_s_items_are_gone(client: OpenAI) -> None:
    first = client.responses.create(model="m", input="q")
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model="m", input=[{"type": "item_reference", "id": str(first.output[0].id)}]
        )
    assert err.value.body["param"] == "input[0].id"  # type: ignore[index]


def test_stream_events_in_order(server: ServerThread) -> None:
    body = {"model": "m", "input": "hi", "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        raw = b"".join(resp.iter_bytes()).decode()
    events = [json.loads(e) for e in sse_events(raw)]
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    types = [e["type"] for e in events]
    assert names == types
    assert types[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert types[-4:] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert set(types[4:-4]) == {"response.output_text.delta"}
    seq = [e["sequence_number"] for e in events]
    assert seq == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == REPLY
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == REPLY
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )


def test_sdk_stream_helper(client: OpenAI) -> None:
    with client.responses.stream(model="m", input="hi") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == REPLY == final.output_text


def test_max_output_tokens_is_incomplete(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hi", max_output_tokens=3)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    item: Any = r.output[0]
    assert r.output_text == "The quick brown" and item.status == "incomplete"
    events = list(client.responses.create(model="m", input="hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


def test_function_call(client: OpenAI) -> None:
    r = client.responses.create(model="caller", input="weather?", tools=[WEATHER])  # type: ignore[list-item]
    [call] = r.output
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments) == json.loads(ARGS)
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")


def test_function_call_streamed(client: OpenAI) -> None:
    with client.responses.stream(model="caller", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types.count("response.function_call_arguments.delta") >= 2
    assert "response.output_text.delta" not in types
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(d.arguments) for d in done] == [json.loads(ARGS)]
    [call] = final.output
    assert call.type == "function_call" and call.arguments == ARGS


def test_custom_and_namespace_tools(client: OpenAI) -> None:
    tools = [
        {"type": "custom", "name": "shell", "description": "run it"},
        {"type": "namespace", "name": "crm", "description": "CRM", "tools": [WEATHER]},
    ]
    r = client.responses.create(model="m", input="hi", tools=tools)  # type: ignore[arg-type]
    assert r.output_text == REPLY and [t.type for t in r.tools] == ["custom", "namespace"]


def test_hosted_tools_are_set_aside(server: ServerThread) -> None:
    body = {
        "model": "m",
        "input": "hi",
        "tools": [
            {"type": "web_search"},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            WEATHER,
        ],
    }
    r = httpx.post(server.base_url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-gateway-ignored-tools"] == "web_search,code_interpreter"
    assert [t["type"] for t in r.json()["tools"]] == ["function"]


class City(BaseModel):
    city: str
    days: int


def test_parse_with_a_text_format(client: OpenAI) -> None:
    r = client.responses.parse(model="json", input="where?", text_format=City)
    assert r.output_parsed == City(city="Paris", days=3)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"


def test_stored_conversation(client: OpenAI) -> None:
    first = client.responses.create(model="m", input="hello there")
    second = client.responses.create(model="m", input="and again", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    # the second prompt replays the first turn's input and output before its own
    replayed = count_tokens(f"user: hello there\nassistant: {REPLY}\nuser: and again")
    assert second.usage.input_tokens == replayed
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == REPLY and got.status == "completed"
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    assert text_of(items.data[0]) == "and again"


def test_stream_is_stored_before_it_completes(client: OpenAI) -> None:
    with client.responses.stream(model="m", input="hello there") as stream:
        final = stream.get_final_response()
    got = client.responses.retrieve(final.id)
    got_item: Any = got.output[0]
    streamed: Any = final.output[0]
    assert got_item.id == streamed.id and got.output_text == REPLY


def test_input_items_pages(client: OpenAI) -> None:
    inputs = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    r = client.responses.create(model="m", input=inputs)  # type: ignore[arg-type]
    page = client.responses.input_items.list(r.id, limit=2, order="asc")
    texts = [text_of(i) for i in page.data]
    assert texts == ["m0", "m1"] and page.has_more
    everything = [text_of(i) for i in client.responses.input_items.list(r.id, limit=2, order="asc")]
    assert everything == [f"m{i}" for i in range(5)]
    newest = client.responses.input_items.list(r.id)
    assert [text_of(i) for i in newest.data] == [f"m{i}" for i in reversed(range(5))]


def test_delete(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hi")
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="x", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_store_false_is_not_kept(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hi", store=False)
    assert r.to_dict()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_input_tokens(server: ServerThread) -> None:
    body = {"model": "m", "input": "one two three", "instructions": "four"}
    r = httpx.post(server.base_url + "/v1/responses/input_tokens", json=body, timeout=30)
    assert r.status_code == 200 and r.json() == {
        "object": "response.input_tokens",
        "input_tokens": 6,
    }


def test_cancel_a_foreground_response(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_missing")


LARK = {"type": "grammar", "syntax": "lark", "definition": "start: 'a'"}
LARK_TOOL = {"type": "custom", "name": "p", "format": LARK}
BAD: list[tuple[dict[str, Any], str]] = [
    (
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        "input[0].call_id",
    ),
    ({"input": [{"type": "no_such_item"}]}, "input[0].type"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0]",
    ),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": "x", "background": True, "store": False}, "background"),
    (
        {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}},
        },
        "text.format.schema",
    ),
    (
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}},
        "text.format.schema",
    ),
    (
        {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
        "tool_choice",
    ),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    (
        {"input": "x", "tools": [{**WEATHER, "parameters": {"type": "bogus"}}]},
        "tools[0].parameters",
    ),
    ({"input": "x", "tools": [LARK_TOOL]}, "tools[0].format"),
    ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search"}}, "tool_choice"),
    (
        {
            "input": "x",
            "tools": [WEATHER],
            "tool_choice": {"type": "allowed_tools", "tools": ["weather"]},
        },
        "tool_choice",
    ),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
    ({"input": "x", "metadata": {"k": "v" * 600}}, "metadata"),
    ({"input": []}, "input"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_it(
    server: ServerThread, fields: dict[str, Any], param: str
) -> None:
    r = httpx.post(server.base_url + "/v1/responses", json={"model": "m", **fields}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_the_store_survives_a_restart(store_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "restart.sqlite3"
    config = _with_store(scripted_config(models(path)), path)
    with ServerThread(config) as srv, OpenAI(base_url=srv.base_url + "/v1", api_key="x") as c:
        first = c.responses.create(model="m", input="hello there")
    with ServerThread(config) as srv, OpenAI(base_url=srv.base_url + "/v1", api_key="x") as c:
        second = c.responses.create(model="m", input="again", previous_response_id=first.id)
        assert second.usage is not None and first.usage is not None
        assert second.usage.input_tokens == count_tokens(
            f"user: hello there\nassistant: {REPLY}\nuser: again"
        )
        assert c.responses.retrieve(first.id).output_text == REPLY


def _hermes(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Models whose text the core parses (hermes): reasoning, custom and namespaced calls."""
    shell = _hermes("shell", {"input": "ls -la"})
    crm = _hermes("crm.lookup", {"id": 7})
    table: dict[str, dict[str, Any]] = {
        "thinker": {"reply": "<think>let me see</think>The answer", "tool_format": "hermes"},
        "shell": {"reply": shell, "capabilities": TOOLS, "tool_format": "hermes"},
        "crm": {"reply": crm, "capabilities": TOOLS, "tool_format": "hermes"},
        "broken": {"reply": REPLY, "fail_after_tokens": 3},
    }
    path = tmp_path_factory.mktemp("parsed") / "r.sqlite3"
    with ServerThread(_with_store(scripted_config(table), path)) as srv:
        yield srv


def test_reasoning_items(parsed: ServerThread) -> None:
    with OpenAI(base_url=parsed.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="thinker", input="why?")
        with c.responses.stream(model="thinker", input="why?") as stream:
            events = list(stream)
            final = stream.get_final_response()
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "let me see" and reasoning.summary == []
    assert message.type == "message" and r.output_text == "The answer"
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]


def test_reasoning_fed_back(parsed: ServerThread) -> None:
    with OpenAI(base_url=parsed.base_url + "/v1", api_key="x") as c:
        first = c.responses.create(model="thinker", input="why?")
        second = c.responses.create(model="thinker", input="and?", previous_response_id=first.id)
    assert second.status == "completed"


def test_custom_tool_call(parsed: ServerThread) -> None:
    tools = [{"type": "custom", "name": "shell", "description": "run a command"}]
    with OpenAI(base_url=parsed.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="shell", input="list", tools=tools)  # type: ignore[arg-type]
        with c.responses.stream(model="shell", input="list", tools=tools) as stream:  # type: ignore[arg-type]
            events = list(stream)
            final = stream.get_final_response()
        [call] = r.output
        assert call.type == "custom_tool_call" and call.input == "ls -la" and call.name == "shell"
        # the input streams as it arrives (deltas), then whole (done)
        kinds = [e.type for e in events if "custom_tool_call_input" in e.type]
        assert kinds[-1] == "response.custom_tool_call_input.done" and len(kinds) > 1
        assert set(kinds[:-1]) == {"response.custom_tool_call_input.delta"}
        deltas = [e for e in events if e.type == "response.custom_tool_call_input.delta"]
        assert "".join(e.delta for e in deltas) == "ls -la"
        assert final.output[0].type == "custom_tool_call" and final.output[0].input == "ls -la"
        # the call and its output feed the next turn
        out = {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "a b c"}
        nxt = c.responses.create(model="shell", input=[out], tools=tools, previous_response_id=r.id)  # type: ignore[arg-type, list-item]
        assert nxt.status == "completed"


def test_namespaced_call(parsed: ServerThread) -> None:
    lookup = {
        "type": "function",
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}},
    }
    tools = [{"type": "namespace", "name": "crm", "description": "CRM", "tools": [lookup]}]
    with OpenAI(base_url=parsed.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="crm", input="find 7", tools=tools)  # type: ignore[arg-type]
    [call] = r.output
    assert call.type == "function_call" and call.name == "lookup" and call.namespace == "crm"
    assert json.loads(call.arguments) == {"id": 7}


def test_an_engine_error_mid_stream_is_one_error_event(parsed: ServerThread) -> None:
    body = {"model": "broken", "input": "hi", "stream": True}
    with httpx.stream("POST", parsed.base_url + "/v1/responses", json=body, timeout=30) as resp:
        events = [json.loads(e) for e in sse_events(b"".join(resp.iter_bytes()).decode())]
    assert resp.status_code == 200
    assert events[-1]["type"] == "error" and events[-1]["message"]
    assert [e["type"] for e in events].count("error") == 1
    seq = [e["sequence_number"] for e in events]
    assert seq == sorted(set(seq))


def test_responses_belong_to_their_api_key(tmp_path: Path) -> None:
    from hashlib import sha256

    keys = {
        "keys": [
            {"name": n, "sha256": sha256(f"sk-{n}".encode()).hexdigest()} for n in ("alice", "bob")
        ]
    }
    config = _with_store(
        scripted_config({"m": {"reply": REPLY}}, plugins={"api_keys": keys}), tmp_path / "k.sqlite3"
    )
    with ServerThread(config) as srv:
        alice = OpenAI(base_url=srv.base_url + "/v1", api_key="sk-alice", max_retries=0)
        bob = OpenAI(base_url=srv.base_url + "/v1", api_key="sk-bob", max_retries=0)
        with alice, bob:
            r = alice.responses.create(model="m", input="mine")
            assert alice.responses.retrieve(r.id).id == r.id
            with pytest.raises(openai.NotFoundError):
                bob.responses.retrieve(r.id)
            with pytest.raises(openai.NotFoundError):
                bob.responses.delete(r.id)
            with pytest.raises(openai.NotFoundError):
                bob.responses.input_items.list(r.id)
            with pytest.raises(openai.BadRequestError) as err:
                bob.responses.create(model="m", input="x", previous_response_id=r.id)
            assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
            theirs: Any = [{"type": "item_reference", "id": r.output[0].id}]
            with pytest.raises(openai.BadRequestError) as err:  # another key's item: not found
                bob.responses.create(model="m", input=theirs)
            assert err.value.body["param"] == "input[0].id"  # type: ignore[index]
            assert alice.responses.create(model="m", input=theirs).status == "completed"
            assert (
                alice.responses.create(model="m", input="x", previous_response_id=r.id).status
                == "completed"
            )


def test_input_tokens_runs_the_request_plugins(tmp_path: Path) -> None:
    """A key limited to one model may not count another's tokens; no key is a 401; the rate
    limits' end hook runs for every count (the one concurrency slot is never left held)."""
    from hashlib import sha256

    key = {"name": "carol", "sha256": sha256(b"sk-carol").hexdigest(), "models": ["m"]}
    plugins: dict[str, dict[str, Any]] = {
        "api_keys": {"keys": [key]},
        "rate_limit": {"concurrent_requests": 1},
    }
    models = {"m": {"reply": REPLY}, "other": {"reply": REPLY}}
    config = _with_store(scripted_config(models, plugins=plugins), tmp_path / "k.db")
    url = "/v1/responses/input_tokens"
    with ServerThread(config) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as http:
        auth = {"Authorization": "Bearer sk-carol"}
        ok = http.post(url, json={"model": "m", "input": "one two"}, headers=auth)
        assert ok.status_code == 200 and ok.json()["input_tokens"] == 3
        denied = http.post(url, json={"model": "other", "input": "x"}, headers=auth)
        assert denied.status_code == 403 and denied.json()["error"]["param"] == "model"
        anonymous = http.post(url, json={"model": "m", "input": "x"})
        assert anonymous.status_code == 401
        for _ in range(3):  # one request at a time: a slot a count kept would make these 429
            again = http.post(url, json={"model": "m", "input": "one two"}, headers=auth)
            assert again.status_code == 200, again.text


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A model that takes ~0.1 s a word (background runs, cancelled midway)."""
    table = {
        "slow": {"reply": REPLY, "token_delay_s": 0.1},
        # 100 words: a cancel sent after its first token lands midway, however busy the machine
        "long": {"reply": " ".join(["word"] * 100), "token_delay_s": 0.1},
        "broken": {"reply": REPLY, "fail_after_tokens": 2},
        "single": {
            "reply": REPLY, "token_delay_s": 0.1,
            "batching": {"max_concurrent": 1, "max_queue": 1},
        },
    }  # fmt: skip
    path = tmp_path_factory.mktemp("background") / "r.sqlite3"
    with ServerThread(_with_store(scripted_config(table), path)) as srv:
        yield srv


def _until(client: OpenAI, rid: str, status: str, timeout: float = 20) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = client.responses.retrieve(rid)
        if got.status == status or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_background_runs_on_and_is_polled(slow: ServerThread) -> None:
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="slow", input="hi", background=True)
        assert r.status == "queued" and r.output == []  # answered before admission
        assert _until(c, r.id, "in_progress").status == "in_progress"
        early = [i.id for i in c.responses.input_items.list(r.id)]
        done = _until(c, r.id, "completed")
        assert done.status == "completed" and done.output_text == REPLY
        assert [i.id for i in c.responses.input_items.list(r.id)] == early
    assert scripted(slow.backend("slow")).record.active == 0


def test_background_cancel_frees_the_sequence(slow: ServerThread) -> None:
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="long", input="hi", background=True)
        wait_for(lambda: scripted(slow.backend("long")).record.tokens_generated > 0)
        cancelled = c.responses.cancel(r.id)
        assert cancelled.status == "cancelled"
        assert c.responses.retrieve(r.id).status == "cancelled"
        again = c.responses.cancel(r.id)  # cancelling twice changes nothing
        assert again.status == "cancelled"
    record = scripted(slow.backend("long")).record
    assert record.active == 0 and any(rid.startswith(r.id) for rid in record.cancelled)
    admission = slow.services.pool.resolve("long").admission
    assert admission.active == 0


def test_background_answers_while_queued_and_cancels_in_the_queue(slow: ServerThread) -> None:
    """One sequence: the second background response waits in the queue, answered at once
    and polled as ``queued``; cancelled there it never runs; a third finds the queue full
    and is stored as failed; the first is untouched."""
    backend = scripted(slow.backend("single"))
    admission = slow.services.pool.resolve("single").admission
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        first = c.responses.create(model="single", input="hi", background=True)
        wait_for(lambda: backend.record.active == 1)
        second = c.responses.create(model="single", input="hi", background=True)
        assert second.status == "queued"
        wait_for(lambda: admission.queued == 1)
        assert c.responses.retrieve(second.id).status == "queued"
        third = c.responses.create(model="single", input="hi", background=True)
        failed = _until(c, third.id, "failed")
        assert failed.error is not None and "queue" in failed.error.message
        assert c.responses.cancel(second.id).status == "cancelled"
        wait_for(lambda: admission.queued == 0)
        assert _until(c, first.id, "completed").output_text == REPLY
        assert c.responses.retrieve(second.id).status == "cancelled"
    assert not any(rid.startswith(second.id) for rid in backend.record.started)
    wait_for(lambda: admission.active == 0 and backend.record.active == 0)


def test_a_queued_background_stream_says_so(slow: ServerThread) -> None:
    backend = scripted(slow.backend("single"))
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        first = c.responses.create(model="single", input="hi", background=True)
        wait_for(lambda: backend.record.active == 1)
        body = {"model": "single", "input": "hi", "background": True, "stream": True}
        with httpx.stream("POST", slow.base_url + "/v1/responses", json=body, timeout=30) as r:
            events = [json.loads(e) for e in sse_events(b"".join(r.iter_bytes()).decode())]
        assert _until(c, first.id, "completed").status == "completed"
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0]["response"]["status"] == "queued"
    assert events[2]["response"]["status"] == "in_progress"
    assert kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_background_stream_resumes(slow: ServerThread) -> None:
    body = {"model": "slow", "input": "hi", "background": True, "stream": True}
    with httpx.stream("POST", slow.base_url + "/v1/responses", json=body, timeout=30) as resp:
        first = [json.loads(e) for e in sse_events(b"".join(resp.iter_bytes()).decode())]
    assert first[-1]["type"] == "response.completed"
    rid = first[0]["response"]["id"]
    url = f"{slow.base_url}/v1/responses/{rid}?stream=true&starting_after=3"
    with httpx.stream("GET", url, timeout=30) as resp:
        resumed = [json.loads(e) for e in sse_events(b"".join(resp.iter_bytes()).decode())]
    assert [e["sequence_number"] for e in resumed] == [e["sequence_number"] for e in first[4:]]
    assert resumed[-1]["type"] == "response.completed"


def test_background_stream_outlives_its_client(slow: ServerThread) -> None:
    body = {"model": "slow", "input": "hi", "background": True, "stream": True}
    with httpx.stream("POST", slow.base_url + "/v1/responses", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        created = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
    rid = created["response"]["id"]  # the client hung up after the first event
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        assert _until(c, rid, "completed").output_text == REPLY


def test_a_failed_background_response_is_stored_as_failed(slow: ServerThread) -> None:
    with OpenAI(base_url=slow.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="broken", input="hi", background=True)
        failed = _until(c, r.id, "failed")
    assert failed.status == "failed" and failed.error is not None and failed.error.message


def test_a_foreground_response_cannot_be_resumed(client: OpenAI, server: ServerThread) -> None:
    r = client.responses.create(model="m", input="hi")
    got = httpx.get(f"{server.base_url}/v1/responses/{r.id}?stream=true", timeout=30)
    assert got.status_code == 400 and got.json()["error"]["param"] == "stream"


def test_a_store_that_fails_does_not_fail_the_response(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's folder should be")
    config = _with_store(scripted_config({"m": {"reply": REPLY}}), blocked / "r.sqlite3")
    with ServerThread(config) as srv, OpenAI(base_url=srv.base_url + "/v1", api_key="x") as c:
        r = c.responses.create(model="m", input="hi")
        assert r.output_text == REPLY and r.to_dict()["store"] is False
        events = list(c.responses.create(model="m", input="hi", stream=True))
        last: Any = events[-1]
        assert last.type == "response.completed" and last.response.to_dict()["store"] is False
        with pytest.raises(openai.InternalServerError) as err:  # 503: the store, not the id
            c.responses.retrieve(r.id)
        assert err.value.status_code == 503 and err.value.code == "store_unavailable"
        with pytest.raises(openai.InternalServerError):
            c.responses.create(model="m", input="x", previous_response_id=r.id)


def test_max_tool_calls_is_the_grammar_cap() -> None:
    from gateway.types import MAX_PARALLEL_CALLS, Tools, ToolSpec

    specs = (ToolSpec("f"),)
    assert Tools(specs).max_calls == MAX_PARALLEL_CALLS
    assert Tools(specs, limit=2).max_calls == 2
    assert Tools(specs, parallel=False, limit=5).max_calls == 1
    assert Tools(specs, limit=100).max_calls == MAX_PARALLEL_CALLS


def test_truncation_auto_drops_the_oldest_turns(tmp_path: Path) -> None:
    config = _with_store(
        scripted_config({"m": {"reply": "ok", "context_length": 60}}), tmp_path / "t.db"
    )
    turns: Any = []
    for i in range(8):
        turns += [
            {"role": "user", "content": f"question {i} " * 2},
            {"role": "assistant", "content": f"answer {i} " * 2},
        ]
    turns.append({"role": "user", "content": "the last question"})
    with (
        ServerThread(config) as srv,
        OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0) as c,
    ):
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="m", input=turns, instructions="sys", max_output_tokens=4)
        assert err.value.code == "context_length_exceeded"
        r = c.responses.create(
            model="m", input=turns, instructions="sys", max_output_tokens=4, truncation="auto"
        )
        assert r.status == "completed" and r.usage is not None
        assert 0 < r.usage.input_tokens <= 56  # the context less max_output_tokens
        assert r.usage.input_tokens > 30  # only as many turns as needed went
        counted = httpx.post(
            srv.base_url + "/v1/responses/input_tokens",
            json={"model": "m", "input": turns, "instructions": "sys", "truncation": "auto"},
            timeout=30,
        ).json()["input_tokens"]
        assert 0 < counted <= 60
        alone: Any = [{"role": "user", "content": "word " * 80}]
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="m", input=alone, truncation="auto")
        assert err.value.code == "context_length_exceeded"


def test_create_and_stream_give_the_same_items_for_interleaved_text_and_calls(
    client: OpenAI,
) -> None:
    """One segmenter for body and events: text, call, text in the order written (the body
    once merged the texts into one message before the call)."""
    kw: Any = {"model": "mixed", "input": "weather?", "tools": [WEATHER]}
    body = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()

    def shape(items: Any) -> list[tuple[str, str]]:
        return [
            (i.type, text_of(i) if i.type == "message" else f"{i.name}:{i.arguments}")
            for i in items
        ]

    assert (
        shape(body.output)
        == shape(final.output)
        == [
            ("message", "Let me check. "),
            ("function_call", 'weather:{"city": "Paris", "days": 3}'),
            ("message", "Done."),
        ]
    )
    stored = client.responses.retrieve(body.id)
    assert shape(stored.output) == shape(body.output)
