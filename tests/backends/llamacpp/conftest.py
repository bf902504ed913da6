"""Fixtures: a tiny generated GGUF, the real SmolLM2 model, and session-scoped real servers.

Every engine runs on 1 thread (the test machines have 2 shared cores; conftest at the top
sets OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from backends.llamacpp import LlamaCppBackend
from gateway.backend import EngineStats
from gateway.config import parse_config
from gateway.defaults import default_model_path
from gateway.testing import ServerThread
from tests.backends.llamacpp.tiny_gguf import write_tiny_gguf
from tests.support import openai_client, wait_for

pytest.importorskip("llama_cpp")

SMOL = "smol"
TINY = "tiny"


def model_table(path: Path, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "backend": "llamacpp",
        "model_path": str(path),
        "batching": {"n_threads": 1, "max_concurrent": 2, "prefill_chunk_tokens": 64},
        "kv_cache": {"n_ctx_per_slot": 1024, "cached_prefixes": 4},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            table[key] = {**table.get(key, {}), **value}
        else:
            table[key] = value
    return table


def serve(models: dict[str, dict[str, Any]]) -> ServerThread:
    """A real server; headers go out after 0.2 s without a first token (keep-alive interval),
    so a client can see a stream open while its prompt is still in prefill."""
    raw = {"server": {"keepalive_s": 0.2}, "models": models}
    return ServerThread(parse_config(raw, "<test>"))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def smol_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smol_server(smol_path: Path) -> Iterator[ServerThread]:
    """SmolLM2 with 2 slots, 1024 tokens each, 4 cached prefixes, 64-token prefill steps."""
    with serve({SMOL: model_table(smol_path)}) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_path: Path) -> Iterator[ServerThread]:
    """The tiny model with 4 slots."""
    table = model_table(tiny_path, batching={"max_concurrent": 4})
    with serve({TINY: table}) as server:
        yield server


def client_for(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, api_key="test")


def backend_of(server: ServerThread, model: str) -> LlamaCppBackend:
    backend = server.backend(model)
    assert isinstance(backend, LlamaCppBackend)
    return backend


def wait_for_stats(
    get: Callable[[], EngineStats], ok: Callable[[EngineStats], bool], timeout: float = 20
) -> EngineStats:
    """Poll engine stats until ``ok`` (engine state changes between decode steps)."""
    seen: list[EngineStats] = []

    def reached() -> bool:
        seen.append(get())
        return ok(seen[-1])

    wait_for(reached, timeout, "the expected engine state")
    return seen[-1]
