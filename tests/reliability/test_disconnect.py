"""Clients that leave at every stage: queued, in prefill (before and after the headers),
mid-decode, reading nothing (slow consumer), and non-streaming. Each time the slot is freed,
the generation stops within a bounded number of steps and the next request is served.

The scripted double shows the core's part exactly; the default model shows the engine's
(its :class:`gateway.backend.EngineStats`: live sequences, KV cells, tokens after cancel).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.backend import EngineStats, HasStats
from gateway.config import parse_config
from gateway.testing import ScriptedBackend, ServerThread
from tests.gateway.helpers import scripted, scripted_config
from tests.reliability.helpers import (
    NO_EOS,
    RawRequest,
    chat,
    needs_llamacpp,
    real_model_table,
    wait_for,
)

WORDS = " ".join(f"w{i}" for i in range(300))
CHAT = "/v1/chat/completions"
#: A content chunk (not the role chunk, whose content is "").
CONTENT = b'"content":"'  # also in the role chunk (content ""): count one more


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            # one slot; prefill 0.5 s (longer than the keep-alive, so headers go out first);
            # 300 tokens x 10 ms
            "d": {
                "reply": WORDS,
                "prefill_delay_s": 0.5,
                "token_delay_s": 0.01,
                "batching": {"max_concurrent": 1, "max_queue": 8},
            },
            # for the storm: quick, four slots, a short queue (8 clients at once: some get a 503)
            "storm": {
                "reply": WORDS,
                "prefill_delay_s": 0.05,
                "token_delay_s": 0.005,
                "batching": {"max_concurrent": 4, "max_queue": 3},
            },
            # a reply far bigger than the socket buffers, as fast as it can go
            "huge": {"reply": "word " * 300_000, "context_length": 1_000_000},
        },
        server={"keepalive_s": 0.2, "send_timeout_s": 1.0},
    )
    with ServerThread(config) as srv:
        yield srv


def _settled(server: ServerThread, model: str) -> ScriptedBackend:
    """Wait until nothing runs or waits on ``model``; check every stream ended exactly once."""
    adm = server.services.pool.resolve(model).admission
    backend = scripted(server.backend(model))
    rec = backend.record
    wait_for(lambda: adm.active == 0 and adm.queued == 0 and rec.active == 0, 10, "idle")
    assert len(rec.started) == len(rec.finished) + len(rec.cancelled) + len(rec.failed)
    return backend


def _next_is_served(server: ServerThread, model: str) -> None:
    started = time.monotonic()
    r = httpx.post(server.base_url + CHAT, json=chat(model, stream=False, max_tokens=3), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - started < 3  # at once: prefill 0.5 s + 3 tokens


def _leave_while_queued(server: ServerThread) -> int:
    adm = server.services.pool.resolve("d").admission
    holder = RawRequest(server.base_url, CHAT, chat("d"))
    holder.read_until(CONTENT, count=2)
    queued = RawRequest(server.base_url, CHAT, chat("d"))
    wait_for(lambda: adm.queued == 1, 5, "queued")
    started = len(scripted(server.backend("d")).record.started)
    queued.close()
    wait_for(lambda: adm.queued == 0, 5, "queue emptied")
    assert len(scripted(server.backend("d")).record.started) == started  # never ran
    holder.read_until(CONTENT, count=12)  # the running stream goes on undisturbed
    holder.close()
    return 0


def _leave_in_prefill_before_headers(server: ServerThread) -> int:
    r = RawRequest(server.base_url, CHAT, chat("d"))
    time.sleep(0.1)  # headers wait for the first token up to keepalive_s (0.2 s)
    assert r.received == b""
    r.close()
    return 0


def _leave_in_prefill_after_headers(server: ServerThread) -> int:
    r = RawRequest(server.base_url, CHAT, chat("d"))
    r.read_until(b'"role":"assistant"')  # headers and the role chunk went out at 0.2 s
    assert r.received.count(CONTENT) == 1
    r.close()  # prefill runs until 0.5 s
    return 0


def _leave_mid_decode(server: ServerThread) -> int:
    r = RawRequest(server.base_url, CHAT, chat("d"))
    r.read_until(CONTENT, count=6)
    r.close()
    return 3


def _leave_non_stream(server: ServerThread) -> int:
    rec = scripted(server.backend("d")).record
    before = rec.tokens_generated
    r = RawRequest(server.base_url, CHAT, chat("d", stream=False))
    wait_for(lambda: rec.tokens_generated >= before + 5, 5, "decoding")
    r.close()
    return 3


STAGES: dict[str, Callable[[ServerThread], int]] = {
    "queued": _leave_while_queued,
    "prefill-before-headers": _leave_in_prefill_before_headers,
    "prefill-after-headers": _leave_in_prefill_after_headers,
    "mid-decode": _leave_mid_decode,
    "non-stream": _leave_non_stream,
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_leaving_frees_the_slot_and_stops_generation(server: ServerThread, stage: str) -> None:
    backend = _settled(server, "d")
    rec = backend.record
    cancelled = len(rec.cancelled)
    tokens_before = rec.tokens_generated
    max_after = STAGES[stage](server)
    left = rec.tokens_generated
    backend = _settled(server, "d")
    # the holder of the "queued" stage is cancelled too; every other stage leaves once
    assert len(rec.cancelled) == cancelled + 1
    assert rec.tokens_generated - left <= max_after, (stage, rec.tokens_generated - left)
    if stage.startswith("prefill"):
        assert rec.tokens_generated == tokens_before
    _next_is_served(server, "d")


def test_slow_consumer_is_cut_off_and_the_next_is_served(server: ServerThread) -> None:
    backend = _settled(server, "huge")
    cancelled = len(backend.record.cancelled)
    r = RawRequest(server.base_url, CHAT, chat("huge"), rcvbuf=4096)
    r.read_until(b"data: ")  # reads one chunk, then stops reading
    wait_for(lambda: len(backend.record.cancelled) == cancelled + 1, 20, "send timeout")
    stalled_at = backend.record.tokens_generated
    time.sleep(0.2)
    assert backend.record.tokens_generated == stalled_at  # stopped, not just paused
    assert stalled_at < 300_000
    r.close()
    _settled(server, "huge")
    _next_is_served(server, "huge")


async def test_random_disconnect_storm(server: ServerThread) -> None:
    """80 clients, 8 at a time, each leaving at a random moment (or staying to the end)."""
    rng = random.Random(7)
    host, port = server.base_url.removeprefix("http://").split(":")
    completed = 0

    async def one(i: int) -> None:
        nonlocal completed
        stream = rng.random() < 0.7
        body = json.dumps(chat("storm", stream=stream, max_tokens=rng.randint(1, 60))).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            if rng.random() < 0.8:
                await asyncio.sleep(rng.uniform(0, 0.4))
            else:
                data = await asyncio.wait_for(reader.read(), 30)
                assert data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.1 503")
                completed += 1
        finally:
            writer.close()

    sem = asyncio.Semaphore(8)

    async def limited(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.wait_for(asyncio.gather(*(limited(i) for i in range(80))), 60)
    backend = await asyncio.to_thread(_settled, server, "storm")
    assert len(backend.record.cancelled) > 10 and completed > 5
    await asyncio.to_thread(_next_is_served, server, "storm")


# --- the default model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> Iterator[ServerThread]:
    table = real_model_table(
        batching={"max_concurrent": 1, "max_queue": 4, "prefill_chunk_tokens": 32},
        kv_cache={"prefix_reuse": False},
    )
    config = parse_config(
        {"server": {"keepalive_s": 0.2}, "models": {"smol": table}}, "<reliability>"
    )
    before = set(threading.enumerate())
    with ServerThread(config) as srv:
        yield srv
    # the server's shutdown stopped and joined its engine thread
    left = set(threading.enumerate()) - before
    assert not [t for t in left if t.name.startswith("llamacpp")]


def _stats(server: ServerThread) -> EngineStats:
    backend = server.backend("smol")
    assert isinstance(backend, HasStats)
    return backend.stats()


def _engine_idle(server: ServerThread) -> EngineStats:
    adm = server.services.pool.resolve("smol").admission

    def idle() -> bool:
        stats = _stats(server)
        # prefix reuse is off: a sequence that ended keeps no KV cells
        return not (stats.active_sequences or stats.kv_cells_used or adm.active or adm.queued)

    wait_for(idle, 10, "engine idle with no KV cells used")
    stats = _stats(server)
    assert stats.queued_sequences == 0
    return stats


def _real_next_is_served(server: ServerThread) -> None:
    r = httpx.post(
        server.base_url + CHAT, json=chat("smol", stream=False, max_tokens=4), timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4
    _engine_idle(server)


LONG_PROMPT = "The history of the river valley, told slowly. " * 80  # ~800 tokens


def _real_leave(server: ServerThread, stage: str) -> None:
    if stage == "mid-decode":
        r = RawRequest(server.base_url, CHAT, chat("smol", max_tokens=500, **NO_EOS))
        r.read_until(b'"content":"', count=4)  # the role chunk has "content":"" too
        r.close()
    elif stage == "non-stream":
        before = _stats(server).tokens_generated
        r = RawRequest(server.base_url, CHAT, chat("smol", stream=False, max_tokens=500, **NO_EOS))
        wait_for(lambda: _stats(server).tokens_generated >= before + 3, 30, "decoding")
        r.close()
    elif stage == "prefill":
        before = _stats(server).prompt_tokens_processed
        r = RawRequest(server.base_url, CHAT, chat("smol", LONG_PROMPT, max_tokens=50))
        wait_for(lambda: _stats(server).prompt_tokens_processed > before, 30, "prefill")
        r.close()
    elif stage == "queued":
        adm = server.services.pool.resolve("smol").admission
        holder = RawRequest(server.base_url, CHAT, chat("smol", max_tokens=500, **NO_EOS))
        holder.read_until(b'"content":"', count=2)
        queued = RawRequest(server.base_url, CHAT, chat("smol", max_tokens=10))
        wait_for(lambda: adm.queued == 1, 10, "queued")
        queued.close()
        wait_for(lambda: adm.queued == 0, 10, "queue emptied")
        assert _stats(server).queued_sequences == 0
        holder.read_until(b'"content":"', count=6)  # still streaming
        holder.close()


@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mid-decode", "non-stream", "prefill", "queued"])
def test_real_model_leaving_frees_slot_and_kv(real: ServerThread, stage: str) -> None:
    before = _engine_idle(real)
    _real_leave(real, stage)
    after = _engine_idle(real)
    assert after.cancelled == before.cancelled + 1
    # at most the step that was running when the client left was wasted
    assert after.tokens_after_cancel - before.tokens_after_cancel <= 32
    if stage == "prefill":
        processed = after.prompt_tokens_processed - before.prompt_tokens_processed
        assert processed < 700, processed  # prefill stopped well before the prompt's end
        assert after.tokens_generated == before.tokens_generated
    steps = after.decode_steps
    time.sleep(0.3)
    assert _stats(real).decode_steps == steps  # the engine is idle, not decoding for nobody
    _real_next_is_served(real)
