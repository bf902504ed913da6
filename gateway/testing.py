"""A scripted backend for testing the core (and plugins) without an engine.

Registered as backend ``scripted``. It "tokenizes" by whitespace-separated words, replies with
a configured text (or echoes the last message), and can be slowed down or made to fail. It
keeps a record of what happened to each request so tests can assert on cancellation.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

import httpx
import uvicorn
from pydantic import BaseModel, ConfigDict, Field

from gateway.backend import Backend, MemoryEstimate
from gateway.config import BatchingConfig, GatewayConfig, ModelConfig
from gateway.errors import EngineError, context_length_exceeded
from gateway.output.formats import FORMATS, ChatFormat, Reasoning, ToolFormatName
from gateway.stops import StopMatcher
from gateway.types import (
    BackendInfo,
    BatchingKind,
    Capability,
    Delta,
    EmbeddingDelta,
    Finish,
    GenerationRequest,
    PromptProgress,
    TextDelta,
    TokenizedPrompt,
    ToolCallDelta,
    Usage,
)

_WORD = re.compile(r"\s*\S+")


class ScriptedToolCall(BaseModel):
    """A tool call the scripted backend makes instead of replying with text."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    arguments: str = "{}"


class ScriptedConfig(ModelConfig):
    backend: str = "scripted"
    reply: str = "Hello! I am a scripted test backend."
    echo: bool = Field(False, description="reply with the last message's text instead")
    context_length: int = Field(4096, ge=8)
    engine_slots: int = Field(256, ge=1, description="the most sequences the 'engine' runs")
    load_delay_s: float = Field(0.0, ge=0)
    prefill_delay_s: float = Field(0.0, ge=0)
    token_delay_s: float = Field(0.0, ge=0)
    fail_on_start: bool = False
    unload_delay_s: float = Field(0.0, ge=0)
    #: The memory estimate it reports (``memory_estimate``): on GPU 0 if GPUs are planned.
    weights_bytes: int = Field(0, ge=0)
    kv_cache_bytes: int = Field(0, ge=0)
    compute_bytes: int = Field(0, ge=0)
    fail_after_tokens: int | None = Field(None, ge=0)
    #: What it declares it can do (the core refuses requests needing anything else).
    capabilities: tuple[Capability, ...] = (Capability.STREAMING, Capability.COMPLETIONS)
    #: Calls it makes instead of a text reply (streamed as argument pieces of 3 characters).
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    #: The size of the embeddings it makes (a deterministic function of the input).
    embedding_size: int = Field(8, ge=1, le=4096)
    #: Act as an in-process model whose text the core parses (tool calls written in this
    #: format, reasoning in ``<think>``) and constrains (the grammar is ignored: a double).
    #: None: the core parses nothing, as for a remote replica.
    tool_format: ToolFormatName | None = None
    batching: BatchingConfig = BatchingConfig()


def count_tokens(text: str) -> int:
    return len(_WORD.findall(text))


def prompt_text(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    if request.prompt_tokens is not None:
        return " ".join(str(t) for t in request.prompt_tokens)
    assert request.messages is not None
    return "\n".join(f"{m.role}: {m.content}" for m in request.messages)


def scripted_embedding(text: str, size: int) -> tuple[float, ...]:
    """A deterministic unit vector for ``text``: equal inputs, equal vectors."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [digest[i % len(digest)] - 127.5 + i for i in range(size)]
    return unit(tuple(raw))


def unit(vector: tuple[float, ...]) -> tuple[float, ...]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return tuple(x / norm for x in vector)


@dataclass
class Record:
    """What happened to the requests this backend saw."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    tokens_generated: int = 0


class ScriptedBackend:
    def __init__(self, name: str, config: ScriptedConfig) -> None:
        self.name = name
        self.config = config
        self.record = Record()
        self.started = False
        self._failure: str | None = None
        self._info = BackendInfo(
            context_length=config.context_length,
            max_concurrent=config.engine_slots,
            batching=BatchingKind.CONTINUOUS,
            capabilities=frozenset(config.capabilities),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def chat_format(self) -> ChatFormat | None:
        fmt = self.config.tool_format
        return ChatFormat(FORMATS[fmt], Reasoning()) if fmt is not None else None

    async def start(self) -> None:
        await asyncio.sleep(self.config.load_delay_s)
        if self.config.fail_on_start:
            raise EngineError(f"scripted backend {self.name!r} was told to fail on start")
        self.started = True

    async def aclose(self) -> None:
        await asyncio.sleep(self.config.unload_delay_s)
        self.started = False

    @property
    def failure(self) -> str | None:
        """Set by :meth:`kill_engine`: the pool then reports the model failed and reloads it."""
        return self._failure

    def kill_engine(self, reason: str = "the scripted engine was killed") -> None:
        """Simulate an engine that died after loading."""
        self._failure = reason

    async def validate(self, request: GenerationRequest) -> TokenizedPrompt:
        prompt_tokens = count_tokens(prompt_text(request))
        limit = self.config.context_length
        if prompt_tokens + (request.max_tokens or 0) > limit:
            raise context_length_exceeded(
                limit, prompt_tokens, request.max_tokens, request.prompt_param
            )
        return TokenizedPrompt(count=prompt_tokens)

    def _reply(self, request: GenerationRequest) -> str:
        if not self.config.echo:
            return self.config.reply
        if request.messages:
            return request.messages[-1].content
        return request.prompt or ""

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        rec = self.record
        rec.started.append(request.request_id)
        rec.active += 1
        rec.max_active = max(rec.max_active, rec.active)
        outcome = rec.cancelled
        try:
            async with aclosing(self._generate(request)) as deltas:
                async for delta in deltas:
                    yield delta
            outcome = rec.finished
        except Exception:
            outcome = rec.failed
            raise
        finally:
            rec.active -= 1
            outcome.append(request.request_id)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        cfg = self.config
        tokenized = request.tokenized or await self.validate(request)
        prompt_tokens = tokenized.count
        if request.progress:  # the prompt read in two halves
            yield PromptProgress(prompt_tokens, 0, prompt_tokens // 2, cfg.prefill_delay_s / 2)
        if cfg.prefill_delay_s:
            await asyncio.sleep(cfg.prefill_delay_s)
        if request.progress:
            yield PromptProgress(prompt_tokens, 0, prompt_tokens, cfg.prefill_delay_s)
        if request.embed is not None:
            vector = scripted_embedding(prompt_text(request), cfg.embedding_size)
            dims = request.embed.dimensions
            yield EmbeddingDelta(unit(vector[:dims] if dims else vector))
            yield Finish("stop", Usage(prompt_tokens=prompt_tokens))
            return
        if cfg.tool_calls:
            async for delta in self._calls(prompt_tokens):
                yield delta
            return
        limit = request.max_tokens or cfg.context_length - prompt_tokens
        matcher = StopMatcher(request.stop)
        produced = 0
        reason: str = "stop"
        for word in _WORD.findall(self._reply(request)):
            if produced >= limit:
                reason = "length"
                break
            if cfg.fail_after_tokens is not None and produced >= cfg.fail_after_tokens:
                raise EngineError("scripted failure mid-stream")
            if cfg.token_delay_s:
                await asyncio.sleep(cfg.token_delay_s)
            produced += 1
            self.record.tokens_generated += 1
            text = matcher.feed(word)
            if text:
                yield TextDelta(text)
            if matcher.stopped:
                break
        tail = matcher.flush()
        if tail:
            yield TextDelta(tail, tokens=0)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=produced)
        yield Finish("length" if reason == "length" else "stop", usage, matcher.matched)

    async def _calls(self, prompt_tokens: int) -> AsyncGenerator[Delta, None]:
        produced = 0
        for n, call in enumerate(self.config.tool_calls):
            pieces = [call.arguments[i : i + 3] for i in range(0, len(call.arguments), 3)]
            for i, piece in enumerate(pieces or [""]):
                if self.config.token_delay_s:
                    await asyncio.sleep(self.config.token_delay_s)
                produced += 1
                first = i == 0
                yield ToolCallDelta(
                    n,
                    piece,
                    id=f"call_{n}_{uuid.uuid4().hex[:8]}" if first else None,
                    name=call.name if first else None,
                    tokens=1,
                )
        yield Finish("tool_calls", Usage(prompt_tokens=prompt_tokens, completion_tokens=produced))


class ScriptedFactory:
    config_type = ScriptedConfig

    def create(self, name: str, config: ModelConfig) -> ScriptedBackend:
        assert isinstance(config, ScriptedConfig)
        return ScriptedBackend(name, config)

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate:
        assert isinstance(config, ScriptedConfig)
        total = config.weights_bytes + config.kv_cache_bytes + config.compute_bytes
        gpu = (total,) + (0,) * (gpu_devices - 1) if gpu_devices else ()
        return MemoryEstimate(
            weights_bytes=config.weights_bytes,
            kv_cache_bytes=config.kv_cache_bytes,
            compute_bytes=config.compute_bytes,
            gpu_bytes=gpu,
            host_bytes=0 if gpu_devices else total,
        )


factory = ScriptedFactory()


class ServerThread:
    """Runs the real app under uvicorn on a free loopback port in a background thread.

    ``with ServerThread(config) as server: OpenAI(base_url=server.base_url + "/v1")``.
    """

    def __init__(self, config: GatewayConfig, *, wait_ready: bool = True) -> None:
        from gateway.app import create_app
        from gateway.services import build_services

        self.config = config
        self.services = build_services(config)
        self.app = create_app(config, self.services)
        self.wait_ready = wait_ready
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def backend(self, model: str) -> Backend:
        return self.services.pool.resolve(model).backend

    def __enter__(self) -> ServerThread:
        from gateway.server import uvicorn_options

        uv = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=self._drain_s + 2, **uvicorn_options(self.config.server),
        )  # fmt: skip
        self._server = server = uvicorn.Server(uv)
        self._thread = threading.Thread(target=server.run, name="gateway-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        if self.wait_ready:
            self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        while True:
            status = httpx.get(self.base_url + "/ready").status_code
            if status == 200:
                return
            if time.monotonic() > deadline or any(
                e.state.value == "failed" for e in self.services.pool.entries.values()
            ):
                raise RuntimeError("models did not load")
            time.sleep(0.02)

    @property
    def _drain_s(self) -> int:
        return math.ceil(self.config.server.drain_timeout_s)

    def __exit__(self, *exc: object) -> None:
        """Shut down as ``gateway serve`` does on SIGTERM: the drain starts, and what still
        runs at its deadline is ended (no generation outlives the server)."""
        assert self._server is not None and self._thread is not None
        self.services.pool.drain.start()
        self._server.should_exit = True
        self._thread.join(timeout=self._drain_s + 10)
