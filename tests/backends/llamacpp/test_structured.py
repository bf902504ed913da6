"""Tools, structured outputs and logprobs on the real engine: SmolLM2 over HTTP with the openai
SDK. SmolLM2's template knows no tools (the generic format); forced calls and schemas are
enforced by llguidance in the sampler chain, so they must validate every time."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import openai
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, backend_of, wait_for_stats
from tests.support import openai_client

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": WEATHER_PARAMS,
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "teacher"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture
def client(smol_server: ServerThread) -> Iterator[OpenAI]:
    with openai_client(smol_server.base_url) as c:
        yield c


def check_call(call: Any, name: str | None = None) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    args = json.loads(call.function.arguments)
    if name is not None:
        assert call.function.name == name
    schema = WEATHER_PARAMS if call.function.name == "get_weather" else TOOLS[1]["function"]
    jsonschema.validate(
        args, schema if call.function.name == "get_weather" else schema["parameters"]
    )


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_required_tool_calls_validate(client: OpenAI, temperature: float) -> None:
    r = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", n=2,
        temperature=temperature, max_tokens=200, parallel_tool_calls=False,
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1  # parallel_tool_calls false caps the calls at one
        check_call(calls[0])
        assert not choice.message.content
    ids = [c.message.tool_calls[0].id for c in r.choices if c.message.tool_calls]
    assert len(set(ids)) == 2


def test_named_choice_is_enforced_streamed(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model=SMOL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=200,
        temperature=0.8, seed=3,  # a named choice makes one call
    ) as stream:  # fmt: skip
        deltas = [e for e in stream if e.type == "chunk"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        check_call(call, "add")
    firsts = [
        tc
        for e in deltas
        for c in e.chunk.choices
        for tc in (c.delta.tool_calls or [])
        if tc.id is not None
    ]
    assert all(tc.function and tc.function.name == "add" for tc in firsts)
    contents = "".join(c.delta.content or "" for e in deltas for c in e.chunk.choices)
    assert "<tool_call>" not in contents and "{" not in contents


def test_tool_results_continue_the_conversation(client: OpenAI) -> None:
    first = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    call = (first.choices[0].message.tool_calls or [])[0]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "Sunny"}]},
    ]
    r = client.chat.completions.create(
        model=SMOL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0
    )
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    alone = client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=1)
    assert r.usage and alone.usage
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_json_schema_always_validates(client: OpenAI, temperature: float) -> None:
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Invent a person."}], n=2,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        temperature=temperature, max_tokens=120,
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_sdk_parse_helper(client: OpenAI) -> None:
    class Person(BaseModel):  # bounded, so it always fits max_tokens
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=150)

    r = client.chat.completions.parse(
        model=SMOL, messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person, max_tokens=80, temperature=0.7,
    )  # fmt: skip
    assert isinstance(r.choices[0].message.parsed, Person)


def test_json_object_and_a_cut_is_length(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # a complete object always parses
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:
        assert r.choices[0].finish_reason == "length"
        assert (r.choices[0].message.content or "").startswith("{")
    cut = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        max_tokens=4,
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "length"


def test_completions_response_format(client: OpenAI) -> None:
    r = client.completions.create(
        model=SMOL, prompt="A person as JSON:", max_tokens=100, temperature=0.5,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "p", "schema": PERSON}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_mixed_constrained_and_free_streams_at_once(
    client: OpenAI, smol_server: ServerThread
) -> None:
    def one(i: int) -> None:
        if i % 3 == 0:
            r = client.chat.completions.create(
                model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=150,
                temperature=1.0, parallel_tool_calls=False,
            )  # fmt: skip
            check_call((r.choices[0].message.tool_calls or [])[0])
        elif i % 3 == 1:
            fmt: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
            r = client.chat.completions.create(
                model=SMOL, messages=[{"role": "user", "content": "A person?"}],
                response_format=fmt, max_tokens=120, temperature=1.0,
            )  # fmt: skip
            jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)
        else:
            r = client.chat.completions.create(
                model=SMOL, messages=[{"role": "user", "content": "Tell a story."}],
                max_tokens=30, temperature=1.0,
            )  # fmt: skip
            assert r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    backend = backend_of(smol_server, SMOL)
    stats = wait_for_stats(backend.stats, lambda s: s.active_sequences == 0)
    assert stats.max_batch_sequences == 2  # the two slots decoded together


def test_logprobs_chat_and_completions(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
        top_logprobs=5, max_tokens=8, temperature=0,
    )  # fmt: skip
    content = (r.choices[0].logprobs and r.choices[0].logprobs.content) or []
    assert len(content) == r.usage.completion_tokens or len(content) >= 1  # type: ignore[union-attr]
    for entry in content:
        assert entry.top_logprobs[0].token == entry.token  # greedy: its own top-1
        assert len(entry.top_logprobs) == 5 and entry.logprob <= 0
        assert bytes(entry.bytes or []).decode() == entry.token
        total = sum(math.exp(t.logprob) for t in entry.top_logprobs)
        assert 0 < total <= 1.0001
    assert "".join(e.token for e in content) == r.choices[0].message.content
    chunks = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
        max_tokens=8, temperature=0, stream=True,
    )  # fmt: skip
    streamed, text = [], ""
    for chunk in chunks:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            streamed += [e.token for e in (ch.logprobs and ch.logprobs.content) or []]
    assert "".join(streamed) == text and len(streamed) >= 1
    c = client.completions.create(
        model=SMOL, prompt="The sky is", max_tokens=5, logprobs=2, temperature=0
    )
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens and "".join(lp.tokens) == c.choices[0].text
    assert lp.top_logprobs and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset or [])


BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "no"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}},
     "response_format.json_schema.schema"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tools_and_schemas_are_400_naming_the_field(
    client: OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=5, extra_body=extra)
    body: Any = err.value.body
    assert body["param"] == param, body


def test_pathological_schemas_are_bounded(client: OpenAI) -> None:
    deep: Any = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    with pytest.raises(BadRequestError):
        client.chat.completions.create(
            model=SMOL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": deep}},
        )  # fmt: skip
    big_enum: Any = {"enum": [f"value-{i}" for i in range(10_000)]}
    r = client.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=12,
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": big_enum}},
    )  # fmt: skip
    assert json.loads(r.choices[0].message.content or '""') in big_enum["enum"] or (
        r.choices[0].finish_reason == "length"
    )
    regex: Any = {"type": "string", "pattern": "^(a+)+$"}
    r = client.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=10,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": regex}},
    )  # fmt: skip
    assert r.choices[0].message.content is not None


def test_a_failing_grammar_fails_only_its_own_request(
    client: OpenAI, smol_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = backend_of(smol_server, SMOL)._model
    real = model.grammars.matcher

    def broken(grammar: str, param: str) -> Any:
        matcher = real(grammar, param)
        matcher.consume_token(model.tokenizer.encode("zzz", special=False)[0])  # not JSON
        assert matcher.is_error()
        return matcher

    monkeypatch.setattr(model.grammars, "matcher", broken)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    with ThreadPoolExecutor(2) as pool:
        story: Any = [{"role": "user", "content": "Tell a story."}]
        free = pool.submit(
            lambda: client.chat.completions.create(model=SMOL, messages=story, max_tokens=20)
        )
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(
                model=SMOL, messages=ASK, response_format=fmt, max_tokens=20
            )
        assert free.result().choices[0].message.content
    body: Any = err.value.body
    assert body["code"] == "engine_error" and "grammar" in body["message"]
    monkeypatch.undo()
    stats = wait_for_stats(backend_of(smol_server, SMOL).stats, lambda s: s.active_sequences == 0)
    assert stats.active_sequences == 0
    again = client.chat.completions.create(
        model=SMOL, messages=ASK, response_format=fmt, max_tokens=120
    )
    jsonschema.validate(json.loads(again.choices[0].message.content or ""), PERSON)


def test_leaving_a_constrained_stream_frees_its_sequence(
    client: OpenAI, smol_server: ServerThread
) -> None:
    backend = backend_of(smol_server, SMOL)
    before = backend.stats()
    stream = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300,
        stream=True,
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            break
    stream.close()
    stats = wait_for_stats(
        backend.stats, lambda s: s.cancelled > before.cancelled and s.active_sequences == 0
    )
    assert stats.tokens_after_cancel - before.tokens_after_cancel <= 1
