"""A wire API is one module and one registry line: a test-only endpoint, added to
:data:`gateway.endpoints.REGISTRY` and nothing else (no edit to the app or the flow), gets the
shared flow (plugins, model lookup, admission, streaming), its own routes and its own error
shape on every path under it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway import endpoints
from gateway.errors import ErrorDialect, GatewayError, InvalidRequest
from gateway.flow.contract import Result, Stateless
from gateway.services import Services
from gateway.sse import frame
from gateway.testing import ServerThread
from gateway.types import ClientRequest, Delta, Endpoint, GenerationRequest, TextDelta, Usage
from tests.gateway.helpers import scripted_config

pytestmark = pytest.mark.timeout(30)


class ProblemErrors:
    """A made-up error shape: ``{"problem": message, "status": status}``, always 422."""

    def render(self, error: GatewayError) -> tuple[int, object]:
        return 422, {"problem": error.message, "status": error.status}


class ShoutEncoder:
    def start(self) -> list[bytes]:
        return []

    def delta(self, index: int, delta: Delta) -> list[bytes]:
        return (
            [frame(json.dumps({"loud": delta.text.upper()}))]
            if isinstance(delta, TextDelta)
            else []
        )

    async def end(self, usage: Usage) -> list[bytes]:
        return [frame(json.dumps({"done": usage.completion_tokens}))]

    def error(self, error: GatewayError) -> bytes:
        return frame(json.dumps({"problem": error.message}))


@dataclass(frozen=True)
class ShoutEndpoint(Stateless):
    """``POST /v1/shout {"model", "say", "stream"}``: the model's answer, upper-cased."""

    name: Endpoint = "shout"
    path: str = "/v1/shout"
    id_prefix: str = "shout-"

    @property
    def errors(self) -> ErrorDialect:
        return ProblemErrors()

    def routes(self, services: Services) -> Sequence[BaseRoute]:
        async def volume(request: Request) -> Response:
            if request.query_params.get("level") != "max":
                raise InvalidRequest("only max volume")
            return JSONResponse({"volume": "max"})

        return [Route(f"{self.path}/volume", volume)]

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("say"), str):
            raise InvalidRequest("'say' is required")
        generation = GenerationRequest(request_id, prompt=data["say"], max_tokens=16)
        return ClientRequest(
            "shout", str(data.get("model")), (generation,), stream=data.get("stream") is True
        )

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> ShoutEncoder:
        return ShoutEncoder()

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        text = "".join(result.choice(0).text)
        return json.dumps({"id": response_id, "shout": text.upper()}).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(endpoints, "REGISTRY", [*endpoints.REGISTRY, ShoutEndpoint.of])
        config = scripted_config({"m": {"reply": "hello world"}}, plugins={"metrics": {}})
        with ServerThread(config) as srv:
            yield srv


def post(server: ServerThread, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=10)


def _requests_seen(server: ServerThread) -> float:
    lines = httpx.get(server.base_url + "/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("gateway_requests_total{") and 'model="m"' in line
    )


def test_the_new_endpoint_runs_on_the_shared_flow(server: ServerThread) -> None:
    before = _requests_seen(server)
    r = post(server, "/v1/shout", {"model": "m", "say": "hi"})
    assert r.status_code == 200 and r.json()["shout"] == "HELLO WORLD"
    assert r.json()["id"].startswith("shout-") and r.headers["x-request-id"] == r.json()["id"]
    streamed = post(server, "/v1/shout", {"model": "m", "say": "hi", "stream": True})
    assert '{"loud": "HELLO"}' in streamed.text and '{"done": 2}' in streamed.text
    assert _requests_seen(server) == before + 2  # the plugins saw them like any request


def test_its_errors_have_its_shape_on_every_path(server: ServerThread) -> None:
    unknown = post(server, "/v1/shout", {"model": "nope", "say": "hi"})
    assert unknown.status_code == 422 and unknown.json() == {
        "problem": unknown.json()["problem"], "status": 404,
    }  # fmt: skip
    assert post(server, "/v1/shout", {"model": "m"}).json()["status"] == 400
    assert httpx.get(server.base_url + "/v1/shout").json()["status"] == 405
    assert httpx.get(server.base_url + "/v1/shout/volume").json()["status"] == 400
    ok = httpx.get(server.base_url + "/v1/shout/volume?level=max")
    assert ok.json() == {"volume": "max"}
    assert httpx.get(server.base_url + "/v1/shout/none").json()["status"] == 404
    other = post(server, "/v1/chat/completions", {"model": "nope", "messages": []})
    assert "error" in other.json()  # OpenAI's endpoints keep OpenAI's shape
