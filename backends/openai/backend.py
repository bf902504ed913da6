"""A model served by a fleet of remote OpenAI-compatible replicas (vLLM, llama-server, this
gateway...): balancing, retries before the first byte, ejection, fallback to another model.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import assert_never

from backends.openai.balance import make_balancer
from backends.openai.client import ReplicaClient, request_body
from backends.openai.config import OpenAIConfig
from backends.openai.errors import ReplicaFailed
from backends.openai.health import HealthMonitor
from backends.openai.replicas import Replica
from gateway.backend import Declared, EngineStats, ModelRouter
from gateway.errors import (
    GatewayError,
    ModelNotFound,
    ModelUnavailable,
    context_length_exceeded,
)
from gateway.types import (
    BackendInfo,
    BatchingKind,
    Capability,
    Delta,
    EmbeddingDelta,
    Finish,
    GenerationRequest,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    TokenizedPrompt,
    ToolCallDelta,
)

log = logging.getLogger("backends.openai")


class FleetConfigError(Exception):
    """The model's table cannot work (a missing API key variable, a bad fallback...)."""


class OpenAIBackend:
    def __init__(self, name: str, config: OpenAIConfig) -> None:
        self.name = name
        self.config = config
        self.upstream_model = config.upstream_model or name
        self.replicas = self._fresh_replicas()
        self._balancer = make_balancer(config.balancing, config.affinity)
        self._clients: dict[str, ReplicaClient] = {}
        self.health: HealthMonitor | None = None
        self._router: ModelRouter | None = None
        self._info: BackendInfo | None = None
        #: Counters for stats() and tests.
        self.retries = 0
        self.fallbacks = 0
        self.cancelled = 0
        self.tokens_generated = 0
        self.cached_prompt_tokens = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise RuntimeError(f"model {self.name!r} is not started")
        return self._info

    def declared(self) -> Declared:
        """What the config says before the replicas are asked (``/v1/models`` lists it)."""
        return Declared(self._capabilities(), self.config.context_length)

    def _capabilities(self) -> frozenset[Capability]:
        declared = {Capability(c) for c in self.config.capabilities}
        return frozenset({Capability.STREAMING, Capability.COMPLETIONS, *declared})

    def bind_router(self, router: ModelRouter) -> None:
        self._router = router

    def _fresh_replicas(self) -> tuple[Replica, ...]:
        h = self.config.health
        return tuple(
            Replica(r.url, r.weight, h.eject_after_failures, h.readmit_after_successes)
            for r in self.config.replicas
        )

    async def start(self) -> None:
        self._check_fallback()
        keys = self._api_keys()
        self.replicas = self._fresh_replicas()  # a reload after an idle unload starts afresh
        self._clients = {
            r.url: ReplicaClient(r.url, self.config, keys.get(r.url)) for r in self.replicas
        }
        self.health = HealthMonitor(self.replicas, self.config.health, keys)
        try:
            await self.health.probe_all()
            context_length = self.config.context_length or await self._reported_context_length()
        except BaseException:
            await self.aclose()
            raise
        self.health.start()
        self._info = BackendInfo(
            context_length=context_length,
            max_concurrent=self.config.batching.max_concurrent,
            batching=BatchingKind.REMOTE,
            capabilities=self._capabilities(),
        )
        up = sum(r.up for r in self.replicas)
        log.info("model %s: %d of %d replicas up", self.name, up, len(self.replicas))

    async def aclose(self) -> None:
        if self.health is not None:
            await self.health.aclose()
            self.health = None
        clients, self._clients = self._clients, {}
        await asyncio.gather(*(c.aclose() for c in clients.values()))

    def _api_keys(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for i, r in enumerate(self.config.replicas):
            if r.api_key_env is None:
                continue
            value = os.environ.get(r.api_key_env)
            if not value:
                raise FleetConfigError(
                    f"models.{self.name}.replicas[{i}].api_key_env: "
                    f"environment variable {r.api_key_env} is not set"
                )
            keys[r.url] = value
        return keys

    def _check_fallback(self) -> None:
        """The fallback must be another configured model, and no chain of fallbacks may loop."""
        name = self.config.fallback_model
        if name is None:
            return
        if self._router is None:
            raise FleetConfigError(f"model {self.name!r}: fallback_model needs the model pool")
        seen: list[object] = [self.config]
        path = [self.name]
        while name is not None:
            path.append(name)
            try:
                cfg = self._router.model_config(name)
            except ModelNotFound:
                raise FleetConfigError(
                    f"models.{self.name}.fallback_model: no model {name!r} is configured"
                ) from None
            if any(cfg is s for s in seen):
                loop = " -> ".join(path)
                raise FleetConfigError(f"models.{self.name}.fallback_model: a loop ({loop})")
            seen.append(cfg)
            name = cfg.fallback_model if isinstance(cfg, OpenAIConfig) else None

    async def _reported_context_length(self) -> int:
        timeout_s = self.config.health.timeout_s
        for replica in self.up_replicas:
            found = await self._clients[replica.url].context_length(self.upstream_model, timeout_s)
            if found is not None:
                return found
        raise FleetConfigError(
            f"models.{self.name}: no replica reports the context length of "
            f"{self.upstream_model!r}; set context_length"
        )

    # -- requests ----------------------------------------------------------------------------

    def _down(self) -> ModelUnavailable:
        return ModelUnavailable(
            f"every replica of model {self.name!r} is down",
            retry_after_s=self.config.health.interval_s,
        )

    async def validate(self, request: GenerationRequest) -> TokenizedPrompt:
        """Only what is knowable here: the prompt is tokenized by the replica, which answers a
        too-long prompt with its own 400 (passed on before any byte is sent)."""
        limit = self.info.context_length
        if request.max_tokens is not None and request.max_tokens >= limit:
            raise context_length_exceeded(
                limit, 1, request.max_tokens, request.prompt_param, at_least=True
            )
        if self.config.fallback_model is None and not any(r.up for r in self.replicas):
            raise self._down()
        return TokenizedPrompt()  # unknown until the replica reports usage

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        body = request_body(request, self.upstream_model, self.config.messages_api)
        tried: list[Replica] = []
        last: ReplicaFailed | None = None
        for _ in range(self.config.max_attempts):
            candidates = [r for r in self.replicas if r.up and r not in tried]
            if not candidates:
                break
            replica = self._balancer.pick(candidates, request)
            tried.append(replica)
            sent = False
            try:
                async with aclosing(self._attempt(replica, request, body)) as deltas:
                    async for delta in deltas:
                        sent = True
                        yield delta
                return
            except ReplicaFailed as failure:
                if sent:  # the client has bytes: no retry
                    raise failure.error from None
                last = failure
                self.retries += 1
                log.warning("request %s: %s; trying another replica", request.request_id, failure)
        if any(r.up and r not in tried for r in self.replicas):
            assert last is not None
            raise last.error  # max_attempts used up
        async with aclosing(self._fall_back(request, last)) as deltas:
            async for delta in deltas:
                yield delta

    async def _fall_back(
        self, request: GenerationRequest, last: ReplicaFailed | None
    ) -> AsyncGenerator[Delta, None]:
        name = self.config.fallback_model
        if name is None or self._router is None:
            raise last.error if last is not None else self._down()
        self.fallbacks += 1
        log.warning("request %s: every replica down; model %s serves it", request.request_id, name)
        async with aclosing(self._router.generate(name, request)) as deltas:
            async for delta in deltas:
                yield delta

    async def _attempt(
        self, replica: Replica, request: GenerationRequest, body: bytes
    ) -> AsyncGenerator[Delta, None]:
        """One try on one replica, with its outstanding count and health bookkeeping."""
        with replica.track():
            try:
                generate = self._clients[replica.url].generate(request, body)
                async with aclosing(generate) as deltas:
                    async for delta in deltas:
                        self._count(delta)
                        yield delta
            except ReplicaFailed as failure:
                replica.request_failed(failure.error.message)
                raise
            except GatewayError:  # the replica answered: the request was at fault
                replica.request_succeeded()
                raise
            except (GeneratorExit, asyncio.CancelledError):  # the client left: upstream closed
                self.cancelled += 1
                raise
            replica.request_succeeded()

    def _count(self, delta: Delta) -> None:
        match delta:
            case Finish(usage=usage):
                self.cached_prompt_tokens += usage.cached_tokens
            case (
                TextDelta(tokens=tokens)
                | ReasoningDelta(tokens=tokens)
                | ToolCallDelta(tokens=tokens)
            ):
                self.tokens_generated += tokens
            case EmbeddingDelta() | PromptProgress():
                pass
            case _:
                assert_never(delta)

    def stats(self) -> EngineStats:
        return EngineStats(
            active_sequences=sum(r.outstanding for r in self.replicas),
            tokens_generated=self.tokens_generated,
            cancelled=self.cancelled,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )

    def replica(self, url: str) -> Replica:
        return next(r for r in self.replicas if r.url == url.rstrip("/"))

    @property
    def up_replicas(self) -> Sequence[Replica]:
        return [r for r in self.replicas if r.up]
