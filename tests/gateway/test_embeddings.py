"""``/v1/embeddings`` through the core with the scripted double, over HTTP with the openai SDK:
the input forms, float and base64, dimensions, usage, and the 400s."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.testing import ServerThread, scripted_embedding
from tests.gateway.helpers import scripted_config
from tests.support import openai_client

EMBEDS = {"capabilities": ["embeddings"], "embedding_size": 16}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config({"emb": EMBEDS, "chat": {}, "small": {**EMBEDS, "engine_slots": 2}})
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def test_one_string(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="emb", input="hello world")
    assert r.object == "list" and r.model == "emb" and len(r.data) == 1
    assert r.data[0].index == 0 and r.data[0].object == "embedding"
    assert tuple(r.data[0].embedding) == pytest.approx(scripted_embedding("hello world", 16))
    assert r.usage.prompt_tokens == 2 and r.usage.total_tokens == 2


def test_a_batch_keeps_order_and_identical_inputs_match(client: openai.OpenAI) -> None:
    inputs = ["a b c", "d", "a b c", "e f"]
    r = client.embeddings.create(model="emb", input=inputs)
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert r.data[0].embedding == r.data[2].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens == 3 + 1 + 3 + 2  # every input counts, repeats included
    alone = client.embeddings.create(model="emb", input="d")
    assert alone.data[0].embedding == r.data[1].embedding


def test_token_arrays(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model="emb", input=[1, 2, 3])
    many = client.embeddings.create(model="emb", input=[[1, 2, 3], [4]])
    assert len(one.data) == 1 and len(many.data) == 2
    assert one.data[0].embedding == many.data[0].embedding


def test_base64_decodes_to_the_float_vector(client: openai.OpenAI, server: ServerThread) -> None:
    floats = client.embeddings.create(model="emb", input="same text", encoding_format="float")
    # without encoding_format the SDK asks for base64 and decodes it itself
    default = client.embeddings.create(model="emb", input="same text")
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)
    # asked for explicitly, it hands back the string
    b64 = client.embeddings.create(model="emb", input="same text", encoding_format="base64")
    packed = base64.b64decode(str(b64.data[0].embedding))
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert len(decoded) == 16
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-6)


def test_dimensions_truncate_and_renormalize(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="emb", input="x y", dimensions=4)
    vec = r.data[0].embedding
    assert len(vec) == 4
    assert math.fsum(v * v for v in vec) == pytest.approx(1.0)


def test_more_inputs_than_slots_take_turns(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="small", input=[f"input {i}" for i in range(64)])
    assert len(r.data) == 64
    assert r.data[63].embedding == pytest.approx(scripted_embedding("input 63", 16))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "emb", "input": ""}, "input"),
        ({"model": "emb", "input": []}, "input"),
        ({"model": "emb", "input": ["ok", ""]}, "input"),
        ({"model": "emb", "input": [[]]}, "input"),
        ({"model": "emb", "input": [-1]}, "input"),
        ({"model": "emb", "input": 5}, "input"),
        ({"model": "emb", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "emb", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "emb"}, "input"),
        ({"model": "chat", "input": "x"}, "model"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    server: ServerThread, body: dict[str, object], param: str
) -> None:
    r = httpx.post(server.base_url + "/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_model_without_the_capability_names_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="chat", input="hello")
    assert info.value.code == "model_not_supported"
    assert "embeddings" in info.value.message


def test_an_embedding_model_serves_no_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_supported"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
