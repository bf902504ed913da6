"""``/v1/models`` says what each model can do (``capabilities``), from what the gateway knows
without loading it: the real server over HTTP with scripted models, and the rule itself on
stub backends. What is listed is what the request checks then let through."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.backend import Declared
from gateway.capabilities import UNKNOWN, ModelCapabilities, model_capabilities
from gateway.testing import ServerThread
from gateway.types import BackendInfo, BatchingKind, Capability
from tests.gateway.helpers import scripted_config
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)

GENERATES = ["streaming", "completions"]
AGENT = [*GENERATES, "tools", "json_schema"]
KEYS = {
    "chat",
    "completions",
    "embeddings",
    "tools",
    "structured_output",
    "reasoning",
    "vision",
    "logprobs",
    "context_length",
    "tool_format",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            # the core parses nothing of its text (as of a remote replica's)
            "plain": {"aliases": ["plain-alias"], "context_length": 2048},
            # an in-process model whose chat format has tool calls and reasoning
            "agent": {"tool_format": "hermes", "capabilities": AGENT},
            "emb": {"capabilities": ["embeddings"], "context_length": 512},
            "lazy": {
                "load": "on_demand",
                "load_delay_s": 0.6,
                "tool_format": "hermes",
                "capabilities": AGENT,
                "context_length": 1024,
            },
        }
    )
    with ServerThread(config) as srv:
        yield srv


def listed(server: ServerThread) -> dict[str, dict[str, Any]]:
    r = httpx.get(server.base_url + "/v1/models", timeout=10)
    assert r.status_code == 200
    return {m["id"]: m for m in r.json()["data"]}


def caps(server: ServerThread, model: str) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/v1/models/{model}", timeout=10)
    assert r.status_code == 200
    body: dict[str, Any] = r.json()["capabilities"]
    return body


def test_every_entry_keeps_the_openai_shape_and_says_what_it_can_do(server: ServerThread) -> None:
    with OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client:
        models = list(client.models.list())
        one = client.models.retrieve("agent")
    assert {m.id for m in models} == {"plain", "plain-alias", "agent", "emb", "lazy"}
    for m in models:
        assert m.object == "model" and m.created > 0 and m.owned_by == "scripted"
        extra = m.model_extra or {}
        assert set(extra["capabilities"]) == KEYS
        assert extra["state"] in ("loaded", "unloaded")
        assert extra["load"] in ("startup", "on_demand")
    assert (one.model_extra or {})["capabilities"]["tools"] is True


def test_a_loaded_model_without_a_chat_format(server: ServerThread) -> None:
    assert caps(server, "plain") == {
        "chat": True,
        "completions": True,
        "embeddings": False,
        "tools": False,
        "structured_output": False,
        "reasoning": None,  # the core parses nothing: its backend may send reasoning or not
        "vision": False,
        "logprobs": False,
        "context_length": 2048,
        "tool_format": None,
    }
    assert caps(server, "plain-alias") == caps(server, "plain")


def test_a_loaded_models_chat_format_tells_tool_calls_and_reasoning(server: ServerThread) -> None:
    got = caps(server, "agent")
    assert got["tools"] is True and got["tool_format"] == "hermes"
    assert got["structured_output"] is True and got["reasoning"] is True
    assert got["embeddings"] is False and got["context_length"] == 4096


def test_an_embedding_only_model_serves_nothing_else(server: ServerThread) -> None:
    got = caps(server, "emb")
    assert got["embeddings"] is True and got["context_length"] == 512
    generation = ("chat", "completions", "tools", "structured_output", "reasoning", "vision")
    assert all(got[k] is False for k in generation)


CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "x", "schema": {"type": "object"}},
}


@pytest.mark.parametrize("model", ["plain", "agent", "emb"])
def test_what_is_listed_is_what_requests_get(server: ServerThread, model: str) -> None:
    got = caps(server, model)

    def served(path: str, body: dict[str, Any]) -> bool:
        r = httpx.post(server.base_url + path, json={"model": model, **body}, timeout=30)
        assert r.status_code in (200, 400), r.text
        return r.status_code == 200

    assert served("/v1/chat/completions", CHAT) is got["chat"]
    assert served("/v1/completions", {"prompt": "hi", "max_tokens": 2}) is got["completions"]
    assert served("/v1/embeddings", {"input": "hi"}) is got["embeddings"]
    assert served("/v1/chat/completions", {**CHAT, "tools": TOOLS}) is got["tools"]
    assert (
        served("/v1/chat/completions", {**CHAT, "response_format": SCHEMA})
        is got["structured_output"]
    )
    assert (
        served("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 1})
        is got["logprobs"]
    )


def test_an_on_demand_model_says_what_its_config_declares_until_loaded(
    server: ServerThread,
) -> None:
    entry = listed(server)["lazy"]
    assert entry["state"] == "unloaded" and entry["load"] == "on_demand"
    assert "max_model_len" not in entry
    before = entry["capabilities"]
    assert before["chat"] is True and before["tools"] is True
    assert before["structured_output"] is True and before["embeddings"] is False
    # only the loaded model tells these: unknown, not guessed
    assert before["context_length"] is None
    assert before["reasoning"] is None and before["tool_format"] is None

    answered: list[int] = []

    def ask() -> None:
        body = {"model": "lazy", **CHAT}
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
        answered.append(r.status_code)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        wait_for(lambda: listed(server)["lazy"]["state"] == "loading", 10, "the load to start")
        assert listed(server)["lazy"]["capabilities"] == before
    finally:
        asker.join(30)
    assert answered == [200]
    entry = listed(server)["lazy"]
    assert entry["state"] == "loaded" and entry["max_model_len"] == 1024
    after = entry["capabilities"]
    assert after["context_length"] == 1024
    assert after["reasoning"] is True and after["tool_format"] == "hermes"
    assert {
        k: v for k, v in after.items() if k not in ("context_length", "reasoning", "tool_format")
    } == {
        k: v for k, v in before.items() if k not in ("context_length", "reasoning", "tool_format")
    }


# -- the rule, on stub backends ------------------------------------------------------------------


class _Unstarted:
    """A backend whose info exists only once started (and declares nothing before)."""

    @property
    def info(self) -> BackendInfo:
        raise RuntimeError("not started")


class _Declaring(_Unstarted):
    def declared(self) -> Declared:
        return Declared(frozenset({Capability.COMPLETIONS, Capability.TOOLS}), 8192)


def test_a_backend_that_cannot_tell_before_its_start_is_unknown_throughout() -> None:
    got = model_capabilities(_Unstarted(), loaded=False)  # type: ignore[arg-type]
    assert got == UNKNOWN
    assert all(v is None for v in got.as_json().values())


def test_a_declaring_backend_is_listed_from_its_declaration() -> None:
    got = model_capabilities(_Declaring(), loaded=False)  # type: ignore[arg-type]
    assert got == ModelCapabilities(
        chat=True,
        completions=True,
        embeddings=False,
        tools=True,
        structured_output=False,
        reasoning=None,
        vision=False,
        logprobs=False,
        context_length=8192,
        tool_format=None,
    )


class _Loaded:
    info = BackendInfo(
        context_length=300,
        max_concurrent=1,
        batching=BatchingKind.SERIAL,
        capabilities=frozenset({Capability.EMBEDDINGS, Capability.IMAGES}),
    )


def test_without_text_generation_no_generation_feature_is_claimed() -> None:
    got = model_capabilities(_Loaded(), loaded=True)  # type: ignore[arg-type]
    assert got.embeddings is True and got.context_length == 300
    assert got.vision is False and got.reasoning is False and got.chat is False
