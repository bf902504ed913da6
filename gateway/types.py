"""Domain types that cross the backend seam: requests in, deltas out.

These are plain frozen dataclasses. The OpenAI wire schemas (pydantic) live in
``gateway.wire`` and are converted into these at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.output.formats import ChatFormat

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolCallRef:
    """A tool call an assistant message made earlier in the conversation."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    name: str | None = None
    #: An assistant message's tool calls.
    tool_calls: tuple[ToolCallRef, ...] = ()
    #: A tool message: the call it answers.
    tool_call_id: str | None = None
    #: An assistant message's reasoning (``reasoning_content`` / ``reasoning``), fed back to
    #: templates that render it.
    reasoning: str | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call. ``parameters`` is its JSON schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'
    strict: bool = False
    #: The request field that holds ``parameters`` (named in a 400; None: chat's
    #: ``tools[i].function.parameters``).
    param: str | None = None
    #: A custom tool's input format, ``(syntax, definition)`` with syntax ``text`` (any
    #: text), ``lark`` or ``regex``: the model writes the input raw where its tool-call
    #: format can (``parameters`` is its JSON form, ``{"input": "..."}``). None: a function.
    freeform: tuple[str, str] | None = None


ToolChoiceMode = Literal["auto", "none", "required", "named"]
#: How many calls one answer may make when parallel calls are allowed.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True, slots=True)
class Tools:
    """A request's tools and how the model must use them (``name`` for a named choice)."""

    specs: tuple[ToolSpec, ...]
    choice: ToolChoiceMode = "auto"
    name: str | None = None
    parallel: bool = True
    #: The client's own cap on calls per answer (the Responses API's ``max_tool_calls``).
    limit: int | None = None

    @property
    def offered(self) -> tuple[ToolSpec, ...]:
        """The tools the model may call under the choice."""
        if self.choice == "none":
            return ()
        if self.choice == "named":
            return tuple(t for t in self.specs if t.name == self.name)
        return self.specs

    @property
    def max_calls(self) -> int:
        """How many calls one answer may make: a named choice is one call (as OpenAI and the
        clients that force a tool to get an answer expect), ``parallel_tool_calls`` false is
        one, otherwise up to :data:`MAX_PARALLEL_CALLS`."""
        calls = 1 if self.choice == "named" or not self.parallel else MAX_PARALLEL_CALLS
        return calls if self.limit is None else max(1, min(calls, self.limit))


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``response_format`` json_object (``schema`` None) or json_schema (JSON text)."""

    schema: str | None = None
    name: str = "response"
    strict: bool = False
    #: The request field that holds ``schema`` (named in a 400).
    param: str = "response_format.json_schema.schema"


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
class TokenizedPrompt:
    """What a backend's ``validate`` learned of a prompt, handed to its ``stream`` (the core
    sets it as :attr:`GenerationRequest.tokenized`): nothing is tokenized twice.

    ``tokens`` is empty where the backend cannot know them (a remote replica tokenizes)."""

    tokens: tuple[int, ...] = ()
    count: int = 0
    #: The rendered prompt ends inside the model's reasoning (a template that opens
    #: ``<think>`` in its generation prompt): the output starts with reasoning.
    reasoning_open: bool = False

    @classmethod
    def of(
        cls, tokens: tuple[int, ...] | list[int], *, reasoning_open: bool = False
    ) -> TokenizedPrompt:
        return cls(tuple(tokens), len(tokens), reasoning_open)


@dataclass(frozen=True, slots=True)
class EmbedParams:
    """Set on a :class:`GenerationRequest` that asks for an embedding instead of text."""

    #: Truncate the vector to this many dimensions and renormalize (None: the model's size).
    dimensions: int | None = None


#: A request field passed through unchanged to a backend that declares its capability (a
#: remote replica): the field's name and its JSON text, exactly as the client sent it.
Passthrough = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How an in-process backend renders and constrains one generation (built by the core
    from the request and the model's chat format).

    ``grammar`` is a Lark grammar for llguidance (None: unconstrained). ``template_tools`` are
    the tools as Hugging Face templates expect them (JSON text of the ``tools`` list; None:
    no tools for the template).
    """

    grammar: str | None = None
    #: The grammar when the prompt already opened the reasoning (None: as ``grammar``).
    grammar_open: str | None = None
    template_tools: str | None = None
    #: Parse tool calls out of the text (off for tool_choice none).
    parse_tools: bool = False
    #: The model's chat format the output is parsed with.
    format: ChatFormat | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate (or one input to embed). A client request with ``n`` = k
    becomes k of these; an embeddings request one per input.

    Exactly one of ``messages`` (chat), ``prompt`` (raw text) and ``prompt_tokens`` (a token
    array) is set. ``max_tokens`` None means "up to the context limit".
    """

    request_id: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    index: int = 0
    embed: EmbedParams | None = None
    passthrough: Passthrough = ()
    #: Set by the core from the backend's ``validate`` before ``stream`` is called.
    tokenized: TokenizedPrompt | None = None
    tools: Tools | None = None
    response_format: ResponseFormat | None = None
    #: Log probabilities of each generated token and this many alternatives (None: none).
    logprobs: int | None = None
    reasoning_effort: str | None = None
    #: What keeps one conversation on one replica of a fleet, when the client or the
    #: endpoint knows it (a Responses chain's first id, ``prompt_cache_key``).
    affinity: str | None = None
    #: Set by the core for a model whose output it parses (:mod:`gateway.output`): what the
    #: backend must enforce and how the prompt renders the tools.
    output: OutputPlan | None = None
    #: The last message is an assistant's answer begun by the client (a prefill): the
    #: generation continues it.
    continue_final: bool = False
    #: The wire API the request came in on, for a backend that can forward it in kind (a
    #: fleet whose replicas serve Anthropic's Messages API); None: OpenAI's.
    wire_api: str | None = None
    #: What partitions the prefix cache (vLLM's ``cache_salt``): a cached prefix is reused
    #: (and counted in ``cached_tokens``) only for a request with the same salt. The core mixes
    #: the caller's own salt (an API key's) into it; None: the unsalted partition.
    cache_salt: str | None = None
    #: Report how far the prompt has been read while it is (:class:`PromptProgress`), as
    #: llama-server's ``return_progress``: for a client showing a long prompt's progress.
    progress: bool = False

    def __post_init__(self) -> None:
        given = (self.messages, self.prompt, self.prompt_tokens)
        if sum(x is not None for x in given) != 1:
            raise ValueError("exactly one of messages, prompt and prompt_tokens must be set")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt (for errors that name it)."""
        if self.embed is not None:
            return "input"
        return "messages" if self.is_chat else "prompt"


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
    #: One entry per token of this piece, when the request asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability (the model's, before sampling settings and any
    grammar), with the ``top`` most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's thinking (never part of the content)."""

    text: str
    tokens: int = 1


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call: its first piece carries ``id`` and ``name``, later pieces
    only more ``arguments`` text. ``call`` numbers the calls of one choice from 0."""

    call: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class EmbeddingDelta:
    """The embedding of one input (unit length unless the model's config says otherwise)."""

    vector: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Finish:
    """The last delta of every successful stream."""

    reason: FinishReason
    usage: Usage
    #: The client's stop string that ended the text (None: the model ended it, or a limit).
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class PromptProgress:
    """How far the model has read the prompt, for a request with ``progress`` set: after
    ``processed`` of its ``total`` tokens (``cached`` of them taken from the KV cache, counted
    in ``processed``) and ``elapsed_s`` since the engine took it. A backend may send none."""

    total: int
    cached: int
    processed: int
    elapsed_s: float


#: Every kind of delta a backend yields. Each consumer matches them exhaustively
#: (``match`` + ``assert_never``), so mypy names every place a new kind must be handled.
Delta = TextDelta | ReasoningDelta | ToolCallDelta | EmbeddingDelta | PromptProgress | Finish

#: The wire API a request came in on (an endpoint's ``name``: "chat", "completion",
#: "embeddings", "responses", "messages"...), for plugins' labels and messages.
Endpoint = str


class Capability(StrEnum):
    """What a backend can do; a request needing one its model's backend lacks is a 400."""

    STREAMING = "streaming"
    #: Text generation: chat and text completions (an embedding-only model lacks it).
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    LOGPROBS = "logprobs"
    TOOLS = "tools"
    JSON_SCHEMA = "json_schema"
    IMAGES = "images"
    TOKEN_PROMPTS = "token_prompts"


@dataclass(frozen=True, slots=True)
class Requirement:
    """A capability a request needs, and the request field that needs it (named in the 400)."""

    capability: Capability
    param: str


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One parsed client request: the model asked for and one generation per choice."""

    endpoint: Endpoint
    model: str
    generations: tuple[GenerationRequest, ...]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    #: What the request needs of the model's backend (checked after the model lookup).
    requires: tuple[Requirement, ...] = ()
    #: The generations take turns on the model's sequences (the inputs of an embeddings
    #: request): admission grants at most the model's capacity, the engine queues the rest.
    take_turns: bool = False
    #: Choices per prompt (``n``): generations ``k * n .. k * n + n - 1`` share prompt ``k``.
    choices_per_prompt: int = 1
    #: How an embeddings response encodes its vectors.
    encoding_format: Literal["float", "base64"] = "float"
    #: What the endpoint keeps of the request for its response (e.g. the fields a Responses
    #: API object echoes); only the endpoint that set it reads it.
    endpoint_state: object = None
    #: Response headers the endpoint adds (e.g. the tools it did not offer the model).
    headers: tuple[tuple[str, str], ...] = ()
    #: The client does not wait: the endpoint answers at once and the generation runs on.
    background: bool = False
    #: A conversation over the context loses its oldest turns instead of being refused (the
    #: Responses API's ``truncation: "auto"``).
    truncate: bool = False
    #: The stored response this request continues (a Responses chain), for a router that
    #: keeps a conversation on the server that ran its earlier turns.
    continues: str | None = None

    @property
    def n(self) -> int:
        return len(self.generations)

    def sequences(self, capacity: int) -> int:
        """How many of the model's sequences admission must grant this request at once."""
        return min(self.n, capacity) if self.take_turns else self.n


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
    capabilities: frozenset[Capability] = frozenset({Capability.STREAMING, Capability.COMPLETIONS})
    owned_by: str = "gateway"
