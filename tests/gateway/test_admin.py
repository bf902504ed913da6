"""``/admin/``: the guard (loopback, or an admin API key), load/unload by hand, config reload."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import load_config, parse_config
from gateway.pool import ModelState
from gateway.services import Services, build_services

pytestmark = pytest.mark.timeout(20)

CONFIG = """
[server]
port = 8123

[lifecycle]
max_loaded_models = 2
drain_timeout_s = 0.2

[models.a]
backend = "scripted"
reply = "from a"

[models.b]
backend = "scripted"
load = "on_demand"
token_delay_s = 0.05
"""


def client_for(services: Services, host: str = "127.0.0.1") -> httpx.AsyncClient:
    app = create_app(services.config, services)
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost:8123")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
async def services(config_file: Path) -> AsyncIterator[Services]:
    services = build_services(load_config(config_file))
    await services.pool.start()
    yield services
    await services.pool.aclose()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(services) as c:
        yield c


def write(path: Path, text: str) -> None:
    path.write_text(text)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def test_only_loopback_clients_without_an_auth_plugin(services: Services) -> None:
    async with client_for(services, host="10.1.2.3") as remote:
        r = await remote.get("/admin/models")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "admin_loopback_only"
        r = await remote.post("/admin/models/b/load")
        assert r.status_code == 403 and services.pool.resolve("b").state is ModelState.UNLOADED
    for host in ("127.0.0.1", "::1"):
        async with client_for(services, host=host) as local:
            assert (await local.get("/admin/models")).status_code == 200


async def test_with_api_keys_only_an_admin_key_passes() -> None:
    keys = [
        {"name": "ops", "sha256": sha("ops-secret"), "admin": True},
        {"name": "user", "sha256": sha("user-secret")},
    ]
    cfg = parse_config(
        {"models": {"m": {"backend": "scripted"}}, "plugins": {"api_keys": {"keys": keys}}},
        "<test>",
    )
    services = build_services(cfg)
    async with client_for(services, host="10.1.2.3") as remote:
        r = await remote.get("/admin/models")
        assert r.status_code == 401
        r = await remote.get("/admin/models", headers={"Authorization": "Bearer user-secret"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
        r = await remote.get("/admin/models", headers={"Authorization": "Bearer ops-secret"})
        assert r.status_code == 200  # from anywhere, with the admin key
    async with client_for(services) as local:
        r = await local.get("/admin/models", headers={"Authorization": "Bearer user-secret"})
        assert r.status_code == 403  # keys configured: loopback alone is not enough
    await services.pool.aclose()


async def test_models_lists_state_leases_and_budget(client: httpx.AsyncClient) -> None:
    body = (await client.get("/admin/models")).json()
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["a"]["state"] == "loaded" and by_id["a"]["loads"] == 1
    assert by_id["b"]["state"] == "unloaded" and by_id["b"]["load"] == "on_demand"
    assert by_id["a"]["leases"] == 0 and by_id["a"]["footprint"] is None  # no memory budget
    assert body["budget"]["max_loaded_models"] == 2
    assert body["budget"]["resident_models"] == 1


async def test_load_and_unload_by_hand(client: httpx.AsyncClient, services: Services) -> None:
    r = await client.post("/admin/models/b/load")
    assert r.status_code == 200 and r.json()["state"] == "loaded"
    r = await client.post("/admin/models/b/unload")
    assert r.status_code == 200 and r.json()["state"] == "unloaded"
    assert services.pool.resolve("b").loads == 1
    r = await client.post("/admin/models/nope/load")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_unload_of_a_busy_model_is_409_and_cuts_nothing(
    client: httpx.AsyncClient, services: Services
) -> None:
    entry = services.pool.resolve("a")
    await entry.acquire()  # a request running past the drain timeout (0.2 s)
    r = await client.post("/admin/models/a/unload")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_busy"
    assert entry.state is ModelState.LOADED
    entry.release()
    assert (await client.post("/admin/models/a/unload")).status_code == 200


async def test_reload_applies_models_and_reports_what_needs_a_restart(
    client: httpx.AsyncClient, services: Services, config_file: Path
) -> None:
    new = CONFIG.replace("port = 8123", "port = 9000").replace('reply = "from a"', 'reply = "A"')
    write(config_file, new + '\n[models.c]\nbackend = "scripted"\nload = "on_demand"\n')
    r = await client.post("/admin/reload")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["added"], body["changed"], body["removed"]) == (["c"], ["a"], [])
    assert body["restart_required"] == ["server.port"]
    pool = services.pool
    for _ in range(200):  # a was loaded: it loads again with its new table
        if pool.resolve("a").state is ModelState.LOADED:
            break
        await asyncio.sleep(0.01)
    chat: dict[str, Any] = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.json()["choices"][0]["message"]["content"] == "A"
    ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert ids == ["a", "b", "c"]


async def test_a_bad_config_changes_nothing(
    client: httpx.AsyncClient, services: Services, config_file: Path
) -> None:
    before = dict(services.pool.entries)
    write(config_file, CONFIG.replace('backend = "scripted"\nload', 'backend = "nope"\nload'))
    r = await client.post("/admin/reload")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_config" and "models.b.backend" in error["message"]
    write(config_file, "this is not toml [")
    assert (await client.post("/admin/reload")).status_code == 400
    assert services.pool.entries == before
    assert services.pool.resolve("a").state is ModelState.LOADED


async def test_reload_needs_a_config_file() -> None:
    services = build_services(parse_config({"models": {"m": {"backend": "scripted"}}}, "<test>"))
    async with client_for(services) as client:
        r = await client.post("/admin/reload")
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_config_file"
    await services.pool.aclose()


CROSS_SITE: list[tuple[str, dict[str, str]]] = [
    # a form or fetch() from a page on another site: the browser names the page's origin
    ("origin", {"Origin": "https://evil.example", "Content-Type": "text/plain"}),
    ("null origin", {"Origin": "null", "Content-Type": "text/plain"}),
    ("another port", {"Origin": "http://localhost:3000"}),
    ("fetch metadata", {"Sec-Fetch-Site": "cross-site"}),
    # DNS rebinding: the page's own name, resolved to 127.0.0.1
    ("rebound host", {"Host": "evil.example:8123"}),
    # a proxy on this host forwarding for a remote client
    ("forwarded", {"X-Forwarded-For": "203.0.113.7"}),
    ("forwarded as local", {"X-Forwarded-For": "127.0.0.1"}),
    ("forwarded header", {"Forwarded": "for=203.0.113.7"}),
]


@pytest.mark.parametrize(("case", "headers"), CROSS_SITE, ids=[c for c, _ in CROSS_SITE])
async def test_loopback_admin_refuses_what_a_web_page_or_a_proxy_sends(
    client: httpx.AsyncClient, services: Services, case: str, headers: dict[str, str]
) -> None:
    """Issue 23 finding 7: without API keys, /admin trusted any loopback peer: a cross-site
    text/plain POST from any web page (or a DNS-rebound one) unloaded the model, and a proxy
    on this host made every client local. Such requests are refused; the model stays."""
    r = await client.post("/admin/models/a/unload", headers=headers, content=b"x")
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "admin_local_only"
    assert services.pool.resolve("a").state is ModelState.LOADED
    r = await client.get("/admin/models", headers=headers)
    assert r.status_code == 403


SAME_HOST: list[dict[str, str]] = [
    {},
    {"Origin": "http://localhost:8123"},
    {"Host": "127.0.0.1:8123", "Origin": "http://127.0.0.1:8123"},
    {"Host": "[::1]:8123"},
    {"Host": "localhost"},
    {"Sec-Fetch-Site": "same-origin"},
]


@pytest.mark.parametrize("headers", SAME_HOST)
async def test_loopback_admin_serves_programs_and_pages_of_this_host(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """Issue 23 finding 7: what a program on this host (curl, the CLI) or the gateway's own
    page sends still passes."""
    r = await client.get("/admin/models", headers=headers)
    assert r.status_code == 200, r.text


async def test_the_configured_host_is_this_host(config_file: Path) -> None:
    """Issue 23 finding 7: ``[server].host`` set to a name is a Host this server answers to."""
    write(config_file, CONFIG.replace("port = 8123", 'port = 8123\nhost = "gw.internal"'))
    services = build_services(load_config(config_file))
    async with client_for(services) as c:
        assert (await c.get("/admin/models", headers={"Host": "gw.internal:8123"})).is_success
        assert (await c.get("/admin/models", headers={"Host": "other:8123"})).status_code == 403
    await services.pool.aclose()


@pytest.mark.timeout(30)
def test_x_forwarded_for_is_read_only_from_trusted_proxies(tmp_path: Path) -> None:
    """Issue 23 finding 7: uvicorn's default trusts X-Forwarded-For from 127.0.0.1, so whoever
    reached the port from this host (a proxy for anyone) chose the client address the
    gateway logs and /admin judges; it is read only from ``[server].trusted_proxies``."""
    import json

    from gateway.testing import ServerThread

    def clients(trusted: list[str]) -> list[str]:
        log = tmp_path / f"access-{len(trusted)}.jsonl"
        raw = {
            "server": {"trusted_proxies": trusted},
            "models": {"m": {"backend": "scripted"}},
            "plugins": {"access_log": {"path": str(log)}},
        }
        with ServerThread(parse_config(raw, "<test>")) as server:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            forwarded = {"X-Forwarded-For": "203.0.113.7"}
            url = server.base_url + "/v1/chat/completions"
            assert httpx.post(url, json=body, headers=forwarded).status_code == 200
            admin = httpx.get(server.base_url + "/admin/models", headers=forwarded)
            assert admin.status_code == 403
        return [json.loads(line)["client"] for line in log.read_text().splitlines()]

    assert clients([]) == ["127.0.0.1"]
    assert clients(["127.0.0.1"]) == ["203.0.113.7"]
