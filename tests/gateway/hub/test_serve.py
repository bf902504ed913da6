"""Serving models fetched from a Hub stand-in: ``serve --model org/repo:QUANT`` (SmolLM2, and a
split copy of it) answering the openai SDK, and ``load = "on_demand"`` models downloaded on
their first request (8 requests waiting on one download; a wait past the queue timeout is a
503 with Retry-After; a corrupt download is never loaded)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config import parse_config
from gateway.defaults import default_model_path, single_model_config
from gateway.testing import ServerThread
from tests.gateway.hub.conftest import TINY_REPO, Hub
from tests.gateway.hub.split_gguf import split_gguf
from tests.support import openai_client, wait_for

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(120)

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _client(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url)


def _single(spec: str) -> Any:
    cfg = single_model_config(spec)
    table = cfg.models[spec]
    batching = table.batching.model_copy(update={"n_threads": 1})
    return parse_config(
        {"models": {spec: {**table.model_dump(by_alias=True), "batching": batching.model_dump()}}},
        cfg.source,
    )


@pytest.fixture(scope="module")
def smol_split(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    try:
        smol = default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return split_gguf(smol, tmp_path_factory.mktemp("smol-split"), "SmolLM2-135M-Q4_1", 100)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_serve_model_from_the_hub(hub: Hub, smol_split: list[Path], split: bool) -> None:
    files = {p.name: p for p in smol_split} if split else {SMOL_FILE: default_model_path()}
    hub.state.add_repo("test-org/SmolLM2-GGUF", files)
    spec = "test-org/SmolLM2-GGUF:q4_1"
    with ServerThread(_single(spec)) as server:
        client = _client(server)
        assert {m.id for m in client.models.list()} == {spec, "default"}
        for model in (spec, "default"):
            answer = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
                temperature=0,
            )
            assert answer.model == model
            assert answer.choices[0].message.content
            assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert len(hub.gets()) == len(files)


def _on_demand(**batching: Any) -> Any:
    table = {
        "backend": "llamacpp",
        "hf": TINY_REPO,
        "quant": "Q4_K_M",
        "load": "on_demand",
        "batching": {"n_threads": 1, "max_concurrent": 2, "max_queue": 16, **batching},
        "kv_cache": {"n_ctx_per_slot": 256},
    }
    return parse_config({"models": {"tiny": table}}, "<test>")


def _admin(server: ServerThread) -> dict[str, Any]:
    data = httpx.get(server.base_url + "/admin/models").json()["data"][0]
    assert isinstance(data, dict)
    return data


def _chat(server: ServerThread) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


def test_on_demand_download_serves_eight_waiting_requests(
    hub: Hub, tiny_files: dict[str, Path]
) -> None:
    size = tiny_files["Tiny-Q4_K_M.gguf"].stat().st_size
    hub.state.rate = size // 2  # about 2 s
    with ServerThread(_on_demand(queue_timeout_s=60)) as server:
        assert _admin(server)["state"] == "unloaded" and not hub.gets()
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(_chat(server).status_code))
            for _ in range(8)
        ]
        for t in threads:
            t.start()

        def all_waiting() -> bool:
            seen = _admin(server)
            return bool(seen["state"] == "downloading" and seen["leases"] == 8)

        wait_for(all_waiting, 20, "8 requests waiting on the download")
        assert _admin(server)["download"]["total_bytes"] == size
        for t in threads:
            t.join()
        assert results == [200] * 8
        assert len(hub.state.downloads("Tiny-Q4_K_M.gguf")) == 1
        done = _admin(server)
        assert done["state"] == "loaded" and done["download"]["bytes"] == size
        assert done["download"]["done"] is True and done["download"]["bytes_per_s"] > 0


def test_waiting_past_the_queue_timeout_is_a_503(hub: Hub, tiny_files: dict[str, Path]) -> None:
    hub.state.rate = tiny_files["Tiny-Q4_K_M.gguf"].stat().st_size // 2
    with ServerThread(_on_demand(queue_timeout_s=0.3)) as server:
        busy = _chat(server)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_overloaded"
        assert "is being downloaded" in busy.json()["error"]["message"]
        wait_for(lambda: _admin(server)["state"] == "loaded", 30, "the model loaded")
        assert _chat(server).status_code == 200


def test_corrupt_download_is_never_loaded(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fetch is never loaded; it is remembered for FETCH_RETRY_AFTER_S (requests get
    its 503 at once, the Hub is not asked again), then the next request fetches afresh."""
    import gateway.pool

    monkeypatch.setattr(gateway.pool, "FETCH_RETRY_AFTER_S", 1.5)
    hub.state.corrupt.add("Tiny-Q4_K_M.gguf")
    with ServerThread(_on_demand()) as server:
        failed = _chat(server)
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "model_unavailable"
        seen = _admin(server)
        assert seen["state"] == "failed" and "downloaded corrupt" in seen["error"]
        assert seen["loads"] == 0
        hub.state.corrupt.clear()
        requests = len(hub.state.log)
        again = _chat(server)  # within the backoff: the same 503, nothing asked of the Hub
        assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
        assert len(hub.state.log) == requests
        time.sleep(1.6)
        assert _chat(server).status_code == 200  # the next request fetches it afresh


def test_a_slow_load_of_a_cached_model_is_not_a_503(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``queue_timeout_s`` bounds the wait for a download only: a cached model that takes
    longer than that to load is waited for, as any load."""
    from backends.llamacpp.backend import LlamaCppBackend
    from gateway.hub import parse_spec
    from gateway.hub.fetch import fetch

    fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    start = LlamaCppBackend.start

    async def slow_start(self: LlamaCppBackend) -> None:
        await asyncio.sleep(1.0)
        await start(self)

    monkeypatch.setattr(LlamaCppBackend, "start", slow_start)
    with ServerThread(_on_demand(queue_timeout_s=0.3)) as server:
        assert _chat(server).status_code == 200


def test_a_model_retired_while_downloading_stops_its_download(hub: Hub, tmp_path: Path) -> None:
    """A hot reload that removes (or changes) a model stops its download at the next chunk
    (huggingface_hub reads 10 MiB at a time), keeping the partial file; the model is not shown
    as failed."""
    from dataclasses import replace

    from gateway.errors import ModelUnavailable
    from gateway.pool import ModelPool, ModelState

    big = tmp_path / "Big-Q4_K_M.gguf"
    big.write_bytes(os.urandom(32 << 20))
    hub.state.add_repo("test-org/Big-GGUF", {big.name: big})
    hub.state.rate = 16 << 20  # a 10 MiB chunk in ~0.6 s, the file in ~2 s

    async def main() -> None:
        config = _on_demand()
        table = config.models["tiny"].model_copy(update={"hf": "test-org/Big-GGUF"})
        config = replace(config, models={"tiny": table})
        pool = ModelPool(config)
        entry = pool.entries["tiny"]
        load = asyncio.create_task(entry.ensure_loaded())
        await asyncio.to_thread(
            wait_for, lambda: entry.download is not None and entry.download.done_bytes > 0, 10,
            "the first chunk downloaded",
        )  # fmt: skip
        pool.reconfigure(replace(config, models={}))
        with pytest.raises(ModelUnavailable, match="reconfigured or removed"):
            await asyncio.wait_for(load, 10)
        await pool.lifecycle.aclose()
        assert entry.download is not None
        assert entry.download.cancelled and entry.download.done_bytes < big.stat().st_size
        assert entry.state is not ModelState.FAILED and entry.error is None

    asyncio.run(main())
    blobs = hub.cache / "models--test-org--Big-GGUF" / "blobs"
    assert [p.suffix for p in blobs.iterdir()] == [".incomplete"]
