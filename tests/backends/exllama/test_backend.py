"""The shared ExLlama Backend over a fake generator: directly, and through the real gateway.

The loader is the only part replaced (by :class:`FakeLoader`); prompts, limits, the engine
thread, the asyncio bridge, cancellation and usage are the backend's own code. Over HTTP the
backends are the registered ``exllamav2``/``exllamav3`` entry points with their loader patched.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

import backends.exllamav2
import backends.exllamav3
from backends._exllama.backend import ExllamaBackend
from backends._exllama.config import ExllamaModelConfig
from backends.exllamav2.config import ExLlamaV2ModelConfig
from gateway.config import parse_config
from gateway.errors import ContextLengthExceeded, EngineError, InvalidRequest, ModelUnavailable
from gateway.testing import ServerThread
from gateway.types import (
    BatchingKind,
    ChatMessage,
    Delta,
    Finish,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from tests.backends.exllama.fakes import (
    PAGE,
    FakeLoader,
    FakeModel,
    char_tokens,
    endless,
    plan,
    words,
)
from tests.support import wait_for

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    cfg = {"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def config(model_dir: Path, **table: Any) -> ExllamaModelConfig:
    return ExLlamaV2ModelConfig(model_dir=model_dir, **table)


def chat(content: str = "hi", **kw: Any) -> GenerationRequest:
    return GenerationRequest("r", messages=(ChatMessage("user", content),), **kw)


async def collect(backend: ExllamaBackend, request: GenerationRequest) -> list[Delta]:
    async with aclosing(backend.stream(request)) as stream:
        return [d async for d in stream]


async def started(model_dir: Path, loader: FakeLoader, **table: Any) -> ExllamaBackend:
    backend = ExllamaBackend("m", config(model_dir, **table), loader, library="exllamav2")
    await backend.start()
    return backend


async def test_info_before_and_after_start(model_dir: Path) -> None:
    loader = FakeLoader(plan=plan(max_seq_len=2048, batch=1, paged=False))
    backend = ExllamaBackend(
        "m", config(model_dir, kv_cache={"max_seq_len": 4096}), loader, library="exllamav2"
    )
    assert backend.info.context_length == 4096 and backend.info.max_concurrent == 4
    await backend.start()
    try:
        info = backend.info
        assert info.context_length == 2048
        assert info.max_concurrent == 1 and info.batching is BatchingKind.SERIAL
    finally:
        await backend.aclose()
    assert loader.model is not None and loader.model.unloaded
    assert backend.stats().active_sequences == 0


async def test_start_warms_the_engine_up(model_dir: Path) -> None:
    loader = FakeLoader(script=words("abc"))
    backend = await started(model_dir, loader)
    try:
        model = fake(loader)
        (warm,) = model.jobs
        assert warm.max_new_tokens == 2 and warm.new_tokens == 2
        assert warm.input_ids[0] == model.bos_token_id
        stats = backend.stats()
        assert stats.tokens_generated == 2 and stats.decode_steps == 2
        assert stats.kv_cells_used == 0 and stats.active_sequences == 0
    finally:
        await backend.aclose()


async def test_failed_warm_up_fails_the_load(model_dir: Path) -> None:
    loader = FakeLoader(script=words("abc"))
    original = loader.__call__

    def broken(name: str, config: ExllamaModelConfig) -> FakeModel:
        model = original(name, config)
        model.generator.fail_next_iterate = RuntimeError("no kernel image for this device")
        return model

    backend = ExllamaBackend("m", config(model_dir), broken, library="exllamav2")
    with pytest.raises(EngineError, match=r"warm-up generation failed.*no kernel image"):
        await backend.start()
    assert fake(loader).unloaded and backend.loaded_model is None


async def test_stream_chat(model_dir: Path) -> None:
    backend = await started(model_dir, FakeLoader(script=words("Hi there")))
    try:
        deltas = await collect(backend, chat("hello"))
        text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
        assert text == "Hi there"
        finish = deltas[-1]
        assert isinstance(finish, Finish) and finish.reason == "stop"
        prompt = "<s>user: hello</s><s>assistant: "
        assert finish.usage.prompt_tokens == len(char_tokens(prompt, special=True)) == 25
        assert finish.usage.completion_tokens == len("Hi there") + 1
        assert (await backend.validate(chat("hello"))).count == finish.usage.prompt_tokens
    finally:
        await backend.aclose()


async def test_completion_stop_and_max_tokens(model_dir: Path) -> None:
    backend = await started(model_dir, FakeLoader(script=words("alpha beta gamma")))
    try:
        stopped = await collect(backend, GenerationRequest("r", prompt="x", stop=(" ga",)))
        assert "".join(d.text for d in stopped if isinstance(d, TextDelta)) == "alpha beta"
        limited = await collect(backend, GenerationRequest("r", prompt="x", max_tokens=3))
        last = limited[-1]
        assert isinstance(last, Finish) and last.reason == "length"
        assert last.usage.completion_tokens == 3
    finally:
        await backend.aclose()


async def test_limits(model_dir: Path) -> None:
    backend = await started(model_dir, FakeLoader(plan=plan(max_seq_len=300)))
    try:
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 300") as info:
            await backend.validate(GenerationRequest("r", prompt="y" * 200, max_tokens=101))
        assert info.value.param == "prompt" and info.value.code == "context_length_exceeded"
        assert (
            await backend.validate(GenerationRequest("r", prompt="y" * 200, max_tokens=100))
        ).count
        with pytest.raises(ContextLengthExceeded, match="prompt resulted in 300 tokens"):
            await backend.validate(GenerationRequest("r", prompt="y" * 300))
        with pytest.raises(ContextLengthExceeded) as chat_info:
            await backend.validate(chat("z" * 400))
        assert chat_info.value.param == "messages"
        with pytest.raises(InvalidRequest, match="empty"):
            await backend.validate(GenerationRequest("r", prompt=""))
        bias = SamplingParams(logit_bias=((3, 1.0), (50_000, -100.0)))
        with pytest.raises(InvalidRequest, match="50000") as bias_info:
            await backend.validate(GenerationRequest("r", prompt="a", sampling=bias))
        assert bias_info.value.param == "logit_bias"
        # without max_tokens the completion may fill the context
        deltas = await collect(backend, GenerationRequest("r", prompt="q" * 290))
        last = deltas[-1]
        assert isinstance(last, Finish)
    finally:
        await backend.aclose()


async def test_job_gets_the_request(model_dir: Path) -> None:
    loader = FakeLoader(plan=plan(max_seq_len=1000))
    backend = await started(model_dir, loader)
    try:
        sampling = SamplingParams(temperature=0.5, seed=42)
        await collect(backend, GenerationRequest("r", prompt="abc", sampling=sampling))
        await collect(backend, GenerationRequest("r", prompt="abc", max_tokens=7))
        assert loader.model is not None
        first, second = loader.model.request_jobs
        assert first.max_new_tokens == 1000 - 3 and first.seed == 42
        assert second.max_new_tokens == 7
        assert first.stop_token_ids == loader.model.stop_token_ids
    finally:
        await backend.aclose()


async def test_closing_the_stream_cancels_the_job(model_dir: Path) -> None:
    loader = FakeLoader(script=endless(), step_delay_s=0.002)
    backend = await started(model_dir, loader)
    try:
        stream = backend.stream(chat(max_tokens=4000))
        got = [await anext(stream) for _ in range(5)]
        assert all(isinstance(d, TextDelta) for d in got)
        assert backend.stats().kv_cells_used > 0
        await stream.aclose()
        deadline = time.monotonic() + 5
        while backend.stats().cancelled == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        stats = backend.stats()
        assert stats.kv_cells_used == 0 and stats.active_sequences == 0
        assert loader.model is not None and loader.model.generator.num_remaining_jobs() == 0
    finally:
        await backend.aclose()


async def test_engine_errors_reach_the_stream(model_dir: Path) -> None:
    loader = FakeLoader(script=endless(), step_delay_s=0.002)
    backend = await started(model_dir, loader)
    try:
        stream = backend.stream(chat(max_tokens=1000))
        await anext(stream)
        assert loader.model is not None
        loader.model.generator.fail_next_iterate = RuntimeError("device lost")
        with pytest.raises(EngineError, match="engine failed") as failed:
            async for _ in stream:
                pass
        assert "device lost" not in failed.value.message  # the log's, not the client's
    finally:
        await backend.aclose()


async def test_not_loaded(model_dir: Path) -> None:
    backend = ExllamaBackend("m", config(model_dir), FakeLoader(), library="exllamav2")
    with pytest.raises(ModelUnavailable):
        await backend.validate(chat())
    with pytest.raises(ModelUnavailable):
        await collect(backend, chat())
    await backend.aclose()  # nothing to close


async def test_start_errors_name_the_model(tmp_path: Path) -> None:
    missing = ExllamaBackend("m", config(tmp_path / "nope"), FakeLoader(), library="exllamav2")
    with pytest.raises(EngineError, match=r"model 'm': model_dir .*nope is not a directory"):
        await missing.start()
    (tmp_path / "tokenizer_config.json").write_text("{")
    broken = ExllamaBackend("m", config(tmp_path), FakeLoader(), library="exllamav2")
    with pytest.raises(EngineError, match=r"tokenizer_config\.json"):
        await broken.start()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    loader = FakeLoader()
    bad_template = ExllamaBackend("m", config(tmp_path), loader, library="exllamav2")
    with pytest.raises(EngineError, match="invalid chat template"):
        await bad_template.start()
    assert loader.model is not None and loader.model.unloaded


@pytest.mark.parametrize("name", ["exllamav2", "exllamav3"])
async def test_real_loaders_fail_with_one_line_without_the_extra(
    model_dir: Path, name: str
) -> None:
    """Without the library (or CUDA) the registered loader says what to install, in one line."""
    if importlib.util.find_spec(name) is not None and importlib.util.find_spec("torch"):
        pytest.skip(f"{name} is installed: test_gpu.py loads real models with it")
    module = {"exllamav2": backends.exllamav2, "exllamav3": backends.exllamav3}[name]
    backend = module.factory.create(
        "m", module.factory.config_type(backend=name, model_dir=model_dir)
    )
    with pytest.raises(Exception) as info:  # noqa: PT011 - the message is what is checked
        await backend.start()
    message = str(info.value)
    assert "\n" not in message
    assert f"llm-gateway[{name}]" in message or "CUDA" in message, message


# ---- through the real gateway (HTTP + openai SDK), loader patched ----


@pytest.fixture(params=["exllamav2", "exllamav3"])
def served(
    request: pytest.FixtureRequest, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServerThread, FakeLoader]]:
    name: str = request.param
    loader = FakeLoader(script=words("one two three four"), step_delay_s=0.001)
    monkeypatch.setattr(getattr(backends, name), "load", loader)
    table = {"backend": name, "model_dir": str(model_dir), "batching": {"max_concurrent": 4}}
    with ServerThread(parse_config({"models": {"m": table}}, "test")) as server:
        yield server, loader


def client(server: ServerThread) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def fake(loader: FakeLoader) -> FakeModel:
    assert loader.model is not None
    return loader.model


def test_http_streaming_with_usage(served: tuple[ServerThread, FakeLoader]) -> None:
    server, _ = served
    chunks = list(
        client(server).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(text) + 1


def test_http_n_concurrent_choices(served: tuple[ServerThread, FakeLoader]) -> None:
    server, loader = served
    fake(loader).generator.step_delay_s = 0.01  # the three choices overlap in the batch
    r = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], n=3, seed=5
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content == "one two three four" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 3 * 19
    assert sorted(j.seed or 0 for j in fake(loader).request_jobs) == [5, 6, 7]
    assert server.backend("m").stats().max_batch_sequences >= 2  # type: ignore[attr-defined]


def test_http_stop_and_length(served: tuple[ServerThread, FakeLoader]) -> None:
    server, _ = served
    c = client(server)
    stopped = c.completions.create(model="m", prompt="x", stop=["thr"])
    assert stopped.choices[0].text == "one two "
    assert stopped.choices[0].finish_reason == "stop"
    limited = c.completions.create(model="m", prompt="x", max_tokens=5)
    assert limited.choices[0].text == "one t"
    assert limited.choices[0].finish_reason == "length"


def test_http_context_overflow_is_400(served: tuple[ServerThread, FakeLoader]) -> None:
    server, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model="m", prompt="p" * 4000, max_tokens=200)
    assert info.value.code == "context_length_exceeded"


def test_http_cached_tokens_on_a_repeated_prefix(served: tuple[ServerThread, FakeLoader]) -> None:
    server, _ = served
    c = client(server)
    prompt = "a long shared system prompt " * 30
    first = c.completions.create(model="m", prompt=prompt, max_tokens=2)
    second = c.completions.create(model="m", prompt=prompt, max_tokens=2)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 3 * PAGE
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0


def test_http_disconnect_cancels_the_job(served: tuple[ServerThread, FakeLoader]) -> None:
    server, loader = served
    model = fake(loader)
    model.script = endless("z")
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        body = {"model": "m", "prompt": "x", "max_tokens": 3000, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    break
    wait_for(lambda: model.generator.num_remaining_jobs() == 0)
    stats = server.backend("m").stats()  # type: ignore[attr-defined]
    assert stats.cancelled == 1 and stats.kv_cells_used == 0
    job = model.request_jobs[0]
    assert job in model.generator.cancelled and job.new_tokens < 3000
