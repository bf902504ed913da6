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
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import TYPE_CHECKING

from backends.llamacpp.config import LlamaCppConfig
from backends.llamacpp.kv_tiers import SharedTiers, salt_digest
from gateway.backend import EngineStats
from gateway.errors import InvalidRequest, ModelUnavailable, context_length_exceeded
from gateway.kv_events.events import KVEventSink
from gateway.kv_events.ledger import BlockLedger
from gateway.output.finish.steering import Budget
from gateway.output.formats import ChatFormat
from gateway.output.matchers import request_grammar
from gateway.types import (
    BackendInfo,
    BatchingKind,
    Capability,
    Delta,
    Finish,
    GenerationRequest,
    TokenizedPrompt,
)

if TYPE_CHECKING:
    from backends.llamacpp.decoding import Item
    from backends.llamacpp.embeddings import EmbedSpec
    from backends.llamacpp.engine import Engine
    from backends.llamacpp.kv_tiers import KVTiers
    from backends.llamacpp.model import LoadedModel

log = logging.getLogger("backends.llamacpp")


def capabilities(config: LlamaCppConfig) -> frozenset[Capability]:
    if config.embeddings:
        return frozenset({Capability.EMBEDDINGS})
    return frozenset(
        {
            Capability.STREAMING,
            Capability.COMPLETIONS,
            Capability.EMBEDDINGS,
            Capability.TOOLS,
            Capability.JSON_SCHEMA,
            Capability.LOGPROBS,
        }
    )


class LlamaCppBackend:
    def __init__(self, name: str, config: LlamaCppConfig, tiers: SharedTiers | None = None) -> None:
        self.name = name
        self.config = config
        self.n_live = config.batching.max_concurrent
        self._engine: Engine | None = None
        self._model: LoadedModel | None = None
        #: The KV tiers outlive each load (an unloaded model's prefixes wait there).
        self._shared = tiers if tiers is not None else SharedTiers()
        self._info = self._describe(config.kv_cache.n_ctx_per_slot)
        #: Where the cache's blocks are announced (KV events), and in blocks of how many tokens.
        self._kv_events: tuple[KVEventSink, int] | None = None

    def publish_kv_events(self, sink: KVEventSink, block_size: int) -> None:
        self._kv_events = (sink, block_size)

    def _describe(self, context_length: int) -> BackendInfo:
        return BackendInfo(
            context_length=context_length,
            max_concurrent=self.n_live,
            batching=BatchingKind.CONTINUOUS,
            capabilities=capabilities(self.config),
            owned_by="llama.cpp",
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def chat_format(self) -> ChatFormat | None:
        """The loaded model's chat format: the core parses and constrains its output."""
        return self._model.chat_format if self._model is not None else None

    async def start(self) -> None:
        from backends.llamacpp.draft_model import load as load_draft
        from backends.llamacpp.engine import Engine
        from backends.llamacpp.model import LoadedModel, describe

        cfg = self.config
        n_batch = cfg.n_batch
        if cfg.embeddings:  # an encoder reads its whole input in one batch
            n_batch = max(n_batch, cfg.kv_cache.n_ctx_per_slot)
        log.info("model %s: loading %s", self.name, describe(cfg.model_path))
        started = time.perf_counter()
        model = await asyncio.to_thread(LoadedModel, cfg, cfg.n_seq, n_batch)
        try:
            draft = await asyncio.to_thread(load_draft, model)
        except BaseException:
            model.close()
            raise
        self._model = model
        self._info = self._describe(model.n_ctx_slot)
        if not self._shared.opened:
            self._shared.tiers = await asyncio.to_thread(self._open_tiers)
            self._shared.opened = True
        self._engine = Engine(
            self.name, model, n_live=self.n_live, tiers=self._shared.tiers, draft=draft,
            blocks=self._announce(),
        )  # fmt: skip
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

    def _announce(self) -> BlockLedger | None:
        """The cells' block ledger (KV events on); the tiers' blocks announced (once for a
        sink and block size)."""
        if self._kv_events is None or self.config.embeddings:
            return None
        sink, block_size = self._kv_events
        tiers = self._shared.tiers
        if tiers is not None:
            tiers.announce(sink, block_size)
        return BlockLedger("GPU", block_size, sink)

    @property
    def tiers(self) -> KVTiers | None:
        """The model's KV tiers (None if off, or until its first load)."""
        return self._shared.tiers

    def _open_tiers(self) -> KVTiers | None:
        from backends.llamacpp.kv_tiers import Layout, open_tiers

        kv = self.config.kv_cache
        if not kv.prefix_reuse or self.config.embeddings:
            return None
        layout = Layout(kv.type_k, kv.type_v, self.config.flash_attn)
        return open_tiers(
            self.config.model_path, host_bytes=kv.host_cache_bytes,
            disk_bytes=kv.disk_cache_bytes, disk_dir=kv.disk_dir(), layout=layout,
        )  # fmt: skip

    async def aclose(self) -> None:
        engine, self._engine, self._model = self._engine, None, None
        if engine is not None:
            engine.stop()
            await asyncio.to_thread(engine.join)
        if self._shared.tiers is not None:
            await asyncio.to_thread(self._shared.tiers.flush)

    def stats(self) -> EngineStats:
        stats = self._engine.stats() if self._engine is not None else EngineStats()
        tiers = self._shared.tiers
        if tiers is None:
            return stats
        t = tiers.stats
        return replace(
            stats, kv_tier_hits=t.hits, kv_tier_misses=t.misses, kv_tier_saved=t.saved,
            kv_tier_restored_tokens=t.restored_tokens, kv_tier_restore_seconds=t.restore_s,
            kv_host_tier_bytes=tiers.host.bytes if tiers.host else 0,
            kv_disk_tier_bytes=tiers.disk.bytes if tiers.disk else 0,
        )  # fmt: skip

    def cache_tiers(self) -> dict[str, object] | None:
        tiers = self._shared.tiers
        return tiers.usage() if tiers is not None else None

    @property
    def failure(self) -> str | None:
        """Why the engine thread died, if it did (the model must then be reloaded)."""
        failure = self._engine.failure if self._engine is not None else None
        return None if failure is None else str(failure)

    def _require(self) -> tuple[Engine, LoadedModel]:
        if self._engine is None or self._model is None:
            raise ModelUnavailable(f"model {self.name!r} is not loaded")
        if self._engine.failure is not None:
            # the reason was logged when the engine failed; /admin shows it
            raise ModelUnavailable(f"model {self.name!r} failed (the server log has the reason)")
        return self._engine, self._model

    async def validate(self, request: GenerationRequest) -> TokenizedPrompt:
        _, model = self._require()
        self._check_params(request, model)
        prompt = await asyncio.to_thread(model.prompt_builder.tokenize, request)
        self._check_length(request, prompt.count, model.n_ctx_slot)
        grammar = request_grammar(replace(request, tokenized=prompt))
        if grammar is not None:  # compiled and cached now: a 400 before the request queues
            await asyncio.to_thread(model.grammars.compile, *grammar)
        return prompt

    async def _validated(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with what ``validate`` found (validated now for a direct caller)."""
        tokenized = request.tokenized
        if tokenized is None or not tokenized.tokens:
            request = replace(request, tokenized=await self.validate(request))
        return request

    def _check_params(self, request: GenerationRequest, model: LoadedModel) -> None:
        n_vocab = model.tokenizer.n_vocab
        for token, _ in request.sampling.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidRequest(
                    f"logit_bias: token id {token} is not in this model's vocabulary "
                    f"(0..{n_vocab - 1})",
                    param="logit_bias",
                )
        dimensions = request.embed.dimensions if request.embed is not None else None
        if dimensions is not None and dimensions > model.n_embd:
            raise InvalidRequest(
                f"dimensions = {dimensions}: model {self.name!r} makes {model.n_embd}-dimensional "
                "embeddings (it can only shorten them)",
                param="dimensions",
            )

    def _check_length(self, request: GenerationRequest, n_prompt: int, limit: int) -> None:
        if request.embed is not None:  # an input to embed: nothing is generated
            if n_prompt > limit:
                raise context_length_exceeded(limit, n_prompt, None, "input")
        elif n_prompt + (request.max_tokens or 1) > limit:
            raise context_length_exceeded(limit, n_prompt, request.max_tokens, request.prompt_param)

    def _embedding(self, request: GenerationRequest, model: LoadedModel) -> EmbedSpec | None:
        from backends.llamacpp.embeddings import EmbedSpec

        if request.embed is None:
            return None
        return EmbedSpec(
            pooling=model.pooling,
            dimensions=request.embed.dimensions,
            normalize=self.config.normalize_embeddings,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        from backends.llamacpp.engine import Job

        engine, model = self._require()
        request = await self._validated(request)
        assert request.tokenized is not None
        prompt = list(request.tokenized.tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Item]] = asyncio.Queue()

        def deliver(items: list[Item]) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, items)

        limit = model.n_ctx_slot - len(prompt)
        max_new = min(request.max_tokens or limit, limit)
        grammar = request_grammar(request)
        constraint = None
        if grammar is not None:
            stops = (model.tokenizer.eos,)
            budget = Budget(request, max_new) if model.config.budget_steering else None
            make = model.grammars.constraint
            constraint = await asyncio.to_thread(make, *grammar, stops, budget)
        job = Job(
            request_id=request.request_id,
            prompt=prompt,
            max_new=max_new,
            params=request.sampling,
            stop=request.stop,
            deliver=deliver,
            embed=self._embedding(request, model),
            constraint=constraint,
            logprobs=request.logprobs,
            salt=salt_digest(request.cache_salt),
            progress=request.progress,
        )
        tiers = self._shared.tiers if job.embed is None else None
        found = tiers.on_disk(prompt, job.salt) if tiers is not None else None
        if tiers is not None and found is not None:  # read off the event loop and the engine
            await asyncio.to_thread(tiers.prefetch, found)
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
