"""Tools, schemas and reasoning on the ExLlama backends through the real gateway (HTTP, the
openai SDK), the loader replaced by a scripted fake: the core plans the output from the
model directory's template, the backend compiles the grammar for its ``tokenizer.json`` and
hands each job its filter, and the core parses the text the job writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

import backends.exllamav2
import backends.exllamav3
from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.backends.exllama.fakes import FakeLoader, FakeModel, words
from tests.backends.exllama.tokenizer_json import write_tokenizer_json
from tests.backends.llamacpp.families import HERMES_TEMPLATE, THINKING_TEMPLATE

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]


def serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, template: str, reply: str
) -> tuple[ServerThread, FakeLoader]:
    write_tokenizer_json(tmp_path)
    cfg = {"chat_template": template, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loader = FakeLoader(script=words(reply))
    monkeypatch.setattr(getattr(backends, name), "load", loader)
    table = {"backend": name, "model_dir": str(tmp_path)}
    return ServerThread(parse_config({"models": {"m": table}}, "test")), loader


@pytest.fixture(params=["exllamav2", "exllamav3"])
def library(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client(server: ServerThread) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def model(loader: FakeLoader) -> FakeModel:
    assert loader.model is not None
    return loader.model


@pytest.fixture
def hermes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str
) -> Iterator[tuple[OpenAI, FakeLoader]]:
    server, loader = serve(tmp_path, monkeypatch, library, HERMES_TEMPLATE, CALL)
    with server, client(server) as c:
        yield c, loader


def test_a_required_tool_call_is_constrained_and_parsed(hermes: tuple[OpenAI, FakeLoader]) -> None:
    c, loader = hermes
    r = c.chat.completions.create(model="m", messages=ASK, tools=[TOOL], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call: Any = calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    spec = model(loader).specs[-1]
    assert spec.constraint is not None and spec.constraint.failed is None
    # the call is steered to finish within the job's budget (budget_steering's default)
    steering = spec.constraint.steering
    assert steering is not None and steering.limit == spec.max_new_tokens
    # <tool_call> is an added token: the job decodes it into the text the parser reads
    assert spec.decode_special


def test_streamed_tool_calls_reassemble(hermes: tuple[OpenAI, FakeLoader]) -> None:
    c, _ = hermes
    with c.chat.completions.stream(model="m", messages=ASK, tools=[TOOL]) as stream:
        for _ in stream:
            pass
        done = stream.get_final_completion()
    calls = done.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert done.choices[0].message.content in (None, "")


def test_auto_and_json_schema_get_grammars(hermes: tuple[OpenAI, FakeLoader]) -> None:
    c, loader = hermes
    c.chat.completions.create(model="m", messages=ASK, max_tokens=5)
    assert model(loader).specs[-1].constraint is None, "free text: no filter"
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    c.chat.completions.create(model="m", messages=ASK, response_format=fmt, max_tokens=5)
    assert model(loader).specs[-1].constraint is not None
    c.completions.create(model="m", prompt="x", extra_body={"response_format": fmt}, max_tokens=5)
    assert model(loader).specs[-1].constraint is not None, "completions are constrained too"


def test_bad_tool_input_is_a_400(hermes: tuple[OpenAI, FakeLoader]) -> None:
    c, loader = hermes
    jobs = len(model(loader).specs)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="m", messages=ASK, tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=ASK, logprobs=True)
    assert err.value.body["param"] == "logprobs"  # type: ignore[index]
    assert len(model(loader).specs) == jobs, "nothing reached the engine"


@pytest.mark.parametrize("effort", [None, "none"])
def test_reasoning_opened_by_the_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str, effort: str | None
) -> None:
    reply = "I check the map.</think>\n\nParis is sunny." if effort is None else "Paris is sunny."
    server, _ = serve(tmp_path, monkeypatch, library, THINKING_TEMPLATE, reply)
    extra = {} if effort is None else {"reasoning_effort": effort}
    with server, client(server) as c:
        r: Any = c.chat.completions.create(model="m", messages=ASK, extra_body=extra)
    message = r.choices[0].message
    assert message.content == "Paris is sunny."
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning == ("I check the map." if effort is None else None)
