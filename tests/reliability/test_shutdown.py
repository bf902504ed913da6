"""SIGTERM on a real ``gateway serve`` process: stop accepting, drain, end what is left with an
error, exit 0 promptly.

Timeline of each test: requests are started, SIGTERM is sent, the server has
``[server] drain_timeout_s`` to finish them; streams still running then end with exactly one
error event (never a silent cut), requests not yet answered get a 503.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.server import _Server
from gateway.services import build_services
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config
from tests.reliability.helpers import (
    NO_EOS,
    StreamResult,
    chat,
    gateway_process,
    needs_llamacpp,
    real_model_table,
    stream_request,
)

DRAIN_S = 2.0
WORDS = " ".join(f"w{i}" for i in range(400))


def scripted_models() -> dict[str, Any]:
    return {
        # 400 tokens at 20 ms: 8 s, far past the drain deadline
        "long": {
            "backend": "scripted",
            "reply": WORDS,
            "token_delay_s": 0.02,
            "batching": {"max_concurrent": 2, "max_queue": 4},
        },
        # 15 tokens at 50 ms: ends well within the drain window
        "short": {
            "backend": "scripted",
            "reply": "a b c d e f g h i j k l m n o",
            "token_delay_s": 0.05,
        },
    }


async def _ready_or_gone(client: httpx.AsyncClient) -> int | None:
    """/ready's status on an open connection, or None if the server already closed it."""
    try:
        return (await client.get("/ready")).status_code
    except httpx.TransportError:
        return None


async def _until_long(client: httpx.AsyncClient, *, active: int, queued: int) -> None:
    """Wait until model "long" runs ``active`` requests with ``queued`` waiting (requests sent
    at once reach admission in any order: the test orders them by watching /admin/models)."""
    for _ in range(500):
        models = (await client.get("/admin/models")).json()["data"]
        long = next(m for m in models if m["id"] == "long")
        if (long["active_sequences"], long["queued"]) == (active, queued):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"model long never had {active} active and {queued} queued: {long}")


def _assert_ended_by_shutdown(result: StreamResult) -> None:
    """Exactly one error event, last, saying why; no [DONE]; the stream ended cleanly."""
    assert result.status == 200
    assert not result.cut, "the stream was cut without its terminator"
    assert "[DONE]" not in result.events
    assert len(result.errors) == 1, result.events[-3:]
    assert result.events[-1].startswith('{"error"')
    err = result.errors[0]["error"]
    assert err["code"] == "model_unavailable"
    assert "shut" in err["message"]


def _assert_503_json(r: httpx.Response | StreamResult) -> None:
    assert r.status == 503 if isinstance(r, StreamResult) else r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "model_unavailable", body
    assert "retry-after" in r.headers


async def test_sigterm_drains_then_ends_the_rest_with_an_error(tmp_path: Path) -> None:
    config = {"server": {"drain_timeout_s": DRAIN_S}, "models": scripted_models()}
    with gateway_process(tmp_path, "gateway", config) as gw:
        gw.wait_ready()
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        async with (
            httpx.AsyncClient(base_url=gw.base_url, timeout=30, limits=limits) as client,
            httpx.AsyncClient(base_url=gw.base_url, timeout=5) as probe,
        ):
            assert await _ready_or_gone(probe) == 200  # a warm keep-alive connection
            first: dict[str, asyncio.Event] = {k: asyncio.Event() for k in ("long", "short")}

            def mark(name: str) -> Any:
                def seen(event: str) -> bool:
                    if '"content":"' in event and '"content":""' not in event:
                        first[name].set()
                    return False

                return seen

            long_stream = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", chat("long"), on_event=mark("long"))
            )
            short_stream = asyncio.create_task(
                stream_request(
                    client, "/v1/chat/completions", chat("short"), on_event=mark("short")
                )
            )
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first.values())), 10)
            # a non-streaming request running through the deadline ...
            long_json = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat("long", stream=False))
            )
            await _until_long(probe, active=2, queued=0)
            # ... and a stream waiting in the queue behind the two running "long" requests
            queued = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", chat("long"))
            )
            await _until_long(probe, active=2, queued=1)

            gw.terminate()
            signalled = time.monotonic()
            assert await _ready_or_gone(probe) in (503, None)

            await asyncio.sleep(0.5)  # the listening socket is closed by now
            try:
                async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as fresh:
                    late = await fresh.post(
                        "/v1/chat/completions", json=chat("short", stream=False)
                    )
                _assert_503_json(late)
            except httpx.ConnectError:
                pass  # refused: as good as a 503

            short = await asyncio.wait_for(short_stream, 10)
            assert short.done and not short.errors, short.events[-2:]
            assert short.text() == "a b c d e f g h i j k l m n o"

            long = await asyncio.wait_for(long_stream, DRAIN_S + 5)
            ended = time.monotonic() - signalled
            _assert_ended_by_shutdown(long)
            assert DRAIN_S - 0.3 < ended < DRAIN_S + 1.5, ended
            assert 0 < len(long.text().split()) < 400

            _assert_503_json(await asyncio.wait_for(long_json, 5))
            _assert_503_json(await asyncio.wait_for(queued, 5))
        assert gw.wait(timeout=5) == 0, gw.log()
    log = gw.log()
    assert "Traceback" not in log, log


async def test_the_signal_handler_turns_ready_503_at_once() -> None:
    """What SIGTERM's handler does, without a process: /ready and new requests are 503 from
    the moment it runs (the subprocess tests may only see the listener closed)."""
    config = scripted_config({"m": {}}, server={"drain_timeout_s": 5})
    services = build_services(config)
    await services.pool.start()
    app = create_app(config, services)
    server = _Server(uvicorn.Config(app), services.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.get("/ready")).status_code == 200
        server.handle_exit(signal.SIGTERM, None)
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = await client.post("/v1/chat/completions", json=chat("m", stream=False))
        _assert_503_json(late)
    assert server.should_exit and not server.force_exit
    await services.pool.aclose()


def test_sigterm_with_nothing_running_exits_at_once(tmp_path: Path) -> None:
    config = {"server": {"drain_timeout_s": 30}, "models": scripted_models()}
    with gateway_process(tmp_path, "gateway", config) as gw:
        gw.wait_ready()
        assert httpx.post(
            gw.base_url + "/v1/chat/completions", json=chat("short", stream=False)
        ).is_success
        started = time.monotonic()
        gw.terminate()
        assert gw.wait(timeout=10) == 0, gw.log()
        assert time.monotonic() - started < 3  # no waiting for a drain with nothing to drain


@needs_llamacpp
@pytest.mark.slow
async def test_sigterm_real_model(tmp_path: Path) -> None:
    """The default model: one stream finishes in the drain window, one is ended with an error,
    the engine thread is stopped and the process exits 0 promptly."""
    config = {
        "server": {"drain_timeout_s": DRAIN_S},
        "models": {"smol": real_model_table()},
    }
    with gateway_process(tmp_path, "gateway", config) as gw:
        gw.wait_ready()
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=60) as client:
            started = {k: asyncio.Event() for k in ("short", "long")}

            def mark(name: str) -> Any:
                def seen(event: str) -> bool:
                    if '"content":"' in event and '"content":""' not in event:
                        started[name].set()
                    return False

                return seen

            short_body = chat("smol", max_tokens=12, temperature=0)
            long_body = chat("smol", "Count to 1000.", max_tokens=900, **NO_EOS)
            short_stream = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", short_body, on_event=mark("short"))
            )
            long_stream = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", long_body, on_event=mark("long"))
            )
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 30)
            gw.terminate()
            signalled = time.monotonic()
            short = await asyncio.wait_for(short_stream, 30)
            assert short.done and not short.errors
            long = await asyncio.wait_for(long_stream, DRAIN_S + 10)
            _assert_ended_by_shutdown(long)
            assert time.monotonic() - signalled < DRAIN_S + 1.5
        assert gw.wait(timeout=10) == 0, gw.log()
        assert time.monotonic() - signalled < DRAIN_S + 5


async def test_a_stream_starting_after_the_deadline_is_not_a_500() -> None:
    """A stream accepted before the drain but reaching its headers after the deadline (it
    waited for its first token) is answered 503 or one error event, never a 500 or a cut."""
    config = scripted_config(
        {
            "fast": {"reply": WORDS, "token_delay_s": 0.01},
            "slow_start": {"prefill_delay_s": 2.0},
        },
        server={"drain_timeout_s": 0, "keepalive_s": 0.3},
    )
    with ServerThread(config) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            running = asyncio.Event()

            def seen(event: str) -> bool:
                running.set()
                return False

            a = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", chat("fast"), on_event=seen)
            )
            await asyncio.wait_for(running.wait(), 5)
            b = asyncio.create_task(
                stream_request(client, "/v1/chat/completions", chat("slow_start"))
            )
            await asyncio.sleep(0.1)  # b waits for its first token (up to keepalive_s)
            server.services.pool.drain.start()
            _assert_ended_by_shutdown(await asyncio.wait_for(a, 5))
            late = await asyncio.wait_for(b, 5)
            if late.status == 503:
                _assert_503_json(late)
            else:
                _assert_ended_by_shutdown(late)
