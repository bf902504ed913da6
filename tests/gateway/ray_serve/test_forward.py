"""The ingress's side of the Ray Serve deployment without Ray: a request carried as
:class:`Forwarded` through the real gateway app (scripted backend) streams back unchanged, a
caller that stops listening is the app's client disconnect (the sequence cancelled), an
oversized body is refused before it is read whole, and the affinity key names a conversation
the same way on every turn (Responses chains by the id each response was routed by)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.app import create_app
from gateway.endpoints import endpoints
from gateway.ray_serve.forward import Forwarded, Message, read, run
from gateway.ray_serve.routing import Affinities
from gateway.services import build_services
from tests.gateway.helpers import scripted, scripted_config

pytestmark = pytest.mark.timeout(30)


def forwarded(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Forwarded:
    raw = json.dumps(body).encode() if body is not None else b""
    return Forwarded(method, path, b"", ((b"content-type", b"application/json"),), raw)


def chat(content: str, *history: str, stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    for i, text in enumerate(history):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return {"model": "m", "messages": messages, "stream": stream}


async def test_a_stream_comes_back_message_by_message() -> None:
    config = scripted_config({"m": {"reply": "one two three"}})
    app = create_app(config)
    async with _lifespan(app):
        messages = [
            m async for m in run(app, forwarded("/v1/chat/completions", chat("hi", stream=True)))
        ]
    start, *bodies = messages
    assert start["type"] == "http.response.start" and start["status"] == 200
    text = b"".join(m.get("body", b"") for m in bodies).decode()
    assert "one" in text and text.rstrip().endswith("data: [DONE]")
    assert bodies[-1].get("more_body", False) is False


async def test_a_caller_that_stops_listening_cancels_the_sequence() -> None:
    config = scripted_config({"m": {"reply": "word " * 200, "token_delay_s": 0.02}})
    app = create_app(config)
    async with _lifespan(app):
        stream = run(app, forwarded("/v1/chat/completions", chat("hi", stream=True)))
        async for message in stream:
            if message["type"] == "http.response.body" and b"word" in message.get("body", b""):
                break
        await stream.aclose()  # what Ray Serve's cancellation does to the replica's call
        backend = scripted(app.state.services.pool.resolve("m").backend)
        for _ in range(100):
            if backend.record.cancelled:
                break
            await asyncio.sleep(0.02)
        assert backend.record.cancelled and backend.record.active == 0


async def test_an_oversized_body_is_refused_without_reading_it_all() -> None:
    sent = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 3
    received = iter(sent)

    async def receive() -> Message:
        return next(received)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    assert await read(scope, receive, limit=1000) is None
    assert next(received, None) is not None  # the third piece was never read


def test_the_affinity_key_names_the_conversation() -> None:
    services = build_services(scripted_config())
    aff = Affinities(endpoints(services))
    first = aff.key(forwarded("/v1/chat/completions", chat("plan my trip")))
    later = aff.key(forwarded("/v1/chat/completions", chat("plan my trip", "ok", "and more")))
    other = aff.key(forwarded("/v1/chat/completions", chat("something else")))
    assert first is not None and first == later and first != other
    assert aff.key(forwarded("/v1/models", method="GET")) is None
    assert aff.key(Forwarded("POST", "/v1/chat/completions", b"", (), b"{not json")) is None


def test_a_responses_chain_follows_the_key_of_its_first_response() -> None:
    services = build_services(scripted_config())
    aff = Affinities(endpoints(services))
    key = aff.key(forwarded("/v1/responses", {"model": "m", "input": "hello"}))
    assert key is not None
    aff.learn(key, {"type": "http.response.start", "headers": [(b"x-request-id", b"resp_1")]})
    turn2 = {"model": "m", "input": "more", "previous_response_id": "resp_1"}
    assert aff.key(forwarded("/v1/responses", turn2)) == key
    aff.learn(key, {"type": "http.response.start", "headers": [(b"x-request-id", b"resp_2")]})
    turn3 = {"model": "m", "input": "again", "previous_response_id": "resp_2"}
    assert aff.key(forwarded("/v1/responses", turn3)) == key
    assert aff.key(forwarded("/v1/responses/resp_2", method="GET")) == key  # resume, retrieve
    unknown = aff.key(forwarded("/v1/responses", {**turn3, "previous_response_id": "resp_x"}))
    assert unknown is not None and unknown != key


class _lifespan:
    """The app's lifespan, as a server runs it (startup models loaded)."""

    def __init__(self, app: Any) -> None:
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        self.app = app
        self.lifespan = LifespanOn(Config(app, lifespan="on"))

    async def __aenter__(self) -> None:
        await self.lifespan.startup()
        await self.app.state.loading

    async def __aexit__(self, *exc: object) -> None:
        await self.lifespan.shutdown()
