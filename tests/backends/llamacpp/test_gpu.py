"""The llama.cpp backend on a CUDA GPU, through the real gateway (run by scripts/gpu-check.sh).

The model is the tiny random-weight GGUF the GPU check creates (GATEWAY_TEST_GGUF_MODEL): its
text is noise, so the tests assert on structure, counts and engine counters, not on content.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from backends.llamacpp import LlamaCppBackend
from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import model_table, serve

pytestmark = pytest.mark.gpu
MODEL = "gguf"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture(scope="module")
def gpu_server() -> Iterator[ServerThread]:
    path = os.environ.get("GATEWAY_TEST_GGUF_MODEL")
    if not path:
        pytest.skip("GATEWAY_TEST_GGUF_MODEL is not set")
    table = model_table(
        Path(path),
        n_gpu_layers=-1,
        batching={"max_concurrent": 8, "n_threads": 2, "prefill_chunk_tokens": 256},
        kv_cache={"n_ctx_per_slot": 512},
    )
    with serve({MODEL: table}) as server:
        yield server


def backend_of(server: ServerThread) -> LlamaCppBackend:
    backend = server.backend(MODEL)
    assert isinstance(backend, LlamaCppBackend)
    return backend


def test_the_build_offloads_to_the_gpu(gpu_server: ServerThread) -> None:
    import llama_cpp

    assert llama_cpp.llama_supports_gpu_offload()
    with OpenAI(base_url=gpu_server.base_url + "/v1", api_key="x", max_retries=0) as client:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.usage is not None
    assert r.usage.completion_tokens >= 1


def test_eight_concurrent_streams_share_decode_steps(gpu_server: ServerThread) -> None:
    backend = backend_of(gpu_server)

    def run(i: int) -> tuple[str | None, int]:
        with OpenAI(base_url=gpu_server.base_url + "/v1", api_key="x", max_retries=0) as c:
            r = c.completions.create(
                model=MODEL, prompt=f"{i} {PROMPT}", max_tokens=48, temperature=0.8, seed=i
            )
        assert r.usage is not None
        return r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert all(reason in ("stop", "length") for reason, _ in results)
    assert all(tokens >= 1 for _, tokens in results)
    assert backend.stats().max_batch_sequences >= 2


def test_repeated_prefix_is_served_from_the_cache(gpu_server: ServerThread) -> None:
    with OpenAI(base_url=gpu_server.base_url + "/v1", api_key="x", max_retries=0) as client:
        prompt = "A long shared prefix. " * 20
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        r = client.completions.create(model=MODEL, prompt=prompt + "And more.", max_tokens=2)
    assert r.usage is not None
    details = r.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= 64


def test_disconnect_frees_the_sequence(gpu_server: ServerThread) -> None:
    backend = backend_of(gpu_server)
    before = backend.stats()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with (
        httpx.Client(base_url=gpu_server.base_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    deadline = time.monotonic() + 10
    while backend.stats().cancelled == before.cancelled or backend.stats().active_sequences:
        assert time.monotonic() < deadline, "the cancelled sequence was not freed"
        time.sleep(0.02)
    assert backend.stats().tokens_after_cancel - before.tokens_after_cancel <= 1  # one step
