"""Domain types that cross the backend seam: requests in, deltas out.

These are plain frozen dataclasses. The OpenAI wire schemas (pydantic) live in
``gateway.wire`` and are converted into these at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings, with the neutral value as default for each one."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate. A client request with ``n`` = k becomes k of these.

    Exactly one of ``messages`` (chat) and ``prompt`` (raw text completion) is set.
    ``max_tokens`` None means "up to the context limit".
    """

    request_id: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    index: int = 0

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages and prompt must be set")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, always whole UTF-8 characters, never part of a stop string.

    ``tokens`` is how many generated tokens this piece accounts for (for cancelled requests'
    usage and metrics; the final count is in :class:`Finish`).
    """

    text: str
    tokens: int = 1


@dataclass(frozen=True, slots=True)
class Finish:
    """The last delta of every successful stream."""

    reason: FinishReason
    usage: Usage


Delta = TextDelta | Finish

Endpoint = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One parsed client request: the model asked for and one generation per choice."""

    endpoint: Endpoint
    model: str
    generations: tuple[GenerationRequest, ...]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False

    @property
    def n(self) -> int:
        return len(self.generations)


class Capability(StrEnum):
    STREAMING = "streaming"
    LOGPROBS = "logprobs"
    TOOLS = "tools"
    JSON_SCHEMA = "json_schema"
    IMAGES = "images"
    TOKEN_PROMPTS = "token_prompts"


class BatchingKind(StrEnum):
    CONTINUOUS = "continuous"
    SERIAL = "serial"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a loaded backend can do; the core checks requests against it."""

    context_length: int
    max_concurrent: int
    batching: BatchingKind
    capabilities: frozenset[Capability] = frozenset({Capability.STREAMING})
    owned_by: str = "gateway"
