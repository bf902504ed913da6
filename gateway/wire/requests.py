"""OpenAI request bodies as pydantic models (used only at the edge).

Strict types: a string where a number belongs is a 400, not a silent coercion. Unknown
fields are kept in ``model_extra`` so the converter can log and ignore them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
)

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1, max_length=1024)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
MaxTokens = Annotated[int, Field(ge=1)] | None
MAX_N = 128
#: ``user``, ``prompt_cache_key``: ids a client picks for its end user or its cache (OpenAI
#: documents 64 characters for its end-user ids; Codex sends UUIDs), echoed in responses and
#: in every stored event: bounded.
ClientId = Annotated[StrictStr, Field(max_length=256)]
#: vLLM's ``cache_salt``: the prefix cache is shared only between requests with the same one.
CacheSalt = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class TextPart(WireModel):
    type: Literal["text"]
    text: StrictStr


class OtherPart(WireModel):
    """Any non-text part (image_url, input_audio, file...): rejected as unsupported later."""

    type: StrictStr


class CalledFunction(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: StrictStr


class MessageToolCall(WireModel):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: CalledFunction


class CalledCustom(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    #: Free text, exactly as the model wrote it.
    input: StrictStr


class MessageCustomToolCall(WireModel):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["custom"]
    custom: CalledCustom


def by_type(tags: dict[str, str], default: str | None = None) -> Discriminator:
    """A union told apart by its ``type`` (``default`` where it is left out): an unknown
    type is one error naming the ones there are (union tags name no field: no wire model
    has a field named as a tag)."""

    def tag(value: object) -> str | None:
        if isinstance(value, dict):
            kind = value.get("type", default)
        else:  # a model already made
            kind = getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None

    expected = " or ".join(repr(k) for k in tags)
    return Discriminator(
        tag, custom_error_type="invalid_type", custom_error_message=f"'type' must be {expected}"
    )


AnyToolCall = Annotated[
    Annotated[MessageToolCall, Tag("FunctionCall")]
    | Annotated[MessageCustomToolCall, Tag("CustomCall")],
    by_type({"function": "FunctionCall", "custom": "CustomCall"}, default="function"),
]


class Message(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart | OtherPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[AnyToolCall] | None = None
    tool_call_id: StrictStr | None = None
    #: An assistant's earlier reasoning, under vLLM's new name and the older one.
    reasoning: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class StreamOptions(WireModel):
    include_usage: StrictBool = False


ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(WireModel):
    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, object] | None = None
    strict: StrictBool | None = None


class FunctionTool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class GrammarDefinition(WireModel):
    syntax: Literal["lark", "regex"] | None = None
    definition: StrictStr | None = None


class CustomFormat(WireModel):
    """``{"type": "text"}`` (any text) or ``{"type": "grammar", "grammar": {"syntax": "lark" |
    "regex", "definition": ...}}``."""

    type: Literal["text", "grammar"]
    grammar: GrammarDefinition | None = None


class CustomDefinition(WireModel):
    name: ToolName
    description: StrictStr | None = None
    format: CustomFormat | None = None


class CustomTool(WireModel):
    """A tool whose input is free text (optionally in a Lark or regex grammar)."""

    type: Literal["custom"]
    custom: CustomDefinition


AnyTool = Annotated[
    Annotated[FunctionTool, Tag("FunctionTool")] | Annotated[CustomTool, Tag("CustomTool")],
    by_type({"function": "FunctionTool", "custom": "CustomTool"}),
]


class NamedFunction(WireModel):
    name: StrictStr


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class NamedCustomChoice(WireModel):
    type: Literal["custom"]
    custom: NamedFunction


class AllowedTools(WireModel):
    mode: Literal["auto", "required"]
    tools: Annotated[list[NamedToolChoice | NamedCustomChoice], Field(min_length=1, max_length=128)]


class AllowedToolsChoice(WireModel):
    """The model may call only these of ``tools`` (the rest stay in the request, unoffered)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = (
    Literal["none", "auto", "required"] | NamedToolChoice | NamedCustomChoice | AllowedToolsChoice
)


class JsonSchemaFormat(WireModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True, populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] = "response"
    description: StrictStr | None = None
    schema_: dict[str, object] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(WireModel):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: MaxTokens = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: ClientId | None = None
    cache_salt: CacheSalt | None = None
    #: llama-server's: stream the prompt's progress while it is read (``prompt_progress``).
    return_progress: StrictBool = False
    # vLLM's names for the extra samplers
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0, allow_inf_nan=False)] | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(SamplingFields):
    #: ``fail_fast``: the first bad message ends validation (a 2 MB body of 150,000 bad
    #: messages is one error, not 150,000).
    messages: Annotated[list[Message], Field(min_length=1, fail_fast=True)]
    max_completion_tokens: MaxTokens = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[AnyTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, object]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_N)]
        | list[StrictInt]
        | list[list[StrictInt]]
    )
    echo: StrictBool = False
    suffix: StrictStr | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


MAX_EMBEDDING_INPUTS = 2048
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenArray = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingsRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | TokenArray
        | Annotated[list[TokenArray], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: ClientId | None = None


#: Fields that could redirect or reprogram the server: always a 400.
FORBIDDEN_FIELDS = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "chat_template",
        "chat_template_kwargs",
        "model_path",
        "model_url",
        "download_dir",
        "tokenizer",
        "lora_request",
        "extra_headers",
    }
)
