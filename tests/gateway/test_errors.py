"""Every route's errors: a GatewayError anywhere is its OpenAI body; a bug is a 500 that names
the request id, is logged once with its traceback, and shows nothing of the exception."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.app import create_app
from gateway.config import PluginConfig
from gateway.errors import ModelUnavailable, PermissionDenied, RateLimited
from gateway.plugins import Plugin, PluginChain
from gateway.services import Services, build_services
from tests.gateway.helpers import CHAT, scripted_config


class Raising(Plugin):
    """A plugin with routes that raise each kind of error, and a hook that can fail."""

    def __init__(self) -> None:
        self.fail_on_request = False

    def routes(self) -> Sequence[BaseRoute]:
        async def forbidden(request: Request) -> Response:
            raise PermissionDenied("not you", code="nope")

        async def limited(request: Request) -> Response:
            raise RateLimited("slow down", retry_after_s=2.5)

        async def unavailable(request: Request) -> Response:
            raise ModelUnavailable("resting")

        async def bug(request: Request) -> Response:
            raise KeyError("/srv/secret")

        async def fine(request: Request) -> Response:
            return JSONResponse({"ok": True})

        return [
            Route("/x/forbidden", forbidden),
            Route("/x/limited", limited),
            Route("/x/unavailable", unavailable),
            Route("/x/bug", bug),
            Route("/x/fine", fine),
        ]

    async def on_request(self, ctx: object, request: object) -> None:
        if self.fail_on_request:
            raise RuntimeError("/etc/shadow is not readable")


@pytest.fixture
async def setup() -> AsyncIterator[tuple[httpx.AsyncClient, Raising]]:
    config = scripted_config()
    base = build_services(config)
    plugin = Raising()
    chain = PluginChain([plugin], configs={"x": PluginConfig()})
    services = Services(base.config, base.pool, chain, base.store)
    await services.pool.start()
    app = create_app(config, services)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client, plugin
    await services.pool.aclose()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/x/forbidden", 403, "nope"),
        ("/x/limited", 429, "rate_limit_exceeded"),
        ("/x/unavailable", 503, "model_unavailable"),
    ],
)
async def test_a_gateway_error_in_a_plugin_route_is_its_openai_body(
    setup: tuple[httpx.AsyncClient, Raising], path: str, status: int, code: str
) -> None:
    client, _ = setup
    r = await client.get(path)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


async def test_a_bug_in_a_route_is_a_500_that_leaks_nothing(
    setup: tuple[httpx.AsyncClient, Raising], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = setup
    with caplog.at_level(logging.ERROR):
        r = await client.get("/x/bug")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert "secret" not in r.text and "KeyError" not in r.text
    request_id = r.headers["x-request-id"]
    assert request_id in error["message"]
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and request_id in logged[0].getMessage()
    assert "/srv/secret" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert (await client.get("/x/fine")).json() == {"ok": True}


async def test_a_bug_in_a_plugin_hook_is_a_500_naming_the_completion_id(
    setup: tuple[httpx.AsyncClient, Raising], caplog: pytest.LogCaptureFixture
) -> None:
    client, plugin = setup
    plugin.fail_on_request = True
    with caplog.at_level(logging.ERROR):
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    assert "shadow" not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    assert r.headers["x-request-id"] in r.json()["error"]["message"]
    assert len([rec for rec in caplog.records if rec.exc_info]) == 1
    plugin.fail_on_request = False
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_admin_errors_are_openai_bodies(setup: tuple[httpx.AsyncClient, Raising]) -> None:
    client, _ = setup
    r = await client.post("/admin/models/nope/load")
    assert r.status_code in (403, 404)  # not loopback over ASGI, or no such model
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
