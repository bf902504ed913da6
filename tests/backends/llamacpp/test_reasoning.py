"""Reasoning on a tiny generated GGUF whose template thinks as Qwen3's does: the generation
prompt opens ``<think>`` (unless ``reasoning_effort`` is "none", which renders an empty,
closed reasoning). The output then starts inside the reasoning: the parser must read it as
reasoning and the grammar must let it end before the constrained answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import backend_of, client_for, model_table, serve
from tests.backends.llamacpp.families import THINKING_TEMPLATE
from tests.backends.llamacpp.tiny_gguf import Vocab, write_tiny_gguf

MODEL = "thinker"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
ASK: Any = [{"role": "user", "content": "Which city?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    vocab = Vocab(template=THINKING_TEMPLATE, user_defined=("<think>", "</think>"))
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "think.gguf", vocab=vocab)
    with serve({MODEL: model_table(Path(path))}) as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with client_for(server) as c:
        yield c


def end_token(server: ServerThread) -> int:
    fmt = backend_of(server, MODEL).chat_format
    assert fmt is not None and fmt.reasoning is not None
    return fmt.special[fmt.reasoning.end]


def test_the_schema_follows_the_opened_reasoning(server: ServerThread, client: OpenAI) -> None:
    """The prompt ends in ``<think>\\n``: the model writes reasoning, ``</think>``, then the
    answer the schema allows (the bias makes the tiny model end its reasoning at once)."""
    bias = {str(end_token(server)): 100}
    for stream in (False, True):
        r: Any = client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=FORMAT, max_tokens=60, seed=1,
            logit_bias=bias, stream=stream,
        )  # fmt: skip
        if stream:
            content, reasoning = "", ""
            for chunk in r:
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                    reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        else:
            message = r.choices[0].message
            content, reasoning = message.content, getattr(message, "reasoning_content", "")
            assert r.choices[0].finish_reason == "stop"
        assert "</think>" not in content and "<think>" not in reasoning
        jsonschema.validate(json.loads(content), CITY)


def test_free_reasoning_never_reaches_the_content(server: ServerThread, client: OpenAI) -> None:
    r: Any = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, seed=3,
        logit_bias={str(end_token(server)): 5},
    )  # fmt: skip
    message = r.choices[0].message
    text = (message.content or "") + (getattr(message, "reasoning_content", None) or "")
    assert "</think>" not in text
    if r.choices[0].finish_reason == "length" and not message.content:
        assert message.reasoning_content, "all of it is reasoning until </think>"


def test_no_thinking_renders_a_closed_reasoning(server: ServerThread, client: OpenAI) -> None:
    r: Any = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=FORMAT, max_tokens=40, seed=2,
        reasoning_effort="none",
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), CITY)
    assert not getattr(choice.message, "reasoning_content", None)
