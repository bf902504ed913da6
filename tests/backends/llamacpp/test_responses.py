"""``/v1/responses`` on the real SmolLM2 over HTTP: the openai SDK's ``responses`` helpers
and the OpenAI Agents SDK's Responses model. Schemas, forced calls and custom-tool regexes
are enforced by the grammar; a stored conversation's second turn reuses the first's KV."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from agents import OpenAIResponsesModel
from openai import AsyncOpenAI, OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve
from tests.backends.llamacpp.test_agent_clients import ASK_PERSON, ASK_SUM, Person, agents_scenario

ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two integers.",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def server(smol_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    table = model_table(smol_path, kv_cache={"n_ctx_per_slot": 4096})
    with serve({SMOL: table}) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url + "/v1", api_key="t", max_retries=0, timeout=120) as c:
        yield c


def test_create_and_stream_agree(client: OpenAI) -> None:
    kw: Any = {"model": SMOL, "input": "Name a color.", "max_output_tokens": 24, "temperature": 0}
    body = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last: Any = events[-1]
    assert last.type == f"response.{body.status}"  # completed, or incomplete if cut
    assert body.output_text and "".join(deltas) == last.response.output_text == body.output_text
    assert body.usage is not None and body.usage.output_tokens > 0


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_parse_with_a_pydantic_text_format(client: OpenAI, temperature: float) -> None:
    r = client.responses.parse(
        model=SMOL, input=ASK_PERSON, text_format=Person, max_output_tokens=120,
        temperature=temperature,
    )  # fmt: skip
    assert r.status == "completed" and isinstance(r.output_parsed, Person)


def test_required_call_validates(client: OpenAI) -> None:
    for stream in (False, True):
        kw: Any = {"model": SMOL, "input": ASK_SUM, "tools": [ADD], "tool_choice": "required"}
        kw |= {"parallel_tool_calls": False, "max_output_tokens": 80, "temperature": 1.2}
        if stream:
            with client.responses.stream(**kw) as s:
                r = s.get_final_response()
        else:
            r = client.responses.create(**kw)
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "add"
        jsonschema.validate(json.loads(calls[0].arguments), ADD["parameters"])


def test_custom_tool_regex_is_enforced(client: OpenAI) -> None:
    digits: Any = {
        "type": "custom", "name": "pin", "description": "A PIN code",
        "format": {"type": "grammar", "syntax": "regex", "definition": "[0-9]{4}"},
    }  # fmt: skip
    r = client.responses.create(
        model=SMOL, input="Make up a PIN.", tools=[digits],
        tool_choice={"type": "custom", "name": "pin"}, max_output_tokens=40, temperature=1.2,
    )  # fmt: skip
    [call] = r.output
    assert call.type == "custom_tool_call" and re.fullmatch(r"[0-9]{4}", call.input), call


def test_a_stored_conversation_reuses_the_cache(client: OpenAI) -> None:
    first = client.responses.create(
        model=SMOL, input="Tell me about the sea.", max_output_tokens=32, temperature=0,
        instructions="You are brief.",
    )  # fmt: skip
    second = client.responses.create(
        model=SMOL, input="And the sky?", previous_response_id=first.id, max_output_tokens=16,
        temperature=0, instructions="You are brief.",
    )  # fmt: skip
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.total_tokens
    # everything of turn one, input and output, came from the KV cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_openai_agents_sdk_responses_model(server: ServerThread) -> None:
    async def run() -> None:
        base_url = server.base_url + "/v1"
        async with AsyncOpenAI(base_url=base_url, api_key="t", max_retries=0, timeout=120) as c:
            await agents_scenario(OpenAIResponsesModel(model=SMOL, openai_client=c))

    asyncio.run(run())


@pytest.mark.parametrize("cap", [None, 1])
def test_max_tool_calls_caps_the_calls(client: OpenAI, cap: int | None) -> None:
    kw: Any = {"max_tool_calls": cap} if cap else {}
    kw |= {"tools": [ADD], "tool_choice": "required", "max_output_tokens": 160}
    ask = "Add 1 and 2, then 3 and 4, then 5 and 6: three calls of add."
    r = client.responses.create(model=SMOL, input=ask, temperature=0, **kw)
    calls = [o for o in r.output if o.type == "function_call"]
    if cap is None:  # the model makes several calls when it may: the cap below is the grammar's
        assert len(calls) > 1
    else:
        assert len(calls) == cap
