"""Anthropic Messages request bodies as pydantic models (used only at the edge).

Content blocks are validated one by one by their ``type`` (:data:`BLOCKS`), so a bad block
is a 400 naming it (``messages[2].content[1].input``) and an unknown type is named as such.
Unknown fields are accepted and ignored, as Claude Code sends many (``cache_control``,
``context_management``, ``service_tier``...).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from gateway.wire.requests import WireModel

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Id = Annotated[str, Field(min_length=1, max_length=256)]
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
StopSequence = Annotated[str, Field(min_length=1, max_length=1024)]
#: Blocks per message, messages and tools per request: bounded before any work on them.
MAX_BLOCKS = 4096
MAX_MESSAGES = 100_000
MAX_TOOLS = 512
MAX_STOPS = 16


class TextBlock(WireModel):
    type: Literal["text"]
    text: StrictStr


class ImageBlock(WireModel):
    type: Literal["image"]
    source: dict[str, object]


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: Id
    name: Annotated[str, Field(min_length=1, max_length=256)]
    input: dict[str, object]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: Id
    content: StrictStr | Annotated[list[dict[str, object]], Field(max_length=MAX_BLOCKS)] = ""
    is_error: StrictBool = False


class ThinkingBlock(WireModel):
    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr | None = None


class RedactedThinkingBlock(WireModel):
    type: Literal["redacted_thinking"]
    data: StrictStr


Block = (
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)

#: Each block type's model, by ``type``.
BLOCKS: dict[str, type[Block]] = {
    "text": TextBlock,
    "image": ImageBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock,
}

Content = StrictStr | Annotated[list[dict[str, object]], Field(max_length=MAX_BLOCKS)]


class MessageParam(WireModel):
    """A turn. ``system`` turns come from Claude Code's per-turn control (its environment
    section, at the end of a request and mid-conversation later)."""

    role: Literal["user", "assistant", "system"]
    content: Content


class ToolParam(WireModel):
    """A client tool (``type`` absent or ``custom``); other types are Anthropic's hosted
    tools (web search, code execution...), which this server cannot run."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    type: StrictStr | None = None
    description: StrictStr | None = None
    input_schema: dict[str, object] | None = None


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(WireModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None


class OutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, object] = Field(alias="schema")


class OutputConfig(WireModel):
    effort: Literal["low", "medium", "high", "max"] | None = None
    format: OutputFormat | None = None


class SystemText(WireModel):
    type: Literal["text"]
    text: StrictStr


class CountTokensRequest(WireModel):
    """``/v1/messages/count_tokens``: what shapes the prompt, without generation limits."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[
        list[MessageParam], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)
    ]
    system: StrictStr | Annotated[list[SystemText], Field(max_length=MAX_BLOCKS)] | None = None
    tools: Annotated[list[ToolParam], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[StopSequence], Field(max_length=MAX_STOPS)] | None = None
    stream: StrictBool = False
    temperature: Unit | None = None
    top_p: Unit | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: dict[str, object] | None = None
