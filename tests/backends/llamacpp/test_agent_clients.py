"""The clients agents are built with, unmodified, against the real SmolLM2 over HTTP:
instructor, pydantic-ai, the OpenAI Agents SDK (its chat-completions model) and LangChain's
``bind_tools`` / ``with_structured_output``. Each sends tools, ``tool_choice`` or
``response_format`` in its own way; each must get a valid result on its first try (retries
off where the client has them), because the gateway enforces what it is asked with a grammar.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import instructor
import pytest
from agents import (
    Agent,
    Model,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import NativeOutput
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve

set_tracing_disabled(True)  # the Agents SDK would export traces to OpenAI


class Person(BaseModel):
    """A person (bounded, so an answer always fits ``max_tokens``)."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    role: Literal["engineer", "doctor", "teacher"]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


ASK_PERSON = "Invent a person who works as an engineer."
ASK_SUM = "What is 2 plus 3? Use the add tool."


@pytest.fixture(scope="module")
def agent_server(smol_path: Path) -> Iterator[ServerThread]:
    """SmolLM2 with room for what agents send (tool schemas, earlier calls and results)."""
    with serve({SMOL: model_table(smol_path, kv_cache={"n_ctx_per_slot": 4096})}) as server:
        yield server


@pytest.fixture
def base_url(agent_server: ServerThread) -> str:
    return agent_server.base_url + "/v1"


@pytest.fixture
def sync_client(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=120) as client:
        yield client


def async_client(base_url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=120)


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor(sync_client: OpenAI, mode: instructor.Mode) -> None:
    client = instructor.from_openai(sync_client, mode=mode)
    person = client.chat.completions.create(
        model=SMOL, response_model=Person, max_retries=0, max_tokens=120, temperature=0.7,
        messages=[{"role": "user", "content": ASK_PERSON}],
    )  # fmt: skip
    assert isinstance(person, Person)


@pytest.mark.parametrize("native", [False, True])
def test_pydantic_ai_output_types(base_url: str, native: bool) -> None:
    """pydantic-ai's default structured output is a forced ``final_result`` tool call; its
    ``NativeOutput`` is a strict ``json_schema`` response format."""

    async def run() -> None:
        async with async_client(base_url) as client:
            await pydantic_run(client)

    async def pydantic_run(client: AsyncOpenAI) -> None:
        model = OpenAIChatModel(SMOL, provider=OpenAIProvider(openai_client=client))
        settings: Any = {"max_tokens": 120, "temperature": 0.5}
        output: Any = NativeOutput(Person) if native else Person
        agent = PydanticAgent(model, output_type=output, retries=0, model_settings=settings)
        result = await agent.run(ASK_PERSON)
        calls = [p for m in result.all_messages() for p in m.parts if isinstance(p, ToolCallPart)]
        names = {c.tool_name for c in calls}  # required, not named: parallel calls may come
        assert names == (set() if native else {"final_result"})
        assert isinstance(result.output, Person)

    asyncio.run(run())


async def agents_scenario(model: Model) -> None:
    """The Agents SDK's two ways to a structured answer, on ``model`` (its chat-completions
    or its Responses model): a Pydantic ``output_type``, and a forced function tool."""
    calls: list[tuple[int, int]] = []

    @function_tool
    def add_tool(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    settings = ModelSettings(max_tokens=120, temperature=0.5)
    config = RunConfig(tracing_disabled=True)
    structured = Agent(name="people", model=model, output_type=Person, model_settings=settings)
    result = await Runner.run(structured, ASK_PERSON, run_config=config)
    assert isinstance(result.final_output, Person)
    forced = ModelSettings(
        max_tokens=120, temperature=0.5, tool_choice="required", parallel_tool_calls=False
    )
    tooled = Agent(
        name="calculator", model=model, tools=[add_tool], model_settings=forced,
        tool_use_behavior="stop_on_first_tool",
    )  # fmt: skip
    result = await Runner.run(tooled, ASK_SUM, run_config=config, max_turns=2)
    assert len(calls) == 1  # called once, with integers (the tool's schema enforced)
    assert result.final_output == str(sum(calls[0]))


def test_openai_agents_sdk_output_type_and_function_tool(base_url: str) -> None:
    async def run() -> None:
        async with async_client(base_url) as client:
            await agents_scenario(OpenAIChatCompletionsModel(model=SMOL, openai_client=client))

    asyncio.run(run())


@pytest.fixture
def chat(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=SMOL, base_url=base_url, api_key="test", max_retries=0, max_tokens=120,
        temperature=0.5, timeout=120,
    )  # fmt: skip


def test_langchain_bind_tools_invoke_and_stream(chat: ChatOpenAI) -> None:
    bound = chat.bind_tools([tool(add)], tool_choice="add", parallel_tool_calls=False)
    message = bound.invoke(ASK_SUM)
    assert [c["name"] for c in message.tool_calls] == ["add"]
    args = message.tool_calls[0]["args"]
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    total: AIMessageChunk | None = None
    for chunk in bound.stream(ASK_SUM):
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total is not None and not total.content  # no markup in the text
    assert [c["name"] for c in total.tool_calls] == ["add"]
    assert set(total.tool_calls[0]["args"]) == {"a", "b"}


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat: ChatOpenAI, method: str) -> None:
    structured = chat.with_structured_output(Person, method=method)  # type: ignore[arg-type]
    assert isinstance(structured.invoke(ASK_PERSON), Person)
