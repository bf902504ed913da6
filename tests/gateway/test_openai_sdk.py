"""The official openai SDK against the real server over real HTTP (scripted backend)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config
from tests.support import openai_client

REPLY = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "m": {"aliases": ["m-alias"], "reply": REPLY},
            "echo": {"echo": True},
            "capped": {"reply": REPLY, "default_max_tokens": 4},
        }
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, api_key="unused")


def test_models_list_and_get(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"m", "m-alias", "echo", "capped"}
    model = client.models.retrieve("m-alias")
    assert model.id == "m-alias" and model.object == "model" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_chat_non_stream(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi there"}]
    )
    assert r.object == "chat.completion"
    assert r.model == "m"
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.completion_tokens == len(REPLY.split())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_alias_is_echoed(client: OpenAI) -> None:
    r = client.chat.completions.create(model="m-alias", messages=[{"role": "user", "content": "x"}])
    assert r.model == "m-alias"
    chunks = list(
        client.chat.completions.create(
            model="m-alias", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert {c.model for c in chunks} == {"m-alias"}


def test_stream_with_usage_chunk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(REPLY.split())
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage_has_no_usage_chunk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert len(chunks) >= 3  # role, text..., finish
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_gives_length(client: OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    if stream:
        chunks = list(
            client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kwargs)
        text, reason, usage = (
            r.choices[0].message.content or "",
            r.choices[0].finish_reason,
            r.usage,
        )
    assert text == "The quick brown"
    assert reason == "length"
    assert usage is not None and usage.completion_tokens == 3


def test_max_completion_tokens(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2
    )
    assert r.choices[0].message.content == "The quick"
    assert r.choices[0].finish_reason == "length"


def test_default_max_tokens_applies_only_without_a_limit(client: OpenAI) -> None:
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="capped", messages=ask)
    assert r.choices[0].message.content == "The quick brown fox"
    assert r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="capped", messages=ask, max_tokens=6)
    assert r.choices[0].message.content == "The quick brown fox jumps over"
    resp = client.responses.create(model="capped", input="hi")
    assert resp.output_text == "The quick brown fox"
    assert resp.status == "incomplete" and resp.usage is not None
    assert resp.usage.output_tokens == 4


@pytest.mark.parametrize("stop", ["fox", ["lazy", "brown"], ["own f"]])
def test_stop_strings_never_emitted(client: OpenAI, stop: str | list[str]) -> None:
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stop=stop
    )
    text = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop"
    stops = [stop] if isinstance(stop, str) else stop
    assert not any(s in text for s in stops)
    assert REPLY.startswith(text)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stop=stop, stream=True
        )
    )
    assert streamed == text


def test_n_choices_stream_and_not(client: OpenAI, server: ServerThread) -> None:
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], n=3, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == REPLY for c in r.choices)
    assert r.usage is not None
    assert r.usage.completion_tokens == 3 * len(REPLY.split())
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {0: REPLY, 1: REPLY, 2: REPLY}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 * len(REPLY.split())


def test_roles_and_content_parts(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "system", "content": "be nice"},
            {"role": "developer", "content": "really"},
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": "answer"},
            {"role": "tool", "content": "tool output", "tool_call_id": "c1"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "part one "},
                    {"type": "text", "text": "part two"},
                ],
            },
        ],
    )
    assert r.choices[0].message.content == "part one part two"


def test_completions_endpoint(client: OpenAI) -> None:
    r = client.completions.create(model="echo", prompt="alpha beta gamma", max_tokens=2)
    assert r.object == "text_completion"
    assert r.choices[0].text == "alpha beta"
    assert r.choices[0].finish_reason == "length"
    r = client.completions.create(model="echo", prompt="alpha", echo=True)
    assert r.choices[0].text == "alphaalpha"
    r = client.completions.create(model="echo", prompt=["one", "two words"], n=2)
    assert [c.text for c in r.choices] == ["one", "one", "two words", "two words"]
    assert r.usage is not None
    assert r.usage.prompt_tokens == 3  # each distinct prompt counted once
    assert r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="echo", prompt="a b c", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "a b c"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_errors_surface_as_sdk_exceptions(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert br.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], stream=True
        )


def test_health_and_ready(server: ServerThread) -> None:
    import httpx

    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.base_url + "/ready")
    assert r.status_code == 200 and r.json()["models"]["m"] == "loaded"


def test_request_id_header(server: ServerThread) -> None:
    import httpx

    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.headers["x-request-id"] == r.json()["id"]
    assert scripted(server.backend("m")).record.active == 0
