"""Bad input is a 400 (or 404/413/415) OpenAI error naming the field; never a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.services import Services
from tests.gateway.helpers import scripted

MSG = [{"role": "user", "content": "hi"}]

CHAT_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"messages": MSG}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": 7, "messages": MSG}, "model"),
    ({"model": "m", "messages": MSG, "temperature": 2.5}, "temperature"),
    ({"model": "m", "messages": MSG, "temperature": -0.1}, "temperature"),
    ({"model": "m", "messages": MSG, "temperature": "1"}, "temperature"),
    ({"model": "m", "messages": MSG, "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": MSG, "presence_penalty": 2.1}, "presence_penalty"),
    ({"model": "m", "messages": MSG, "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": "m", "messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "m", "messages": MSG, "n": 0}, "n"),
    ({"model": "m", "messages": MSG, "n": 129}, "n"),
    ({"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": MSG, "stop": 3}, "stop"),
    ({"model": "m", "messages": MSG, "stop": "x" * 5000}, "stop"),
    ({"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
    ({"model": "m", "messages": MSG, "seed": "abc"}, "seed"),
    ({"model": "m", "messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "m", "messages": MSG, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": MSG, "base_url": "http://evil"}, "base_url"),
    ({"model": "m", "messages": MSG, "api_base": "http://evil"}, "api_base"),
    ({"model": "m", "messages": MSG, "chat_template": "{{ x }}"}, "chat_template"),
    ({"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"model": "m", "messages": MSG, "logprobs": True}, "logprobs"),
    (
        {"model": "m", "messages": MSG, "response_format": {"type": "json_schema"}},
        "response_format.json_schema",
    ),
    (
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        "messages[0].content[0]",
    ),
    ({"model": "m", "messages": MSG, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
    ({"model": "m", "messages": MSG, "n": 100}, "n"),  # more than the model runs at once
]


@pytest.mark.parametrize(("body", "param"), CHAT_CASES)
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_bad_input_is_400_naming_the_field(
    client: httpx.AsyncClient, services: Services, body: dict[str, Any], param: str, stream: bool
) -> None:
    if stream and "stream" not in body and "stream_options" not in body:
        body = {**body, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]
    backend = scripted(services.pool.resolve("m").backend)
    assert backend.record.started == []
    assert services.pool.resolve("m").admission.active == 0


COMPLETION_CASES: list[tuple[dict[str, Any], str]] = [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "m", "prompt": "x", "echo": 1}, "echo"),
    ({"model": "m", "prompt": ["x"] * 20, "n": 10}, "n"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_CASES)
async def test_completion_bad_input(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "raw",
    [
        b"{bad json",
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"",
        b"\xff\xfe\x00garbage",
        b'{"model": NaN}',
    ],
)
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_deeply_nested_json_is_400(client: httpx.AsyncClient) -> None:
    raw = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 413), r.text


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        content=b"model=m",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


async def test_body_over_the_cap_is_413(client: httpx.AsyncClient) -> None:
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    r = await client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404_before_any_byte(
    client: httpx.AsyncClient, stream: bool
) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"model": "nope", "messages": MSG, "stream": stream}
    )
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


async def test_context_overflow_is_400_context_length_exceeded(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"model": "m", "messages": MSG, "max_tokens": 10_000}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": MSG, "some_vendor_field": {"x": 1}, "store": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
