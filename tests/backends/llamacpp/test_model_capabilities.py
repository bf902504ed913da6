"""``/v1/models`` capabilities of real llama.cpp models: SmolLM2 loaded (its template knows no
tools and no reasoning), models on demand described from their config alone (nothing loaded),
an embedding-only SmolLM2 and a tiny model whose template thinks, before and after their load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve
from tests.backends.llamacpp.families import THINKING_TEMPLATE
from tests.backends.llamacpp.tiny_gguf import Vocab, write_tiny_gguf

pytestmark = pytest.mark.timeout(120)


def listed(server: ServerThread, model: str) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/v1/models/{model}", timeout=30)
    assert r.status_code == 200, r.text
    entry: dict[str, Any] = r.json()
    return entry


@pytest.fixture(scope="module")
def lazy(smol_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Every model on demand: SmolLM2 for chat and as an embedding-only model, and the tiny
    thinking model."""
    vocab = Vocab(template=THINKING_TEMPLATE, user_defined=("<think>", "</think>"))
    thinker = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "think.gguf", vocab=vocab)
    models = {
        "chat": model_table(smol_path, load="on_demand"),
        "emb": model_table(
            smol_path,
            load="on_demand",
            embeddings=True,
            pooling="last",
            kv_cache={"n_ctx_per_slot": 256},
        ),
        "thinker": model_table(Path(thinker), load="on_demand"),
    }
    with serve(models) as server:
        yield server


def test_loaded_smollm2(smol_server: ServerThread) -> None:
    entry = listed(smol_server, SMOL)
    assert entry["state"] == "loaded" and entry["owned_by"] == "llamacpp"
    assert entry["capabilities"] == {
        "chat": True,
        "completions": True,
        "embeddings": True,  # a chat model of llama.cpp serves embeddings too
        "tools": True,
        "structured_output": True,
        "reasoning": False,  # its template has no reasoning markers
        "vision": False,
        "logprobs": True,
        "context_length": 1024,  # kv_cache.n_ctx_per_slot (under its 8,192 of training)
        "tool_format": "generic",  # its template knows no tools: described in the prompt
    }
    assert entry["max_model_len"] == 1024


def test_models_on_demand_are_described_from_their_config(lazy: ServerThread) -> None:
    chat = listed(lazy, "chat")
    assert chat["state"] == "unloaded" and chat["load"] == "on_demand"
    caps = chat["capabilities"]
    assert caps["chat"] and caps["tools"] and caps["structured_output"] and caps["embeddings"]
    # what only the model file tells (its template, its training context): not guessed
    assert caps["reasoning"] is None and caps["tool_format"] is None
    assert caps["context_length"] is None
    emb = listed(lazy, "emb")["capabilities"]
    assert emb["embeddings"] is True
    assert not any(emb[k] for k in ("chat", "completions", "tools", "structured_output"))
    assert emb["reasoning"] is False and emb["context_length"] is None
    assert {listed(lazy, m)["state"] for m in ("chat", "emb", "thinker")} == {"unloaded"}


def test_a_load_fills_in_what_the_model_file_tells(lazy: ServerThread) -> None:
    r = httpx.post(
        lazy.base_url + "/v1/embeddings", json={"model": "emb", "input": "hi"}, timeout=60
    )
    assert r.status_code == 200, r.text
    emb = listed(lazy, "emb")
    assert emb["state"] == "loaded"
    assert emb["capabilities"]["context_length"] == 256
    assert emb["capabilities"]["chat"] is False and emb["capabilities"]["reasoning"] is False

    assert listed(lazy, "thinker")["capabilities"]["reasoning"] is None
    body = {"model": "thinker", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(lazy.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    thinker = listed(lazy, "thinker")["capabilities"]
    assert thinker["reasoning"] is True  # its template closes reasoning with </think>
    assert thinker["tools"] is True and thinker["tool_format"] is not None
    assert isinstance(thinker["context_length"], int) and thinker["context_length"] > 0
