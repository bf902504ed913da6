"""The core's output path end to end, with the scripted double acting as an in-process model
(``tool_format`` set): its text is parsed into reasoning, content and tool calls; schemas
are checked before anything is queued; ``generic`` models get tools in the system prompt and
tool results as user turns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config
from tests.support import openai_client

CAPS = ["streaming", "completions", "tools", "json_schema"]
REPLY = '<think>Paris, then.</think>\n\nChecking. <tool_call>{"name": "f", "arguments": {"a": 1}}'
TOOLS: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
ASK: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "agent": {"capabilities": CAPS, "tool_format": "hermes", "reply": REPLY},
            "echo": {"capabilities": CAPS, "tool_format": "generic", "echo": True},
        }
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def test_reply_is_parsed_into_reasoning_content_and_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking. "
    extra: Any = choice.message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "Paris, then."
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("f", {"a": 1})
    ]
    with client.chat.completions.stream(model="agent", messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Checking. "
    assert [c.function.name for c in final.choices[0].message.tool_calls or []] == ["f"]


def test_tool_choice_none_leaves_the_markup_as_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop"
    assert "<tool_call>" in (r.choices[0].message.content or "")


def test_generic_models_get_tool_results_as_user_turns(client: openai.OpenAI) -> None:
    history: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]  # fmt: skip
    r = client.chat.completions.create(model="echo", messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "<tool_response>\n42\n</tool_response>"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format.json_schema.schema",
        ),
        ({"tools": TOOLS + TOOLS}, "tools"),
    ],
)  # fmt: skip
def test_schemas_are_checked_before_anything_is_queued(
    client: openai.OpenAI, server: ServerThread, extra: dict[str, Any], param: str
) -> None:
    backend: Any = server.backend("agent")
    before = len(backend.record.started)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="agent", messages=ASK, extra_body=extra)
    body: Any = err.value.body
    assert body["param"] == param
    assert len(backend.record.started) == before
