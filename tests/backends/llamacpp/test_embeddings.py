"""``/v1/embeddings`` on the real engine: SmolLM2 through real HTTP with the openai SDK and
LangChain, batched in the engine thread beside streaming completions."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import backend_of, model_table, serve, wait_for_stats
from tests.support import openai_client, wait_for

EMB = "smol-emb"


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    """SmolLM2 serving chat and embeddings on 2 slots, and as an embedding-only model."""
    only = model_table(smol_path, embeddings=True, pooling="last", kv_cache={"n_ctx_per_slot": 256})
    with serve({"smol": model_table(smol_path), EMB: only}) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def test_vectors_are_unit_length_and_repeatable(client: OpenAI) -> None:
    texts = [
        "The cat sat on the mat.",
        "Stock markets fell sharply today.",
        "The cat sat on the mat.",
    ]
    r = client.embeddings.create(model="smol", input=texts, encoding_format="float")
    vecs = [d.embedding for d in r.data]
    assert [len(v) for v in vecs] == [576] * 3  # SmolLM2-135M's hidden size
    assert all(norm(v) == pytest.approx(1.0, abs=1e-5) for v in vecs)
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-5)  # identical inputs in one batch
    again = client.embeddings.create(model="smol", input=texts[1], encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vecs[1], abs=1e-4)  # and across batches
    assert cosine(vecs[0], vecs[1]) < 0.999
    assert r.usage.prompt_tokens == r.usage.total_tokens > 10


def test_base64_and_float_are_the_same_vector(client: OpenAI) -> None:
    floats = client.embeddings.create(model="smol", input="hello there", encoding_format="float")
    decoded = client.embeddings.create(model="smol", input="hello there")  # SDK: base64
    assert decoded.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-5)


def test_token_arrays_match_the_text_they_spell(client: OpenAI, server: ServerThread) -> None:
    model = backend_of(server, "smol")._model
    assert model is not None
    tokens = model.tokenizer.encode("hello there", special=True)
    if model.tokenizer.add_bos:
        tokens = [model.tokenizer.bos, *tokens]
    by_text = client.embeddings.create(model="smol", input="hello there", encoding_format="float")
    by_ids = client.embeddings.create(model="smol", input=[tokens], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-4)
    assert by_ids.usage.prompt_tokens == len(tokens)


def test_dimensions(client: OpenAI, server: ServerThread) -> None:
    r = client.embeddings.create(model="smol", input="x", dimensions=64, encoding_format="float")
    assert len(r.data[0].embedding) == 64 and norm(r.data[0].embedding) == pytest.approx(1.0)
    too_many = httpx.post(
        server.base_url + "/v1/embeddings", json={"model": "smol", "input": "x", "dimensions": 577}
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "dimensions"


def test_limits_are_400s(server: ServerThread) -> None:
    url = server.base_url + "/v1/embeddings"
    long = httpx.post(url, json={"model": EMB, "input": "word " * 400})
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "context_length_exceeded"
    assert long.json()["error"]["param"] == "input"
    bad_id = httpx.post(url, json={"model": "smol", "input": [[1, 2, 10**8]]})
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "input"
    chat = {"model": EMB, "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(server.base_url + "/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


def test_an_embedding_only_model_pools_in_one_batch(client: OpenAI, server: ServerThread) -> None:
    r = client.embeddings.create(model=EMB, input=["alpha", "beta gamma"], encoding_format="float")
    assert len(r.data) == 2 and all(norm(d.embedding) == pytest.approx(1.0) for d in r.data)
    stats = backend_of(server, EMB).stats()
    assert stats.active_sequences == 0 and stats.kv_cells_used == 0  # nothing kept


def test_embeddings_share_the_engine_with_a_running_stream(
    client: OpenAI, server: ServerThread
) -> None:
    backend = backend_of(server, "smol")
    before = backend.stats()
    done = threading.Event()
    texts: list[str] = []

    def chat() -> None:
        stream = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Count from one to twenty."}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        texts.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
        done.set()

    thread = threading.Thread(target=chat)
    thread.start()
    r = client.embeddings.create(model="smol", input=[f"sentence {i}" for i in range(12)])
    thread.join(60)
    assert done.is_set() and "".join(texts)
    assert len(r.data) == 12
    after = backend.stats()
    assert after.active_sequences == 0
    assert after.prompt_tokens_processed > before.prompt_tokens_processed


def test_langchain_openai_embeddings(server: ServerThread) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    emb = langchain_openai.OpenAIEmbeddings(
        model="smol",
        base_url=server.base_url + "/v1",
        api_key="x",
        check_embedding_ctx_length=False,  # it would tokenize with tiktoken, an OpenAI vocabulary
    )
    docs = emb.embed_documents(["first document", "second document"])
    query = emb.embed_query("first document")
    assert len(docs) == 2 and len(docs[0]) == 576
    assert query == pytest.approx(docs[0], abs=1e-4)


def test_a_client_leaving_mid_batch_frees_every_slot(client: OpenAI, server: ServerThread) -> None:
    """64 inputs of ~200 tokens take seconds on 2 slots; the client gives up once they run
    (its connection closes): the queued and running inputs are dropped, the cells freed, and
    the model serves on."""
    backend = backend_of(server, "smol")
    before = backend.stats()
    body = {"model": "smol", "input": [f"{i} " + "words and more words " * 40 for i in range(64)]}
    data = json.dumps(body).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + data)
        wait_for(lambda: backend.stats().active_sequences > 0, what="the inputs running")
    stats = wait_for_stats(
        backend.stats, lambda s: s.active_sequences == 0 and s.queued_sequences == 0
    )
    assert stats.cancelled > before.cancelled  # dropped, not run to the end
    # finished embeddings keep no cells; the dropped ones gave theirs back
    assert stats.kv_cells_used <= before.kv_cells_used
    adm = server.services.pool.resolve("smol").admission
    wait_for(lambda: adm.active == 0, what="admission released")
    r = client.embeddings.create(model="smol", input="still here", encoding_format="float")
    assert norm(r.data[0].embedding) == pytest.approx(1.0)
