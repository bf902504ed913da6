"""The agent clients, unmodified, with an unbounded nested schema (free strings, a list, a
sub-object) at the ``max_tokens`` where each used to raise because SmolLM2 ran a string or a
list into the budget: openai ``.parse()`` (chat and Responses), instructor (TOOLS, JSON_SCHEMA,
TOOLS_STRICT), pydantic-ai (its tool output, its native output, a tool call), LangChain
``with_structured_output`` (json_schema, function_calling, json_mode) and the Agents SDK.
Budget steering ends every answer within the budget, so each must succeed on its first try.

``GATEWAY_CLIENT_RUNS=20`` runs each client that many times in a row (different subjects, at
temperature 0.8); CI runs each once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import instructor
import pytest
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner
from agents import function_tool as agents_tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import NativeOutput
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.usage import UsageLimits

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve

RUNS = int(os.environ.get("GATEWAY_CLIENT_RUNS", "1"))
pytestmark = pytest.mark.timeout(300 * RUNS)
SUBJECTS = ["a retired sailor", "a violinist", "a baker", "a nurse", "a chess teacher",
            "a potter", "a beekeeper", "a librarian", "a surfer", "a carpenter"]  # fmt: skip
TEMPERATURE = 0.8


class Address(BaseModel):
    street: str
    city: str
    country: str


class Profile(BaseModel):
    """A person's profile: nothing bounds its strings or its list."""

    name: str
    age: int
    occupation: str
    skills: list[str]
    address: Address
    biography: str


def ask(i: int) -> str:
    return f"Write a detailed profile of {SUBJECTS[i % len(SUBJECTS)]} (#{i})."


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    with serve({SMOL: model_table(smol_path, kv_cache={"n_ctx_per_slot": 4096})}) as srv:
        yield srv


@pytest.fixture
def base_url(server: ServerThread) -> str:
    return server.base_url + "/v1"


@pytest.fixture
def client(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=120) as c:
        yield c


def test_openai_parse(client: OpenAI) -> None:
    for i in range(RUNS):
        reply = client.chat.completions.parse(
            model=SMOL, messages=[{"role": "user", "content": ask(i)}], response_format=Profile,
            max_tokens=400, temperature=TEMPERATURE,
        )  # fmt: skip
        assert isinstance(reply.choices[0].message.parsed, Profile)


def test_openai_responses_parse(client: OpenAI) -> None:
    for i in range(RUNS):
        response = client.responses.parse(
            model=SMOL, input=ask(i), text_format=Profile, max_output_tokens=400,
            temperature=TEMPERATURE,
        )  # fmt: skip
        assert response.status == "completed"
        assert isinstance(response.output_parsed, Profile)


@pytest.mark.filterwarnings("ignore:Mode.TOOLS_STRICT is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS_STRICT]
)
def test_instructor(client: OpenAI, mode: instructor.Mode) -> None:
    patched = instructor.from_openai(client, mode=mode)
    for i in range(RUNS):
        profile = patched.chat.completions.create(
            model=SMOL, response_model=Profile, max_retries=0, max_tokens=400,
            temperature=TEMPERATURE, messages=[{"role": "user", "content": ask(i)}],
        )  # fmt: skip
        assert isinstance(profile, Profile)


@pytest.mark.parametrize("how", ["tool_output", "native_output", "tool_call"])
def test_pydantic_ai(base_url: str, how: str) -> None:
    """Its default output (a forced ``final_result`` call), its ``NativeOutput``
    (``json_schema``), and an agent made to call a tool whose argument is the profile (its
    run stops after that one request)."""
    saved: list[Profile] = []

    def save_profile(profile: Profile) -> str:
        """Save a person's profile."""
        saved.append(profile)
        return "saved"

    async def run(i: int) -> None:
        async with AsyncOpenAI(base_url=base_url, api_key="t", max_retries=0) as c:
            model = OpenAIChatModel(SMOL, provider=OpenAIProvider(openai_client=c))
            settings: Any = {"max_tokens": 300, "temperature": TEMPERATURE}
            if how == "tool_call":  # forced past pydantic-ai's own check (it has output tools)
                settings["extra_body"] = {"tool_choice": "required"}
                settings["parallel_tool_calls"] = False  # one call: one profile saved
                agent: Any = PydanticAgent(
                    model, tools=[save_profile], retries=0, model_settings=settings
                )
                with pytest.raises(UsageLimitExceeded):
                    await agent.run(ask(i), usage_limits=UsageLimits(request_limit=1))
                assert len(saved) == i + 1
                return
            output: Any = NativeOutput(Profile) if how == "native_output" else Profile
            agent = PydanticAgent(model, output_type=output, retries=0, model_settings=settings)
            assert isinstance((await agent.run(ask(i))).output, Profile)

    for i in range(RUNS):
        asyncio.run(run(i))


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(base_url: str, method: str) -> None:
    """json_schema and function_calling give a Profile; json_mode sends no schema (only
    ``json_object``), so what the server owes is a whole JSON object, parsed to a dict."""
    chat = ChatOpenAI(
        model=SMOL, base_url=base_url, api_key="t", max_retries=0, max_tokens=400,
        temperature=TEMPERATURE, timeout=120,
    )  # fmt: skip
    schema: Any = Profile.model_json_schema() if method == "json_mode" else Profile
    structured = chat.with_structured_output(schema, method=method)  # type: ignore[arg-type]
    for i in range(RUNS):
        answer = structured.invoke(ask(i) + (" Answer in JSON." if method == "json_mode" else ""))
        assert isinstance(answer, dict if method == "json_mode" else Profile)


def test_openai_agents_sdk(base_url: str) -> None:
    """An ``output_type`` (a strict json_schema) and a forced tool whose argument is the
    profile (the run stops on the call)."""
    saved: list[Profile] = []

    @agents_tool
    def save_profile(profile: Profile) -> str:
        """Save a person's profile."""
        saved.append(profile)
        return "saved"

    async def run() -> None:
        async with AsyncOpenAI(base_url=base_url, api_key="t", max_retries=0) as c:
            model = OpenAIChatCompletionsModel(model=SMOL, openai_client=c)
            settings = ModelSettings(max_tokens=400, temperature=TEMPERATURE)
            forced = ModelSettings(max_tokens=300, temperature=TEMPERATURE,
                                   tool_choice="required", parallel_tool_calls=False)  # fmt: skip
            typed = Agent(name="profiles", model=model, output_type=Profile,
                          model_settings=settings)  # fmt: skip
            tooled = Agent(name="saver", model=model, tools=[save_profile], model_settings=forced,
                           tool_use_behavior="stop_on_first_tool")  # fmt: skip
            for i in range(RUNS):
                result = await Runner.run(typed, ask(i), run_config=RunConfig())
                assert isinstance(result.final_output, Profile)
                await Runner.run(tooled, ask(i) + " Save it.", run_config=RunConfig(), max_turns=2)
                assert len(saved) == i + 1

    asyncio.run(run())
