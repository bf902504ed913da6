"""The Backend both ExLlama versions share; a version supplies only a loader.

The loader (run on a worker thread) imports the library, loads the model directory and its
cache, builds the dynamic generator and returns a :class:`LoadedModel`: the generator plus
how to tokenize, make a job, read cache usage and unload. Everything else (prompts, limits,
the engine thread, cancellation, usage) lives here and in :mod:`backends._exllama.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from backends._exllama.config import EnginePlan, ExllamaModelConfig
from backends._exllama.engine import EngineLoop, EngineModel, JobSpec, Ticket
from backends._exllama.grammar import added_tokens
from backends._exllama.grammar import grammars as model_grammars
from backends._exllama.modeldir import ModelDirError, TokenizerFacts
from backends._exllama.prompt import PromptBuilder, Tokenizer
from gateway.backend import EngineStats
from gateway.errors import (
    EngineError,
    GatewayError,
    InvalidRequest,
    ModelUnavailable,
    context_length_exceeded,
)
from gateway.output.finish.steering import Budget
from gateway.output.formats import ChatFormat, chat_format
from gateway.output.matchers import Grammars, request_grammar
from gateway.types import (
    BackendInfo,
    BatchingKind,
    Capability,
    Delta,
    Finish,
    GenerationRequest,
    TokenizedPrompt,
)

log = logging.getLogger("backends.exllama")


class LoadedModel(EngineModel, Tokenizer, Protocol):
    """A model a version's loader has put on the GPU, with its generator."""

    @property
    def plan(self) -> EnginePlan: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end generation (EOS and the generation config's extra ones)."""
        ...

    def describe(self) -> str:
        """One line for the log: library, cache format, paging."""
        ...

    def unload(self) -> None: ...


Loader = Callable[[str, ExllamaModelConfig], LoadedModel]


class AsyncSink:
    """Hands the engine thread's items to a coroutine on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Delta | GatewayError] = asyncio.Queue()

    def put(self, item: Delta | GatewayError) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Delta | GatewayError:
        return await self._queue.get()


@dataclass(frozen=True, slots=True)
class _Loaded:
    model: LoadedModel
    prompts: PromptBuilder
    engine: EngineLoop
    chat_format: ChatFormat
    grammars: Grammars


CAPABILITIES = frozenset(
    {Capability.STREAMING, Capability.COMPLETIONS, Capability.TOOLS, Capability.JSON_SCHEMA}
)


def model_chat_format(config: ExllamaModelConfig, facts: TokenizerFacts) -> ChatFormat:
    """The chat format from the template (or the configured ``tool_format``), its markers
    that are added tokens of ``tokenizer.json`` named by id."""
    fmt = chat_format(facts.chat_template or "", config.tool_format)
    added = added_tokens(config.model_dir)
    return replace(fmt, special={m: added[m] for m in fmt.markers if m in added})


class ExllamaBackend:
    """A model served by an ExLlama dynamic generator on its own engine thread."""

    def __init__(self, name: str, config: ExllamaModelConfig, loader: Loader, library: str) -> None:
        self.name = name
        self.config = config
        self.library = library
        self._loader = loader
        self._loaded: _Loaded | None = None

    @property
    def info(self) -> BackendInfo:
        if self._loaded is None:  # before start(): what the config says
            return BackendInfo(
                context_length=self.config.kv_cache.max_seq_len or 0,
                max_concurrent=self.config.batching.max_concurrent,
                batching=BatchingKind.CONTINUOUS,
                capabilities=CAPABILITIES,
            )
        plan = self._loaded.model.plan
        return BackendInfo(
            context_length=plan.max_seq_len,
            max_concurrent=plan.max_concurrent,
            batching=BatchingKind.CONTINUOUS if plan.paged else BatchingKind.SERIAL,
            capabilities=CAPABILITIES,
        )

    @property
    def chat_format(self) -> ChatFormat | None:
        """The loaded model's chat format: the core parses and constrains its output."""
        return None if self._loaded is None else self._loaded.chat_format

    async def start(self) -> None:
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(self._load)

    def _load(self) -> _Loaded:
        cfg = self.config
        if not cfg.model_dir.is_dir():
            raise EngineError(f"model {self.name!r}: model_dir {cfg.model_dir} is not a directory")
        try:
            facts = TokenizerFacts.from_model_dir(cfg.model_dir, cfg.chat_template_file)
        except ModelDirError as err:
            raise EngineError(f"model {self.name!r}: {err}") from err
        fmt = model_chat_format(cfg, facts)
        model = self._loader(self.name, cfg)
        try:
            prompts = PromptBuilder(
                self.name,
                facts,
                model,
                render_timeout_s=cfg.template_render_timeout_s,
                max_output_chars=cfg.template_max_output_bytes,
                fmt=fmt,
            )
        except ValueError as err:
            model.unload()
            raise EngineError(f"model {self.name!r}: {err}") from err
        engine = EngineLoop(model, self.name)
        engine.start()
        try:
            bos = [] if model.bos_token_id is None else [model.bos_token_id]
            engine.warm_up([*bos, *model.encode("Hello", special=False)])
        except Exception as err:
            engine.stop()
            model.unload()
            raise EngineError(f"model {self.name!r}: {err}") from err
        plan = model.plan
        log.info(
            "model %s: %s; context %d tokens, cache %d tokens, batch %d, prefill chunk %d%s",
            self.name,
            model.describe(),
            plan.max_seq_len,
            plan.cache_tokens,
            plan.max_batch_size,
            plan.chunk_tokens,
            "" if facts.chat_template else "; no chat template (completions only)",
        )
        grammars = model_grammars(cfg.model_dir, model.vocab_size, model.stop_token_ids)
        return _Loaded(model, prompts, engine, fmt, grammars)

    async def aclose(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return

        def close() -> None:
            loaded.engine.stop()
            loaded.model.unload()

        await asyncio.to_thread(close)

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The loaded model (its generator, for tests and debugging), or None."""
        return None if self._loaded is None else self._loaded.model

    def stats(self) -> EngineStats:
        return EngineStats() if self._loaded is None else self._loaded.engine.stats()

    @property
    def failure(self) -> str | None:
        """Why the engine loop crashed, if it did (the pool then reloads the model)."""
        return None if self._loaded is None else self._loaded.engine.failure

    def _require(self) -> _Loaded:
        if self._loaded is None:
            raise ModelUnavailable(f"model {self.name!r} is not loaded")
        return self._loaded

    async def validate(self, request: GenerationRequest) -> TokenizedPrompt:
        loaded = self._require()
        prompt = await asyncio.to_thread(loaded.prompts.tokenize, request)
        job_spec(request, list(prompt.tokens), loaded.model)
        grammar = request_grammar(replace(request, tokenized=prompt))
        if grammar is not None:  # compiled and cached now: a 400 before the request queues
            await asyncio.to_thread(loaded.grammars.compile, *grammar)
        return prompt

    async def _job_spec(self, request: GenerationRequest) -> JobSpec:
        loaded = self._require()
        tokenized = request.tokenized
        if tokenized is None or not tokenized.tokens:  # a direct caller: validated now
            request = replace(request, tokenized=await self.validate(request))
        assert request.tokenized is not None
        spec = job_spec(request, list(request.tokenized.tokens), loaded.model)
        grammar = request_grammar(request)
        constraint = None
        if grammar is not None:
            stops = loaded.model.stop_token_ids
            steer = self.config.budget_steering
            budget = Budget(request, spec.max_new_tokens) if steer else None
            make = loaded.grammars.constraint
            constraint = await asyncio.to_thread(make, *grammar, stops, budget)
        shows = request.output is not None and bool(loaded.chat_format.special)
        return replace(spec, constraint=constraint, decode_special=shows)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        loaded = self._require()
        spec = await self._job_spec(request)
        sink = AsyncSink(asyncio.get_running_loop())
        ticket: Ticket = loaded.engine.submit(
            spec, stops=request.stop, prompt_tokens=len(spec.input_ids), sink=sink
        )
        done = False
        try:
            while not done:
                item = await sink.get()
                if isinstance(item, GatewayError):
                    done = True
                    raise item
                done = isinstance(item, Finish)
                yield item
        finally:
            if not done:
                loaded.engine.cancel(ticket)


class _Limits(Protocol):
    @property
    def plan(self) -> EnginePlan: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def stop_token_ids(self) -> tuple[int, ...]: ...


def job_spec(request: GenerationRequest, ids: list[int], model: _Limits) -> JobSpec:
    """Check a tokenized request against the model's limits and size its completion.

    Raises :class:`ContextLengthExceeded` when the prompt plus ``max_tokens`` (or the prompt
    alone, leaving no room) exceeds the context, and :class:`InvalidRequest` for an empty
    prompt or a ``logit_bias`` token outside the vocabulary.
    """
    param = request.prompt_param
    if not ids:
        raise InvalidRequest("the prompt is empty (it tokenizes to no tokens)", param=param)
    limit, n = model.plan.max_seq_len, len(ids)
    if n + (request.max_tokens or 1) > limit:
        raise context_length_exceeded(limit, n, request.max_tokens, param)
    bad = [t for t, _ in request.sampling.logit_bias if not 0 <= t < model.vocab_size]
    if bad:
        raise InvalidRequest(
            f"logit_bias: token ids {bad[:5]} are outside the vocabulary "
            f"(0..{model.vocab_size - 1})",
            param="logit_bias",
        )
    return JobSpec(
        input_ids=tuple(ids),
        max_new_tokens=request.max_tokens or limit - n,
        sampling=request.sampling,
        stop_token_ids=model.stop_token_ids,
    )
