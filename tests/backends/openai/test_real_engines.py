"""The ``openai`` backend in front of real engines on loopback: llama-cpp-python's own server,
and another gateway process running the llama.cpp backend (both on SmolLM2, one thread)."""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.defaults import default_model_path
from gateway.testing import ServerThread
from tests.backends.openai.fleet import (
    Process,
    fleet,
    front_config,
    gateway_process,
    llama_cpp_server,
    wait_for,
)
from tests.support import openai_client

pytestmark = pytest.mark.slow

#: SmolLM2's end tokens (<|endoftext|>, <|im_end|>) banned: a generation runs to max_tokens.
NO_EOS = {"0": -100, "2": -100}
SYSTEM = "You are a helpful assistant. " + "Answer questions about the solar system briefly. " * 20


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}")


@pytest.fixture(scope="module")
def model_path() -> Path:
    _needs("llama_cpp")
    try:
        return default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def lcs(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Process]:
    for module in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        _needs(module)
    server = llama_cpp_server(tmp_path_factory.mktemp("lcs"), model_path)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llamacpp_gateway(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path
) -> Iterator[Process]:
    table = {
        "backend": "llamacpp",
        "model_path": str(model_path),
        "batching": {"max_concurrent": 2, "n_threads": 1},
        "kv_cache": {"n_ctx_per_slot": 1024},
    }
    config: dict[str, Any] = {"models": {"smol": table}, "plugins": {"metrics": {}}}
    server = gateway_process(tmp_path_factory.mktemp("gw"), "llamacpp", config)
    try:
        yield server.start()
    finally:
        server.stop()


def front(replica: Process, **table: Any) -> ServerThread:
    model = {"replicas": [{"url": replica.url}], "upstream_model": "smol", **table}
    return ServerThread(front_config({"smol": model}))


def sdk(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, api_key="unused")


def long_stream_then_disconnect(server: ServerThread, after_chunks: int = 3) -> None:
    body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 900, "stream": True}
    body["logit_bias"] = NO_EOS
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += '"text":"' in line
            if chunks >= after_chunks:
                break


# -- llama-cpp-python's server ---------------------------------------------------------------


def test_llama_cpp_server_chat_and_completion(lcs: Process) -> None:
    with front(lcs, context_length=2048, health={"path": "/docs"}) as srv:
        client = sdk(srv)
        stream = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() and {c.model for c in chunks} == {"smol"}
        usage = chunks[-1].usage
        # this server sends no usage on streams: completion tokens are counted as pieces
        assert usage is not None and 1 <= usage.completion_tokens <= 8 and usage.prompt_tokens == 0
        done = client.completions.create(model="smol", prompt="The sky is", max_tokens=4)
        assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")


def test_llama_cpp_server_stops_when_the_client_leaves(lcs: Process) -> None:
    """Its one model lock makes the proof plain: the next request is served at once only if
    the abandoned 900-token generation stopped."""
    with front(lcs, context_length=2048, health={"path": "/docs"}) as srv:
        long_stream_then_disconnect(srv)
        wait_for(lambda: "Disconnected from client" in lcs.log_tail(), what="upstream saw it")
        started = time.monotonic()
        r = sdk(srv).completions.create(model="smol", prompt="Hi", max_tokens=2)
        assert r.choices[0].text is not None
        assert time.monotonic() - started < 5  # 900 tokens at ~50/s would take ~18 s
        assert fleet(srv, "smol").cancelled == 1


# -- a gateway process on the llama.cpp backend ----------------------------------------------


def cached_after(server: ServerThread, messages: list[dict[str, str]]) -> tuple[int, int]:
    r = sdk(server).chat.completions.create(model="smol", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    return r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens or 0


def test_gateway_replica_reports_context_and_cached_tokens(llamacpp_gateway: Process) -> None:
    with front(llamacpp_gateway, health={"path": "/ready"}) as srv:
        assert srv.backend("smol").info.context_length == 1024  # from the replica's /v1/models
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Mars?"}]
        prompt, _ = cached_after(srv, messages)
        messages += [
            {"role": "assistant", "content": "A planet."},
            {"role": "user", "content": "Why red?"},
        ]
        prompt2, cached2 = cached_after(srv, messages)
        assert prompt2 > prompt and cached2 >= prompt - 8  # the first turn came from the cache
        assert fleet(srv, "smol").cached_prompt_tokens >= cached2


def engine_metric(replica: Process, name: str) -> float:
    text = httpx.get(replica.url + "/metrics").text
    match = re.search(rf'^{name}\{{model="smol"\}} ([0-9.e+]+)$', text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_gateway_replica_frees_the_sequence_when_the_client_leaves(
    llamacpp_gateway: Process,
) -> None:
    cancelled = "gateway_engine_cancelled_sequences_total"
    with front(llamacpp_gateway, health={"path": "/ready"}) as srv:
        before = engine_metric(llamacpp_gateway, cancelled)
        long_stream_then_disconnect(srv)
        wait_for(lambda: engine_metric(llamacpp_gateway, cancelled) == before + 1, what="cancel")
        wait_for(lambda: engine_metric(llamacpp_gateway, "gateway_engine_active_sequences") == 0)
