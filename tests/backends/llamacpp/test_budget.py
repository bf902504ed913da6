"""Constrained answers that finish within ``max_tokens`` on the real SmolLM2, over HTTP with the
official SDKs, on every wire API: a nested ``json_schema`` answer, a forced call with nested
objects and arrays, ``json_object``, Responses' ``text.format`` and Messages' forced tool, at
budgets where the model left alone runs out. The same model with ``budget_steering = false``
(as every peer's grammar) runs out on the same request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema  # type: ignore[import-untyped]
import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve
from tests.support import openai_client

pytestmark = pytest.mark.timeout(120)

PLAIN = "plain"
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["engineer", "teacher", "doctor", "artist", "other"]},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
        "email": {"type": "string"},
    },
    "required": ["name", "age", "role", "hobbies", "address", "email"],
}
ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
            "required": ["name", "email"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "options": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["product", "quantity", "options"],
            },
        },
        "shipping": {
            "type": "object",
            "properties": {"address": {"type": "string"}, "express": {"type": "boolean"}},
            "required": ["address", "express"],
        },
    },
    "required": ["customer", "items", "shipping"],
}
PERSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ORDER_TOOL: Any = {
    "type": "function",
    "function": {"name": "place_order", "description": "Place an order.", "parameters": ORDER},
}
ASK_PERSON: Any = [{"role": "user", "content": "Describe a retired sailor from Lisbon."}]
ASK_ORDER: Any = [
    {"role": "user", "content": "Order three gifts with options for a baker in Lyon."}
]


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    """SmolLM2 twice: steered (the default) and ``plain`` (``budget_steering = false``)."""
    models = {
        SMOL: model_table(smol_path, batching={"max_concurrent": 3}),
        PLAIN: model_table(smol_path, budget_steering=False),
    }
    with serve(models) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def test_json_schema_answers_finish_within_a_tight_budget(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=120,
        temperature=1.0, n=3, seed=7,
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)
    assert reply.usage is not None and reply.usage.completion_tokens <= 3 * 120


def test_a_streamed_answer_finishes_too(client: OpenAI) -> None:
    text, reasons = "", []
    for chunk in client.chat.completions.create(
        model=SMOL, messages=ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=110,
        temperature=0, stream=True,
    ):  # fmt: skip
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_a_forced_call_finishes_within_a_tight_budget(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK_ORDER, tools=[ORDER_TOOL], max_tokens=100, temperature=0.8,
        tool_choice={"type": "function", "function": {"name": "place_order"}}, n=2, seed=3,
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].type == "function"
        jsonschema.validate(json.loads(calls[0].function.arguments), ORDER)


def test_json_object_finishes_where_the_plain_grammar_runs_out(client: OpenAI) -> None:
    ask: Any = [{"role": "user", "content": "Describe a potter in Kyoto as a JSON object."}]
    kw: Any = {"messages": ask, "response_format": {"type": "json_object"}, "temperature": 0}
    plain = client.chat.completions.create(model=PLAIN, max_tokens=150, **kw)
    assert plain.choices[0].finish_reason == "length"  # SmolLM2 loops inside the object
    steered = client.chat.completions.create(model=SMOL, max_tokens=150, **kw)
    assert steered.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(steered.choices[0].message.content or ""), dict)


def test_responses_text_format_finishes(client: OpenAI) -> None:
    response = client.responses.create(
        model=SMOL, input="Describe a nurse in Toronto.", max_output_tokens=120, temperature=1.0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    )  # fmt: skip
    assert response.status == "completed", response.incomplete_details
    jsonschema.validate(json.loads(response.output_text), PERSON)


def test_messages_forced_tool_finishes(server: ServerThread) -> None:
    tool: Any = {"name": "place_order", "description": "Place an order.", "input_schema": ORDER}
    with anthropic.Anthropic(base_url=server.base_url, api_key="t", max_retries=0) as c:
        message = c.messages.create(
            model=SMOL, max_tokens=100, messages=ASK_ORDER, tools=[tool],
            tool_choice={"type": "tool", "name": "place_order"},
        )  # fmt: skip
    assert message.stop_reason == "tool_use"
    (block,) = [b for b in message.content if b.type == "tool_use"]
    jsonschema.validate(block.input, ORDER)


def test_completions_json_object_finishes(client: OpenAI) -> None:
    reply = client.completions.create(
        model=SMOL, prompt="A JSON object describing a beekeeper in Oregon:\n", max_tokens=60,
        temperature=1.0, seed=5, extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].text), dict)
