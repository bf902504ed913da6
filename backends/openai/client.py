"""One replica's HTTP client, and one streamed request to it under the configured timeouts.

The upstream request always streams and always asks for usage; the core builds non-streaming
responses by collecting the deltas. Timeouts are applied per SSE event, so a replica's
keep-alive comments cannot keep a stalled generation alive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import suppress
from typing import TypeVar

import httpx

from backends.openai import messages
from backends.openai.config import OpenAIConfig, TimeoutsConfig
from backends.openai.errors import ReplicaFailed, UpstreamError, UpstreamTimeout, upstream_error
from backends.openai.messages import MessagesDecoder
from backends.openai.stream import ChunkDecoder, sse_data
from gateway.types import ChatMessage, Delta, EmbeddingDelta, Finish, GenerationRequest, Usage

T = TypeVar("T")
_ERROR_BODY_LIMIT = 64 * 1024


def _message_json(m: ChatMessage) -> dict[str, object]:
    out: dict[str, object] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def embeddings_body(request: GenerationRequest, model: str) -> bytes:
    """One input to embed, as floats (the core encodes the client's ``encoding_format``)."""
    assert request.embed is not None
    body: dict[str, object] = {"model": model, "encoding_format": "float"}
    body["input"] = request.prompt if request.prompt is not None else request.prompt_tokens
    if request.embed.dimensions is not None:
        body["dimensions"] = request.embed.dimensions
    return json.dumps(body, ensure_ascii=False).encode()


def in_kind(request: GenerationRequest, messages_api: bool) -> bool:
    """The request goes to the replicas' ``/v1/messages`` (it came in on the Messages API and
    they serve it), not as a chat completion."""
    return messages_api and request.wire_api == "messages" and request.is_chat


def request_body(request: GenerationRequest, model: str, messages_api: bool = False) -> bytes:
    """The upstream JSON body: one choice, streamed, usage included; neutral samplers omitted
    (a replica that does not know ``top_k`` then never sees it). Fields the model's declared
    capabilities let through (``tools``, ``response_format``...) go as the client sent them.
    A Messages request to replicas that serve that API goes in kind."""
    if request.embed is not None:
        return embeddings_body(request, model)
    if in_kind(request, messages_api):
        return messages.messages_body(request, model)
    body: dict[str, object] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.messages is not None:
        body["messages"] = [_message_json(m) for m in request.messages]
    elif request.prompt_tokens is not None:
        body["prompt"] = list(request.prompt_tokens)
    else:
        body["prompt"] = request.prompt
    s = request.sampling
    body["temperature"] = s.temperature
    optional: dict[str, object] = {
        "top_p": s.top_p if s.top_p != 1.0 else None,
        "top_k": s.top_k or None,
        "min_p": s.min_p or None,
        "presence_penalty": s.presence_penalty or None,
        "frequency_penalty": s.frequency_penalty or None,
        "repetition_penalty": s.repetition_penalty if s.repetition_penalty != 1.0 else None,
        "seed": s.seed,
        "logit_bias": {str(t): b for t, b in s.logit_bias} or None,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop) or None,
        # the prefix-cache partition (vLLM's name; this gateway's too): a key's salt travels on
        "cache_salt": request.cache_salt,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update({name: json.loads(raw) for name, raw in request.passthrough})
    return json.dumps(body, ensure_ascii=False).encode()


class _Clock:
    """The deadlines of one upstream request, in event-loop time."""

    def __init__(self, timeouts: TimeoutsConfig) -> None:
        self.timeouts = timeouts
        now = asyncio.get_running_loop().time()
        self.total_at = now + timeouts.total_s
        self.first_byte_at = min(now + timeouts.first_byte_s, self.total_at)

    def next_chunk_at(self) -> float:
        now = asyncio.get_running_loop().time()
        return min(now + self.timeouts.between_chunks_s, self.total_at)

    def why(self, deadline: float, started: bool) -> str:
        t = self.timeouts
        if deadline >= self.total_at:
            return f"did not finish within total_s={t.total_s:g}"
        if started:
            return f"sent no chunk for between_chunks_s={t.between_chunks_s:g}"
        return f"sent no text within first_byte_s={t.first_byte_s:g}"


class ReplicaClient:
    """The connection pool to one replica."""

    def __init__(self, url: str, config: OpenAIConfig, api_key: str | None) -> None:
        self.url = url
        self.config = config
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
            if config.messages_api:  # Anthropic's own API reads only this one
                headers["x-api-key"] = api_key
        t = config.timeouts
        self.http = httpx.AsyncClient(
            base_url=url,
            headers=headers,
            # read=None: per-event deadlines below (keep-alive comments must not reset them)
            timeout=httpx.Timeout(connect=t.connect_s, read=None, write=t.connect_s, pool=t.pool_s),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.pool.max_keepalive_connections,
                keepalive_expiry=config.pool.keepalive_expiry_s,
            ),
            trust_env=False,  # no proxy or netrc from the environment
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _within(self, deadline: float, why: str, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except TimeoutError:
            raise ReplicaFailed(UpstreamTimeout(f"a replica {why}"), f"{self.url} {why}") from None
        except httpx.RequestError as err:
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise ReplicaFailed(
                UpstreamError(f"a replica could not be reached: {type(err).__name__}"),
                f"{self.url}: {detail}",
            ) from None

    async def generate(
        self, request: GenerationRequest, body: bytes
    ) -> AsyncGenerator[Delta, None]:
        """The deltas of one upstream request. Raises :class:`ReplicaFailed` when this replica
        failed, or the client's :class:`GatewayError` when the replica rejected the request.
        Closing the generator closes the upstream connection at once."""
        if request.embed is not None:
            for delta in await self.embed(request, body):
                yield delta
            return
        clock = _Clock(self.config.timeouts)
        native = in_kind(request, self.config.messages_api)
        path = "/v1/chat/completions" if request.is_chat else "/v1/completions"
        headers = {"content-type": "application/json"}
        if native:
            path = messages.PATH
            headers.update(messages.HEADERS)
        upstream = self.http.build_request("POST", path, content=body, headers=headers)
        no_headers = clock.why(clock.first_byte_at, False)
        response = await self._within(
            clock.first_byte_at, no_headers, self.http.send(upstream, stream=True)
        )
        try:
            if response.status_code != 200:
                raw = await self._within(clock.first_byte_at, no_headers, _read_some(response))
                raise upstream_error(response.status_code, raw, response.headers.get("retry-after"))
            decoder: ChunkDecoder | MessagesDecoder = (
                MessagesDecoder() if native else ChunkDecoder(chat=request.is_chat)
            )
            events = sse_data(response.aiter_lines())
            deadline = clock.first_byte_at
            while not decoder.done:
                why = clock.why(deadline, decoder.pieces > 0)
                data = await self._within(deadline, why, anext(events, None))
                if data is None:
                    break
                for delta in decoder.feed(data):
                    yield delta
                if decoder.pieces:
                    deadline = clock.next_chunk_at()
            if not decoder.finished:
                ended = "ended the stream early"
                raise ReplicaFailed(UpstreamError(f"a replica {ended}"), f"{self.url} {ended}")
            if decoder.done:  # read to the end, so the connection goes back to the pool
                with suppress(ReplicaFailed):
                    await self._within(clock.next_chunk_at(), "", _drain(events))
            yield decoder.finish()
        finally:
            await response.aclose()

    async def embed(self, request: GenerationRequest, body: bytes) -> list[Delta]:
        """One input's embedding, from the replica's ``/v1/embeddings``."""
        clock = _Clock(self.config.timeouts)
        why = clock.why(clock.first_byte_at, False)
        post = self.http.post(
            "/v1/embeddings", content=body, headers={"content-type": "application/json"}
        )
        response = await self._within(clock.first_byte_at, why, post)
        if response.status_code != 200:
            raw = response.content[:_ERROR_BODY_LIMIT]
            raise upstream_error(response.status_code, raw, response.headers.get("retry-after"))
        vector, usage = _embedding(response.content)
        if vector is None:
            none = "sent no embedding"
            raise ReplicaFailed(UpstreamError(f"a replica {none}"), f"{self.url} {none}")
        return [EmbeddingDelta(vector), Finish("stop", usage)]

    async def context_length(self, model: str, timeout_s: float) -> int | None:
        """What the replica's ``/v1/models`` reports for ``model`` (``max_model_len``: vLLM and
        this gateway), if anything. Asked once at start; llama-cpp-python's server takes its
        model lock for this route."""
        try:
            response = await self.http.get("/v1/models", timeout=timeout_s)
            models = response.json().get("data") if response.is_success else None
        except (httpx.RequestError, ValueError, AttributeError):
            return None
        for entry in models if isinstance(models, list) else ():
            if isinstance(entry, dict) and entry.get("id") == model:
                for key in ("max_model_len", "context_length"):
                    value = entry.get(key)
                    if isinstance(value, int) and value > 0:
                        return value
        return None


def _embedding(raw: bytes) -> tuple[tuple[float, ...] | None, Usage]:
    try:
        body = json.loads(raw)
        data = body["data"][0]["embedding"]
        vector = tuple(float(x) for x in data)
    except (ValueError, KeyError, IndexError, TypeError):
        return None, Usage()
    usage = body.get("usage") if isinstance(body, dict) else None
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vector, Usage(prompt_tokens=prompt if isinstance(prompt, int) and prompt >= 0 else 0)


async def _drain(events: AsyncIterator[str]) -> None:
    async for _ in events:
        pass


async def _read_some(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= _ERROR_BODY_LIMIT:
            break
    return b"".join(chunks)[:_ERROR_BODY_LIMIT]
