"""The :class:`gateway.backend.Backend` for llama.cpp: asyncio on one side, the engine on the
other.

``validate`` renders and tokenizes the prompt (in a worker thread: templates and long prompts
take time) and checks it against the slot's context. ``stream`` hands a job to the engine thread
and relays its deltas from a per-request :class:`asyncio.Queue`, which the engine feeds with
``loop.call_soon_threadsafe``. Leaving ``stream`` early, however it happens, cancels the job in
the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from backends.llamacpp.config import LlamaCppConfig
from gateway.backend import EngineStats
from gateway.errors import ContextLengthExceeded, InvalidRequest, ModelUnavailable
from gateway.types import (
    BackendInfo,
    BatchingKind,
    ChatMessage,
    Delta,
    Finish,
    GenerationRequest,
)

if TYPE_CHECKING:
    from backends.llamacpp.engine import Engine, Item
    from backends.llamacpp.model import LoadedModel

log = logging.getLogger("backends.llamacpp")

_PromptKey = tuple[tuple[ChatMessage, ...] | None, str | None]


class LlamaCppBackend:
    def __init__(self, name: str, config: LlamaCppConfig) -> None:
        self.name = name
        self.config = config
        self.n_live = config.batching.max_concurrent
        self._engine: Engine | None = None
        self._model: LoadedModel | None = None
        self._info = BackendInfo(
            context_length=config.kv_cache.n_ctx_per_slot,
            max_concurrent=self.n_live,
            batching=BatchingKind.CONTINUOUS,
            owned_by="llama.cpp",
        )
        #: Prompt tokens from ``validate``, reused by ``stream`` (n > 1 shares one entry).
        self._prompts: OrderedDict[_PromptKey, list[int]] = OrderedDict()

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self) -> None:
        from backends.llamacpp.engine import Engine
        from backends.llamacpp.model import LoadedModel, describe

        cfg = self.config
        n_seq = self.n_live + (cfg.kv_cache.cached_prefixes if cfg.kv_cache.prefix_reuse else 0)
        n_batch = cfg.batching.prefill_chunk_tokens + self.n_live
        log.info("model %s: loading %s", self.name, describe(cfg.model_path))
        started = time.perf_counter()
        model = await asyncio.to_thread(LoadedModel, cfg, n_seq, n_batch)
        self._model = model
        self._info = BackendInfo(
            context_length=model.n_ctx_slot,
            max_concurrent=self.n_live,
            batching=BatchingKind.CONTINUOUS,
            owned_by="llama.cpp",
        )
        self._engine = Engine(self.name, model, n_live=self.n_live)
        self._engine.start()
        log.info(
            "model %s: loaded in %.2f s (%d slots x %d tokens, %d KV cells, %d threads)",
            self.name,
            time.perf_counter() - started,
            self.n_live,
            model.n_ctx_slot,
            cfg.n_ctx_total,
            cfg.batching.n_threads,
        )

    async def aclose(self) -> None:
        engine, self._engine, self._model = self._engine, None, None
        if engine is not None:
            engine.stop()
            await asyncio.to_thread(engine.join)

    def stats(self) -> EngineStats:
        return self._engine.stats() if self._engine is not None else EngineStats()

    @property
    def failure(self) -> str | None:
        """Why the engine thread died, if it did (the model must then be reloaded)."""
        failure = self._engine.failure if self._engine is not None else None
        return None if failure is None else str(failure)

    def _require(self) -> tuple[Engine, LoadedModel]:
        if self._engine is None or self._model is None:
            raise ModelUnavailable(f"model {self.name!r} is not loaded")
        if self._engine.failure is not None:
            raise ModelUnavailable(f"model {self.name!r} failed: {self._engine.failure}")
        return self._engine, self._model

    async def validate(self, request: GenerationRequest) -> int:
        _, model = self._require()
        self._check_params(request, model.tokenizer.n_vocab)
        prompt = await self._prompt(request, model)
        self._check_length(request, len(prompt), model.n_ctx_slot)
        return len(prompt)

    async def _prompt(self, request: GenerationRequest, model: LoadedModel) -> list[int]:
        key: _PromptKey = (request.messages, request.prompt)
        tokens = self._prompts.get(key)
        if tokens is None:
            tokens = await asyncio.to_thread(model.prompt_builder.tokens, request)
            self._prompts[key] = tokens
            while len(self._prompts) > 64:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return tokens

    def _check_params(self, request: GenerationRequest, n_vocab: int) -> None:
        for token, _ in request.sampling.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidRequest(
                    f"logit_bias: token id {token} is not in this model's vocabulary "
                    f"(0..{n_vocab - 1})",
                    param="logit_bias",
                )

    def _check_length(self, request: GenerationRequest, n_prompt: int, limit: int) -> None:
        where = "messages" if request.is_chat else "prompt"
        wanted = n_prompt + (request.max_tokens or 1)
        if wanted <= limit:
            return
        if request.max_tokens is None:
            detail = f"your {where} resulted in {n_prompt} tokens"
        else:
            detail = (
                f"you requested {n_prompt + request.max_tokens} tokens ({n_prompt} in the "
                f"{where}, {request.max_tokens} in the completion)"
            )
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, {detail}. "
            f"Please reduce the length of the {where} or completion.",
            param=where,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        from backends.llamacpp.engine import Job

        engine, model = self._require()
        self._check_params(request, model.tokenizer.n_vocab)
        prompt = await self._prompt(request, model)
        self._check_length(request, len(prompt), model.n_ctx_slot)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Item]] = asyncio.Queue()

        def deliver(items: list[Item]) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, items)

        limit = model.n_ctx_slot - len(prompt)
        job = Job(
            request_id=request.request_id,
            prompt=prompt,
            max_new=min(request.max_tokens or limit, limit),
            params=request.sampling,
            stop=request.stop,
            deliver=deliver,
        )
        engine.submit(job)
        finished = False
        try:
            while True:
                for item in await queue.get():
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    if isinstance(item, Finish):
                        finished = True
                    yield item
                    if finished:
                        return
        finally:
            if not finished:
                engine.cancel(job)
