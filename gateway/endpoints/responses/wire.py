"""``POST /v1/responses`` bodies as pydantic models (used only at the edge).

``input`` items and ``tools`` are validated one by one (:data:`ITEMS`, :data:`TOOLS`), so a
400 names the exact element (``input[3].call_id``) and an unknown ``type`` is refused by name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from gateway.wire.requests import CacheSalt, ClientId, Probability, Temperature, WireModel

Id = Annotated[str, Field(min_length=1, max_length=256)]
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,128}$")]


class Part(WireModel):
    """A content part: ``input_text``/``output_text``/``text`` carry ``text``, ``refusal`` its
    ``refusal``; any other type (images, files, audio) is refused where it is read."""

    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None


Content = StrictStr | list[Part]


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content
    id: Id | None = None
    status: StrictStr | None = None


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: Id
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: StrictStr
    namespace: StrictStr | None = None
    id: Id | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: Id
    output: Content
    id: Id | None = None
    status: StrictStr | None = None


class CustomToolCallItem(WireModel):
    type: Literal["custom_tool_call"]
    call_id: Id
    name: Annotated[str, Field(min_length=1, max_length=256)]
    input: StrictStr
    namespace: StrictStr | None = None
    id: Id | None = None
    status: StrictStr | None = None


class ReasoningPart(WireModel):
    type: Literal["summary_text", "reasoning_text"]
    text: StrictStr


class ReasoningItem(WireModel):
    """A reasoning item; Codex sends them without ``summary``, some clients without ``id``."""

    type: Literal["reasoning"]
    id: Id | None = None
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None
    encrypted_content: StrictStr | None = None
    status: StrictStr | None = None


#: An input entry naming a stored item by its id (looked up before the items are parsed).
REFERENCE = "item_reference"
Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | CustomToolCallItem | ReasoningItem
ITEMS: dict[str, type[Item]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


class FunctionTool(WireModel):
    type: Literal["function"]
    name: Name
    description: StrictStr | None = None
    parameters: dict[str, object] | None = None
    strict: StrictBool | None = None


class CustomFormat(WireModel):
    type: Literal["text", "grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: StrictStr | None = None


class CustomTool(WireModel):
    type: Literal["custom"]
    name: Name
    description: StrictStr | None = None
    format: CustomFormat | None = None


class NamespaceTool(WireModel):
    type: Literal["namespace"]
    name: Name
    description: StrictStr | None = None
    tools: Annotated[list[FunctionTool | CustomTool], Field(min_length=1, max_length=128)]


Tool = FunctionTool | CustomTool | NamespaceTool
TOOLS: dict[str, type[Tool]] = {
    "function": FunctionTool,
    "custom": CustomTool,
    "namespace": NamespaceTool,
}


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] = "response"
    description: StrictStr | None = None
    schema_: dict[str, object] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(WireModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(WireModel):
    include_obfuscation: StrictBool | None = None


MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class ResponsesRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: StrictStr | list[dict[str, object]] = Field(default_factory=list)
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    parallel_tool_calls: StrictBool | None = None
    tool_choice: StrictStr | dict[str, object] | None = None
    tools: Annotated[list[dict[str, object]], Field(max_length=256)] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    user: ClientId | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[StrictStr] | None = None
    prompt_cache_key: ClientId | None = None
    cache_salt: CacheSalt | None = None
    #: llama-server's: stream the prompt's progress while it is read
    #: (``response.prompt_progress`` events; the chat page's progress bar).
    return_progress: StrictBool = False
    stream_options: ResponsesStreamOptions | None = None
    store: StrictBool = True
    previous_response_id: Id | None = None
    background: StrictBool = False
    stream: StrictBool = False
    # vLLM's names for the extra samplers, as on chat completions
    seed: StrictInt | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0, allow_inf_nan=False)] | None = None


class ResponseUpdate(WireModel):
    """``POST /v1/responses/{id}``: a stored response's ``metadata``, replaced (a gateway
    extension: the chat page keeps a conversation's title and an answer's timings there)."""

    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


class InputTokensRequest(WireModel):
    """``POST /v1/responses/input_tokens``: the fields that shape the prompt."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: StrictStr | list[dict[str, object]] = Field(default_factory=list)
    instructions: StrictStr | None = None
    tools: Annotated[list[dict[str, object]], Field(max_length=256)] | None = None
    tool_choice: StrictStr | dict[str, object] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: Id | None = None
    truncation: Literal["auto", "disabled"] | None = None
