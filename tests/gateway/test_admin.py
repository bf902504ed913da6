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
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


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
