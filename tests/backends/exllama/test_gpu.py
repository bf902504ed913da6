"""The real ExLlamaV2/ExLlamaV3 backends on a GPU, through the real gateway and the openai SDK.

Marked ``gpu`` (skipped without CUDA, see tests/conftest.py). Models come from
``GATEWAY_TEST_HF_MODEL`` (a tiny fp16 Hugging Face Llama: both libraries load it directly),
``GATEWAY_TEST_EXL2_MODEL`` and ``GATEWAY_TEST_EXL3_MODEL`` (converted ones); a test whose model
is not given is skipped. Tiny random models write garbage: these tests assert on structure,
counts, finish reasons and engine state, not on content. EOS is banned with ``logit_bias``
where a test needs the full ``max_tokens``.

Test ids carry the backend name (``exllamav2``/``exllamav3``) so a run can select either.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from backends._exllama.backend import ExllamaBackend
from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.support import wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

LOAD_TIMEOUT_S = 240
PROMPT = "Once upon a time, in a land far away, there lived"


def env_dir(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value) if value else None


@dataclass(frozen=True)
class Target:
    """One backend with one model: the HF fp16 one, or its converted form when given."""

    backend: str
    model_var: str

    @property
    def model_dir(self) -> Path:
        for var in (self.model_var, "GATEWAY_TEST_HF_MODEL"):
            path = env_dir(var)
            if path is not None:
                return path
        pytest.skip(f"set {self.model_var} or GATEWAY_TEST_HF_MODEL to a model directory")


TARGETS = {
    "exllamav2": Target("exllamav2", "GATEWAY_TEST_EXL2_MODEL"),
    "exllamav3": Target("exllamav3", "GATEWAY_TEST_EXL3_MODEL"),
}


@contextmanager
def serve(backend: str, model_dir: Path, **table: Any) -> Iterator[ServerThread]:
    """The gateway serving ``model_dir`` as model "m"; waits for the load (a first load can
    compile kernels for a while) and fails with the load's own error."""
    pytest.importorskip(backend)
    table = {
        "backend": backend,
        "model_dir": str(model_dir),
        "kv_cache": {"max_seq_len": 2048, "size_tokens": 8192, **table.pop("kv_cache", {})},
        "batching": {"max_concurrent": 8, "prefill_chunk_tokens": 512},
        **table,
    }
    config = parse_config({"models": {"m": table}}, "gpu-test")
    with ServerThread(config, wait_ready=False) as server:
        entry = server.services.pool.resolve("m")
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while httpx.get(server.base_url + "/ready").status_code != 200:
            assert entry.error is None, f"model failed to load: {entry.error}"
            assert time.monotonic() < deadline, f"model not loaded in {LOAD_TIMEOUT_S} s"
            time.sleep(0.1)
        yield server


@pytest.fixture(scope="module", params=sorted(TARGETS))
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    target = TARGETS[request.param]
    with serve(target.backend, target.model_dir) as srv:
        yield srv
        if srv.base_url in _clients:
            _clients.pop(srv.base_url).close()


_clients: dict[str, OpenAI] = {}


def client(server: ServerThread) -> OpenAI:
    """One client per server, closed with it (a client left to the GC leaks its sockets)."""
    if server.base_url not in _clients:
        _clients[server.base_url] = OpenAI(
            base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60
        )
    return _clients[server.base_url]


def backend_of(server: ServerThread) -> ExllamaBackend:
    backend = server.backend("m")
    assert isinstance(backend, ExllamaBackend)
    return backend


def no_eos(server: ServerThread) -> dict[str, int]:
    """``logit_bias`` banning every EOS token, so generation runs to ``max_tokens``."""
    model = backend_of(server).loaded_model
    assert model is not None
    return {str(t): -100 for t in model.stop_token_ids}


def test_loaded_as_configured(server: ServerThread) -> None:
    backend = backend_of(server)
    info = backend.info
    assert info.context_length == 2048
    model = backend.loaded_model
    assert model is not None
    if model.plan.paged:
        assert info.max_concurrent == 8
    else:  # ExLlamaV2 without flash-attn: one job at a time, and admission knows it
        assert info.max_concurrent == 1
        assert server.services.pool.resolve("m").admission.capacity == 1
    assert backend.stats().kv_cells_total == model.plan.cache_tokens


def test_streaming_chat(server: ServerThread) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 16
    if finishes[-1] == "length":
        assert usage.completion_tokens == 16


def test_max_tokens_and_logit_bias(server: ServerThread) -> None:
    r = client(server).completions.create(
        model="m", prompt=PROMPT, max_tokens=24, logit_bias=no_eos(server), temperature=0.8
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 24
    assert r.choices[0].text


def test_concurrent_streams(server: ServerThread) -> None:
    c, bias = client(server), no_eos(server)
    before = backend_of(server).stats()

    def one(i: int) -> tuple[str | None, int]:
        stream = c.completions.create(
            model="m",
            prompt=f"{PROMPT} {i}",
            max_tokens=32,
            logit_bias=bias,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        usage = chunks[-1].usage
        return finish, usage.completion_tokens if usage else -1

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert results == [("length", 32)] * 6
    stats = backend_of(server).stats()
    assert stats.tokens_generated - before.tokens_generated == 6 * 32
    model = backend_of(server).loaded_model
    assert model is not None
    if model.plan.paged:
        assert stats.max_batch_sequences >= 2, "streams were decoded together"
    else:
        assert stats.max_batch_sequences == 1
    assert stats.active_sequences == 0 and stats.kv_cells_used == 0


def test_n_choices(server: ServerThread) -> None:
    kwargs: dict[str, Any] = {"model": "m", "prompt": PROMPT, "n": 3, "max_tokens": 8, "seed": 7}
    if backend_of(server).info.max_concurrent < 3:  # exllamav2 unpaged: one sequence at a time
        with pytest.raises(openai.BadRequestError) as err:
            client(server).completions.create(**kwargs, logit_bias=no_eos(server))
        assert err.value.param == "n"
        return
    r = client(server).completions.create(**kwargs, logit_bias=no_eos(server))
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 24


SMALL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_is_enforced_by_the_filter(server: ServerThread) -> None:
    """The grammar runs as the library's filter: random weights, yet every output parses
    and validates (n = 2, temperatures 0 and 1.2, concurrent with a free stream)."""
    import jsonschema  # type: ignore[import-untyped]

    c = client(server)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": SMALL}}
    ask: Any = [{"role": "user", "content": "A person as JSON."}]

    def constrained(temperature: float) -> Any:
        return c.chat.completions.create(
            model="m", messages=ask, response_format=fmt, n=2, max_tokens=80,
            temperature=temperature, seed=5,
        )  # fmt: skip

    with ThreadPoolExecutor(3) as pool:
        free = pool.submit(lambda: c.completions.create(model="m", prompt=PROMPT, max_tokens=32))
        runs = [pool.submit(constrained, t) for t in (0.0, 1.2)]
        for run in runs:
            for choice in run.result().choices:
                if choice.finish_reason == "stop":
                    jsonschema.validate(json.loads(choice.message.content or ""), SMALL)
        assert free.result().choices[0].text


def test_a_required_tool_call_is_enforced(server: ServerThread) -> None:
    tool: Any = {"type": "function", "function": {"name": "person", "parameters": SMALL}}
    r = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Call it."}], tools=[tool],
        tool_choice="required", max_tokens=120, temperature=1.0,
    )  # fmt: skip
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        calls = choice.message.tool_calls or []
        assert calls and all(call.function.name == "person" for call in calls)  # type: ignore[union-attr]
    else:
        assert choice.finish_reason == "length"


def test_stop_string(server: ServerThread) -> None:
    c, bias = client(server), no_eos(server)
    base = c.completions.create(
        model="m", prompt=PROMPT, max_tokens=32, temperature=0, logit_bias=bias
    )
    text = base.choices[0].text
    stop = next((text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip()), "")
    if not stop:
        pytest.skip(f"greedy output has no usable stop string: {text!r}")
    r = c.completions.create(
        model="m", prompt=PROMPT, max_tokens=32, temperature=0, logit_bias=bias, stop=[stop]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert choice.text == text[: text.index(stop)]
    assert r.usage is not None and r.usage.completion_tokens <= 32


def test_seed_repeats_a_sampled_completion(
    server: ServerThread, request: pytest.FixtureRequest
) -> None:
    if backend_of(server).info.max_concurrent == 1:
        # Seen on an H200: exllamav2's unpaged generator, same seed, texts diverged after ~10
        # tokens (a near-uniform random model makes any numeric difference flip a sample).
        request.applymarker(
            pytest.mark.xfail(reason="exllamav2 unpaged: seeded text diverges", strict=True)
        )
    c, bias = client(server), no_eos(server)

    def sampled(seed: int) -> str:
        r = c.completions.create(
            model="m", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, logit_bias=bias
        )
        return r.choices[0].text

    assert sampled(1234) == sampled(1234)


def test_cached_tokens_on_a_repeated_prefix(server: ServerThread) -> None:
    c = client(server)
    prompt = PROMPT + " and" * 700  # well over two cache pages
    first = c.completions.create(model="m", prompt=prompt, max_tokens=2)
    second = c.completions.create(model="m", prompt=prompt + " then", max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens > 512
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= 256
    assert backend_of(server).stats().cached_prompt_tokens >= 256


def test_context_overflow_is_400(server: ServerThread) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model="m", prompt=PROMPT, max_tokens=4000)
    assert info.value.code == "context_length_exceeded"


def test_disconnect_cancels_and_frees_the_cache(server: ServerThread) -> None:
    backend = backend_of(server)
    model = backend.loaded_model
    assert model is not None
    before = backend.stats().cancelled
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": no_eos(server),
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break
        assert backend.stats().kv_cells_used > 0
    wait_for(lambda: backend.stats().cancelled > before)
    wait_for(lambda: model.generator.num_remaining_jobs() == 0)
    stats = backend.stats()
    assert stats.active_sequences == 0 and stats.kv_cells_used == 0
    used, _ = model.kv_usage()
    assert used == 0, "the cancelled job's pages are free"


def test_chat_template_from_the_model(server: ServerThread) -> None:
    model_dir = Path(backend_of(server).config.model_dir)
    has_template = (model_dir / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (model_dir / "tokenizer_config.json").read_text()
    )
    if not has_template:
        pytest.skip("the test model has no chat template")
    r = client(server).chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi <|im_end|> there"},
        ],
        max_tokens=4,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.prompt_tokens > 10


# ---- cache formats and converted models: one load and one stream each ----

CACHE_VARIANTS = [
    pytest.param("exllamav2", {"mode": "q4"}, id="exllamav2-q4"),
    pytest.param("exllamav2", {"mode": "q8"}, id="exllamav2-q8"),
    pytest.param("exllamav2", {"mode": "q6"}, id="exllamav2-q6"),
    pytest.param("exllamav3", {"k_bits": 4, "v_bits": 4}, id="exllamav3-k4v4"),
    pytest.param("exllamav3", {"k_bits": 8, "v_bits": 6}, id="exllamav3-k8v6"),
]


def stream_once(server: ServerThread, max_tokens: int = 12) -> None:
    chunks = list(
        client(server).completions.create(
            model="m",
            prompt=PROMPT,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=no_eos(server),
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == max_tokens


@pytest.mark.parametrize(("backend", "kv_cache"), CACHE_VARIANTS)
def test_quantized_cache(backend: str, kv_cache: dict[str, Any]) -> None:
    with serve(backend, TARGETS[backend].model_dir, kv_cache=kv_cache) as srv:
        loaded = backend_of(srv).loaded_model
        assert loaded is not None
        label = kv_cache.get("mode") or f"k{kv_cache['k_bits']}v{kv_cache['v_bits']}"
        assert label in loaded.describe()
        stream_once(srv)


@pytest.mark.parametrize(
    ("backend", "var"),
    [
        pytest.param("exllamav2", "GATEWAY_TEST_HF_MODEL", id="exllamav2-hf-fp16"),
        pytest.param("exllamav2", "GATEWAY_TEST_EXL2_MODEL", id="exllamav2-exl2"),
        pytest.param("exllamav3", "GATEWAY_TEST_HF_MODEL", id="exllamav3-hf-fp16"),
        pytest.param("exllamav3", "GATEWAY_TEST_EXL3_MODEL", id="exllamav3-exl3"),
    ],
)
def test_each_model_format_loads(backend: str, var: str) -> None:
    model_dir = env_dir(var)
    if model_dir is None:
        pytest.skip(f"{var} is not set")
    with serve(backend, model_dir) as srv:
        stream_once(srv, max_tokens=6)


def test_exllamav2_unpaged_when_asked() -> None:
    """``paged = "off"`` runs one sequence at a time even where flash-attn exists."""
    with serve(
        "exllamav2",
        TARGETS["exllamav2"].model_dir,
        batching={"max_concurrent": 8, "prefill_chunk_tokens": 512, "paged": "off"},
    ) as srv:
        backend = backend_of(srv)
        assert backend.info.max_concurrent == 1
        assert srv.services.pool.resolve("m").admission.capacity == 1
        stream_once(srv, max_tokens=4)
