"""Model lifecycle with the scripted backend: shared loads, eviction within a budget, draining,
no ping-pong, idle unload, /ready and /v1/models states."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.errors import ModelUnavailable
from gateway.pool import ModelEntry, ModelPool, ModelState
from gateway.services import Services, build_services
from gateway.testing import ServerThread
from tests.gateway.helpers import CHAT, scripted, scripted_config, sse_json

pytestmark = pytest.mark.timeout(20)


def config(
    models: dict[str, dict[str, Any]], lifecycle: dict[str, Any] | None = None
) -> GatewayConfig:
    raw = {
        "models": {n: {"backend": "scripted", "load": "on_demand", **t} for n, t in models.items()},
        "lifecycle": lifecycle or {},
    }
    return parse_config(raw, "<test>")


@pytest.fixture
async def pools() -> AsyncIterator[list[ModelPool]]:
    """Pools made by a test are closed after it."""
    made: list[ModelPool] = []
    yield made
    for pool in made:
        await pool.aclose()


def make_pool(pools: list[ModelPool], cfg: GatewayConfig) -> ModelPool:
    pool = ModelPool(cfg)
    pools.append(pool)
    return pool


async def use(entry: ModelEntry, hold_s: float = 0.0) -> None:
    """One request: a lease, held for ``hold_s``."""
    await entry.acquire()
    try:
        await asyncio.sleep(hold_s)
    finally:
        entry.release()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (at most 5 s) for a state change the test expects (state has no event to await)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the expected state was not reached in 5 s")


def states(pool: ModelPool) -> dict[str, str]:
    return {name: e.state.value for name, e in pool.entries.items()}


# -- loading ------------------------------------------------------------------------------------


async def test_concurrent_requests_share_one_load(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"load_delay_s": 0.1}}))
    entry = pool.resolve("m")
    backends = await asyncio.gather(*(entry.acquire() for _ in range(8)))
    assert entry.loads == 1 and len({id(b) for b in backends}) == 1
    assert entry.leases == 8 and entry.state is ModelState.LOADED
    for _ in backends:
        entry.release()
    assert entry.leases == 0


async def test_failed_load_answers_every_waiter_and_is_retried(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"load_delay_s": 0.05, "fail_on_start": True}}))
    entry = pool.resolve("m")
    results = await asyncio.gather(*(entry.acquire() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) for r in results)
    # issue 23 finding 11: the load error's text (paths, URLs) is the log's and /admin's
    assert all("failed to load" in str(r) and "told to fail" not in str(r) for r in results)
    assert entry.error is not None and "told to fail on start" in entry.error
    assert entry.state is ModelState.FAILED and entry.leases == 0
    started = time.monotonic()
    with pytest.raises(ModelUnavailable):  # the next request tries again (a new load)
        await entry.acquire()
    assert time.monotonic() - started >= 0.05


async def test_a_cancelled_waiter_gives_its_lease_back(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"load_delay_s": 0.2}}))
    entry = pool.resolve("m")
    waiter = asyncio.ensure_future(entry.acquire())
    await until(lambda: entry.state is ModelState.LOADING)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert entry.leases == 0
    await entry.settled()  # the load itself goes on for the next request
    assert entry.state is ModelState.LOADED


# -- eviction -----------------------------------------------------------------------------------


async def test_max_loaded_models_evicts_the_least_recently_used(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"a": {}, "b": {}, "c": {}}, {"max_loaded_models": 2}))
    a, b, c = (pool.resolve(n) for n in "abc")
    await use(a)
    await use(b)
    old_a = scripted(a.backend)
    await use(c)
    assert states(pool) == {"a": "unloaded", "b": "loaded", "c": "loaded"}
    assert not old_a.started  # aclose ran: its memory is freed
    await use(b)  # b is now more recent than c
    await use(a)
    assert states(pool) == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    assert (a.loads, b.loads, c.loads) == (2, 1, 1)


async def test_an_idle_model_is_evicted_before_a_busy_one(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"a": {}, "b": {}, "c": {}}, {"max_loaded_models": 2}))
    a, b, c = (pool.resolve(n) for n in "abc")
    await a.acquire()  # a: least recently used, but busy
    await use(b)
    await use(c)
    assert states(pool) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    a.release()


async def test_eviction_waits_for_running_requests_and_new_ones_queue_behind_it(
    pools: list[ModelPool],
) -> None:
    pool = make_pool(pools, config({"a": {}, "b": {}}, {"max_loaded_models": 1}))
    a, b = pool.resolve("a"), pool.resolve("b")
    await a.acquire()  # a request running on a
    want_b = asyncio.ensure_future(use(b))
    await until(lambda: a.state is ModelState.DRAINING)
    want_a = asyncio.ensure_future(a.acquire())  # arrives while a drains: waits for the reload
    await asyncio.sleep(0.05)
    assert not want_b.done() and not want_a.done()
    assert a.leases == 1 and b.state is ModelState.LOADING
    a.release()  # the running request ends: a unloads, b loads, then a loads again
    await want_b
    assert await want_a is a.backend
    assert states(pool) == {"a": "loaded", "b": "unloaded"}
    assert (a.loads, b.loads) == (2, 1)
    a.release()


async def test_drain_timeout_gives_the_eviction_up_and_never_cuts_a_request(
    pools: list[ModelPool],
) -> None:
    pool = make_pool(
        pools, config({"a": {}, "b": {}}, {"max_loaded_models": 1, "drain_timeout_s": 0.1})
    )
    a, b = pool.resolve("a"), pool.resolve("b")
    backend = await a.acquire()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=r"still runs 1 request\(s\)") as err:
        await b.acquire()
    assert time.monotonic() - started >= 0.1
    assert err.value.headers["Retry-After"] == "1"
    assert a.state is ModelState.LOADED and a.backend is backend and scripted(backend).started
    assert b.state is ModelState.UNLOADED and b.leases == 0
    await use(a)  # a still serves
    a.release()
    await use(b)  # room now
    assert states(pool) == {"a": "unloaded", "b": "loaded"}


async def test_two_models_alternate_in_batches_not_request_by_request(
    pools: list[ModelPool],
) -> None:
    pool = make_pool(
        pools,
        config(
            {"a": {"load_delay_s": 0.02}, "b": {"load_delay_s": 0.02}}, {"max_loaded_models": 1}
        ),
    )
    a, b = pool.resolve("a"), pool.resolve("b")
    await a.acquire()
    order: list[str] = []

    async def request(entry: ModelEntry) -> None:
        await entry.acquire()
        order.append(entry.name)
        await asyncio.sleep(0.01)
        entry.release()

    tasks = []
    for _ in range(4):  # interleaved arrivals: b, a, b, a, ...
        tasks.append(asyncio.ensure_future(request(b)))
        await asyncio.sleep(0.005)
        tasks.append(asyncio.ensure_future(request(a)))
        await asyncio.sleep(0.005)
    a.release()
    await asyncio.gather(*tasks)
    assert order == ["b"] * 4 + ["a"] * 4
    assert (a.loads, b.loads) == (2, 1)


async def test_gpu_budget_evicts_and_refuses_a_model_that_never_fits(
    pools: list[ModelPool],
) -> None:
    models = {
        "a": {"weights_bytes": 500, "kv_cache_bytes": 100},
        "b": {"weights_bytes": 300, "compute_bytes": 100},
        "c": {"weights_bytes": 300},
        "huge": {"weights_bytes": 2000},
    }
    pool = make_pool(pools, config(models, {"gpu_memory_bytes": [1000]}))
    await use(pool.resolve("a"))
    await use(pool.resolve("b"))  # 600 + 400 = 1000: fits
    assert states(pool)["a"] == "loaded"
    await use(pool.resolve("c"))  # evicts a (least recently used)
    assert states(pool) == {"a": "unloaded", "b": "loaded", "c": "loaded", "huge": "unloaded"}
    with pytest.raises(ModelUnavailable, match="does not fit") as err:
        await pool.resolve("huge").acquire()
    assert "needs 1.95 KiB on GPU 0; the budget is 1000 B" in str(err.value)
    assert states(pool)["b"] == "loaded"  # nothing was evicted for it
    assert pool.lifecycle.resident == {pool.resolve("b"), pool.resolve("c")}


async def test_host_budget(pools: list[ModelPool]) -> None:
    models = {"a": {"weights_bytes": 700}, "b": {"weights_bytes": 700}}
    pool = make_pool(pools, config(models, {"host_memory_bytes": 1000}))
    await use(pool.resolve("a"))
    await use(pool.resolve("b"))
    assert states(pool) == {"a": "unloaded", "b": "loaded"}
    assert pool.resolve("b").footprint is not None


# -- idle unload --------------------------------------------------------------------------------


async def test_idle_model_unloads_and_reloads_on_the_next_request(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"idle_unload_after_s": 0.1}}))
    entry = pool.resolve("m")
    await use(entry)
    backend = scripted(entry.backend)
    await until(lambda: entry.state is ModelState.UNLOADED)
    assert not backend.started and entry.backend is not backend
    await use(entry)
    assert entry.loads == 2


async def test_use_keeps_an_idle_timer_from_firing(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"idle_unload_after_s": 0.15}}))
    entry = pool.resolve("m")
    for _ in range(8):
        await use(entry, hold_s=0.01)
        await asyncio.sleep(0.04)
    await use(entry, hold_s=0.3)  # longer than the idle time, but busy
    assert entry.state is ModelState.LOADED and entry.loads == 1


# -- reconfiguration ----------------------------------------------------------------------------


async def test_reconfigure_adds_removes_and_reloads_changed_models(pools: list[ModelPool]) -> None:
    models: dict[str, dict[str, Any]] = {"keep": {}, "gone": {}, "edit": {"reply": "old"}}
    pool = make_pool(pools, config(models))
    keep, gone, edit = (pool.resolve(n) for n in ("keep", "gone", "edit"))
    await use(keep)
    await edit.acquire()  # a request in flight on the model being changed
    await gone.acquire()  # ... and on the one being removed
    new: dict[str, dict[str, Any]] = {
        "keep": {"aliases": ["k"]},
        "edit": {"reply": "new"},
        "added": {"load": "startup"},
    }
    report = pool.reconfigure(config(new))
    assert (report.added, report.removed, report.changed, report.updated) == (
        ["added"],
        ["gone"],
        ["edit"],
        ["keep"],
    )
    assert pool.resolve("k") is keep and keep.state is ModelState.LOADED
    assert "gone" not in pool.entries and edit.state is ModelState.DRAINING
    with pytest.raises(ModelUnavailable, match="reconfigured or removed"):
        await edit.acquire()  # a request that resolved the old entry just before
    await until(lambda: pool.resolve("added").state is ModelState.LOADED)
    assert scripted(edit.backend).started  # still serving its request
    edit.release()
    gone.release()
    new_edit = pool.resolve("edit")
    await until(lambda: new_edit.state is ModelState.LOADED)  # it was loaded: loads again
    assert (edit.state, gone.state) == (ModelState.UNLOADED, ModelState.UNLOADED)
    assert scripted(new_edit.backend).config.reply == "new"
    assert pool.lifecycle.resident == {keep, new_edit, pool.resolve("added")}


# -- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture
async def app_services() -> AsyncIterator[Services]:
    models: dict[str, dict[str, Any]] = {
        "a": {"reply": "one two three four five six", "token_delay_s": 0.02},
        "b": {"reply": "bee", "load_delay_s": 0.05},
        "broken": {"fail_on_start": True},
    }
    services = build_services(config(models, {"max_loaded_models": 1}))
    yield services
    await services.pool.aclose()


@pytest.fixture
async def client(app_services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(app_services.config, app_services))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def test_a_failed_load_is_a_503_for_every_waiter(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat("broken")) for _ in range(3))
    )
    for r in responses:
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "model_unavailable"
        assert "failed to load" in r.json()["error"]["message"]


async def test_a_swap_never_cuts_a_stream(
    client: httpx.AsyncClient, app_services: Services
) -> None:
    stream = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("a", True)))
    pool = app_services.pool
    await until(lambda: pool.resolve("a").leases == 1)
    other = await client.post("/v1/chat/completions", json=chat("b"))
    assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"] == "bee"
    events = sse_json((await stream).text)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "one two three four five six"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert states(pool) == {"a": "unloaded", "b": "loaded", "broken": "unloaded"}


async def listed(client: httpx.AsyncClient) -> dict[str, str]:
    return {m["id"]: m["state"] for m in (await client.get("/v1/models")).json()["data"]}


async def test_models_list_shows_each_state(
    client: httpx.AsyncClient, app_services: Services
) -> None:
    assert await listed(client) == {"a": "unloaded", "b": "unloaded", "broken": "unloaded"}
    load = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("b")))
    await until(lambda: app_services.pool.resolve("b").state is ModelState.LOADING)
    assert (await listed(client))["b"] == "loading"
    assert (await load).status_code == 200
    assert (await listed(client))["b"] == "loaded"
    stream = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("a", True)))
    a = app_services.pool.resolve("a")
    await until(lambda: a.state is ModelState.LOADED and a.leases == 1)
    load = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("b")))
    await until(lambda: a.state is ModelState.DRAINING)
    assert await listed(client) == {"a": "draining", "b": "loading", "broken": "unloaded"}
    assert (await stream).status_code == 200 and (await load).status_code == 200
    assert await listed(client) == {"a": "unloaded", "b": "loaded", "broken": "unloaded"}


async def test_ready_stays_ready_while_startup_models_come_and_go() -> None:
    cfg = parse_config(
        {"models": {"m": {"backend": "scripted", "idle_unload_after_s": 0.05}}}, "<test>"
    )
    services = build_services(cfg)
    app = create_app(cfg, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/ready")).status_code == 503  # not started
        await services.pool.start()
        assert (await client.get("/ready")).status_code == 200
        entry = services.pool.resolve("m")
        await until(lambda: entry.state is ModelState.UNLOADED)
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json()["models"] == {"m": "unloaded"}
        services.pool.drain.start()
        assert (await client.get("/ready")).status_code == 503
    await services.pool.aclose()


async def test_loads_queued_at_shutdown_end_with_a_503() -> None:
    pool = ModelPool(config({"a": {"load_delay_s": 0.2}, "b": {}}))
    loading = asyncio.ensure_future(pool.resolve("a").acquire())
    await until(lambda: pool.resolve("a").state is ModelState.LOADING)
    queued = asyncio.ensure_future(pool.resolve("b").acquire())  # behind a's load
    await asyncio.sleep(0.01)
    await pool.aclose()  # waits for a's load, then unloads it; b's load never starts
    await loading
    pool.resolve("a").release()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await queued
    assert states(pool) == {"a": "unloaded", "b": "unloaded"}
    assert pool.lifecycle.resident == set()


async def test_reconfigure_applies_an_idle_timer_change_in_place(pools: list[ModelPool]) -> None:
    pool = make_pool(pools, config({"m": {"idle_unload_after_s": 0.1}}))
    entry = pool.resolve("m")
    await use(entry)
    report = pool.reconfigure(config({"m": {}}))  # no idle unload any more
    assert report.updated == ["m"] and pool.resolve("m") is entry
    await asyncio.sleep(0.25)
    assert entry.state is ModelState.LOADED
    pool.reconfigure(config({"m": {"idle_unload_after_s": 0.05}}))
    await until(lambda: entry.state is ModelState.UNLOADED)
    assert entry.loads == 1


def test_a_dead_engine_is_reported_and_the_next_request_reloads_it() -> None:
    config = scripted_config({"m": {"reply": "fine"}})
    with ServerThread(config) as server:
        entry = server.services.pool.resolve("m")
        old = scripted(entry.backend)
        old.kill_engine("segfault in the kernel")
        assert httpx.get(server.base_url + "/ready").status_code == 503
        models = httpx.get(server.base_url + "/v1/models").json()["data"]
        assert {m["id"]: m["state"] for m in models} == {"m": "failed"}
        r = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "fine"
        assert entry.loads == 2
        assert entry.backend is not old and not old.started
        assert httpx.get(server.base_url + "/ready").status_code == 200
