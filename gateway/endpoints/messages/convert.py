"""A ``POST /v1/messages`` body into a :class:`ClientRequest` (one generation).

Anthropic's content blocks become the core's chat messages: ``tool_use`` blocks an assistant
message's calls, ``tool_result`` blocks tool messages (before the user's text of the same
turn), ``thinking`` the reasoning fed back; a last assistant message is a prefill that the
answer continues. Claude Code's per-request billing line is taken out of the system prompt, so
a conversation's next turn reads its earlier turns from the KV cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from gateway.endpoints.messages.wire import (
    BLOCKS,
    Block,
    Content,
    CountTokensRequest,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    OutputFormat,
    RedactedThinkingBlock,
    SystemText,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
)
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.output.schemas import schema_text
from gateway.types import (
    Capability,
    ChatMessage,
    ClientRequest,
    GenerationRequest,
    Requirement,
    ResponseFormat,
    ToolCallRef,
    Tools,
    ToolSpec,
)
from gateway.wire.convert import parse_body, validation_error
from gateway.wire.shared import choice_mode, choose_tools, features, sampling_params

#: The line Claude Code puts first in its system prompt (its own text block), which changes
#: with the conversation and, on first-party hosts, with every request
#: (``x-anthropic-billing-header: cc_version=...; cch=<hash>;``): kept, it would make prompts
#: differ after a few tokens and defeat the prefix cache.
BILLING_HEADER = "x-anthropic-billing-header:"
_BILLING_LINE = re.compile(r"\Ax-anthropic-billing-header:[^\n]*\n?")
_NO_SCHEMA: dict[str, object] = {"type": "object", "properties": {}}
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class MessagesState:
    """What the response needs of its request."""

    #: The client asked for reasoning (``thinking`` enabled or adaptive): shown as blocks.
    thinking: bool = True


def state_of(request: ClientRequest) -> MessagesState:
    state = request.endpoint_state
    return state if isinstance(state, MessagesState) else MessagesState()


def _blocks(content: Content, where: str) -> list[Block]:
    if isinstance(content, str):
        return [TextBlock(type="text", text=content)]
    out: list[Block] = []
    for j, raw in enumerate(content):
        param = f"{where}[{j}]"
        kind = raw.get("type")
        model = BLOCKS.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise InvalidRequest(
                f"content blocks of type {str(kind)[:64]!r} are not supported by this server",
                param=f"{param}.type",
            )
        try:
            out.append(model.model_validate(raw))
        except ValidationError as err:
            raise validation_error(err, param) from None
    return out


def _no_images(block: Block, param: str) -> None:
    if isinstance(block, ImageBlock):
        raise UnsupportedParameter(
            "image content is not supported by this server's models yet", param=param
        )


def _result_text(block: ToolResultBlock, param: str) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        texts = []
        for k, inner in enumerate(_blocks(block.content, f"{param}.content")):
            _no_images(inner, f"{param}.content[{k}]")
            if not isinstance(inner, TextBlock):
                raise InvalidRequest(
                    "a tool_result holds text (or image) blocks", param=f"{param}.content[{k}]"
                )
            texts.append(inner.text)
        text = "\n".join(texts)
    return f"Error: {text}" if block.is_error else text


def _user(message: MessageParam, i: int) -> list[ChatMessage]:
    """A user turn: its tool results as tool messages, then its text as one user message."""
    results: list[ChatMessage] = []
    texts: list[str] = []
    for j, block in enumerate(_blocks(message.content, f"messages[{i}].content")):
        param = f"messages[{i}].content[{j}]"
        _no_images(block, param)
        if isinstance(block, ToolResultBlock):
            text = _result_text(block, param)
            results.append(ChatMessage("tool", text, tool_call_id=block.tool_use_id))
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            raise InvalidRequest(
                f"a user message cannot hold {block.type!r} blocks", param=f"{param}.type"
            )
    if texts or not results:
        results.append(ChatMessage("user", "".join(texts)))
    return results


def _assistant(message: MessageParam, i: int) -> ChatMessage:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCallRef] = []
    for j, block in enumerate(_blocks(message.content, f"messages[{i}].content")):
        param = f"messages[{i}].content[{j}]"
        _no_images(block, param)
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(ToolCallRef(block.id, block.name, arguments))
        elif not isinstance(block, RedactedThinkingBlock):  # opaque: nothing to feed back
            raise InvalidRequest(
                f"an assistant message cannot hold {block.type!r} blocks", param=f"{param}.type"
            )
    return ChatMessage(
        "assistant",
        "".join(texts),
        tool_calls=tuple(calls),
        reasoning="".join(reasoning) if reasoning else None,
    )


def system_text(system: str | Sequence[SystemText] | None) -> str | None:
    """The system prompt as one text, without Claude Code's billing line (a block of its own,
    or the first line of a string)."""
    if system is None:
        return None
    if isinstance(system, str):
        return _BILLING_LINE.sub("", system, count=1)
    return "\n\n".join(b.text for b in system if not b.text.startswith(BILLING_HEADER))


def _system_turn(message: MessageParam, i: int) -> ChatMessage:
    """A ``system`` turn in the conversation: its text blocks, in place."""
    texts = []
    for j, block in enumerate(_blocks(message.content, f"messages[{i}].content")):
        if not isinstance(block, TextBlock):
            raise InvalidRequest(
                "a system message holds text blocks", param=f"messages[{i}].content[{j}].type"
            )
        texts.append(block.text)
    return ChatMessage("system", "\n\n".join(texts))


def to_messages(wire: CountTokensRequest) -> tuple[ChatMessage, ...]:
    out: list[ChatMessage] = []
    system = system_text(wire.system)
    if system:
        out.append(ChatMessage("system", system))
    for i, message in enumerate(wire.messages):
        if message.role == "user":
            out.extend(_user(message, i))
        elif message.role == "assistant":
            out.append(_assistant(message, i))
        elif message.content:  # an empty system turn (Claude Code's --bare) adds nothing
            out.append(_system_turn(message, i))
    return tuple(out)


def _tool_specs(tools: Sequence[ToolParam]) -> tuple[list[ToolSpec], list[str]]:
    """The client tools (as the core's specs) and the names of hosted ones (not offered)."""
    specs: list[ToolSpec] = []
    hosted: list[str] = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            hosted.append(_HEADER_UNSAFE.sub("", tool.name)[:64])  # named in a header
            continue
        param = f"tools[{i}].input_schema"
        if tool.input_schema is None:
            raise InvalidRequest(f"'{param}' is a required property", param=param)
        schema = schema_text(tool.input_schema or _NO_SCHEMA, param)
        specs.append(ToolSpec(tool.name, tool.description or "", schema, param=param))
    return specs, hosted


def _tools(wire: CountTokensRequest) -> tuple[Tools | None, list[str]]:
    specs, hosted = _tool_specs(wire.tools or ())
    choice = wire.tool_choice or ToolChoice(type="auto")
    parallel = choice.disable_parallel_tool_use is not True
    if not specs:
        if choice.type in ("auto", "none"):
            return None, hosted
        raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")
    if choice.type == "tool":
        if choice.name is None:
            raise InvalidRequest("'tool_choice.name' is a required property", param="tool_choice")
        tools = choose_tools(specs, "named", choice.name, choice_param="tool_choice.name")
    else:
        tools = choose_tools(specs, choice_mode(choice.type), parallel=parallel)
    return Tools(tools.specs, tools.choice, tools.name, parallel), hosted


def _format(fmt: OutputFormat | None, param: str) -> ResponseFormat | None:
    if fmt is None:
        return None
    schema = schema_text(fmt.schema_, f"{param}.schema")
    return ResponseFormat(schema, "output", True, f"{param}.schema")


def _output_format(wire: CountTokensRequest) -> ResponseFormat | None:
    config = wire.output_config
    if config is not None and config.format is not None:
        return _format(config.format, "output_config.format")
    return _format(wire.output_format, "output_format")


def _effort(wire: CountTokensRequest) -> str | None:
    """The template's reasoning switch: ``thinking`` disabled is "none"; enabled or adaptive
    is ``output_config.effort`` (medium if unset); neither set keeps the template's default."""
    effort = wire.output_config.effort if wire.output_config is not None else None
    effort = "high" if effort == "max" else effort
    if wire.thinking is None:
        return effort
    if wire.thinking.type == "disabled":
        return "none"
    return effort or "medium"


def _affinity(wire: MessagesRequest | None) -> str | None:
    """What keeps a conversation on one replica: the client's ``metadata.user_id`` (Claude
    Code's session header, when sent, replaces it: see the endpoint's ``resolve``)."""
    user_id = (wire.metadata or {}).get("user_id") if wire is not None else None
    return user_id[:256] if isinstance(user_id, str) and user_id else None


def messages_request(
    wire: CountTokensRequest,
    request_id: str,
    *,
    max_tokens: int | None = None,
) -> ClientRequest:
    """The request a Messages body (or a count_tokens body) stands for."""
    messages = to_messages(wire)
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("'messages' holds no user or assistant turn", param="messages")
    tools, hosted = _tools(wire)
    fmt = _output_format(wire)
    requires, passthrough = features(tools, fmt, format_param="output_config.format")
    called = next((i for i, m in enumerate(wire.messages) if _has_calls(m)), None)
    if called is not None:  # rendering a call back to the model takes its tool-call format
        requires = (*requires, Requirement(Capability.TOOLS, f"messages[{called}].content"))
    full = wire if isinstance(wire, MessagesRequest) else None
    generation = GenerationRequest(
        request_id=f"{request_id}-0",
        messages=messages,
        sampling=sampling_params(
            temperature=full.temperature if full else None,
            top_p=full.top_p if full else None,
            top_k=full.top_k if full else None,
        ),
        max_tokens=full.max_tokens if full else max_tokens,
        stop=tuple(dict.fromkeys(full.stop_sequences or ())) if full else (),
        passthrough=passthrough,
        tools=tools,
        response_format=fmt,
        reasoning_effort=_effort(wire),
        affinity=_affinity(full),
        continue_final=_prefilled(messages),
        wire_api="messages",
    )
    thinking = wire.thinking is None or wire.thinking.type != "disabled"
    headers = (("x-gateway-ignored-tools", ",".join(hosted)),) if hosted else ()
    return ClientRequest(
        endpoint="messages",
        model=wire.model,
        generations=(generation,),
        stream=full.stream if full else False,
        requires=requires,
        endpoint_state=MessagesState(thinking=thinking),
        headers=headers,
    )


def _prefilled(messages: tuple[ChatMessage, ...]) -> bool:
    """A last assistant message (without calls) is the start of the answer."""
    return bool(messages) and messages[-1].role == "assistant" and not messages[-1].tool_calls


def _has_calls(message: MessageParam) -> bool:
    content = message.content
    return (
        message.role == "assistant"
        and not isinstance(content, str)
        and any(b.get("type") == "tool_use" for b in content)
    )


def parse_messages(body: bytes, request_id: str) -> ClientRequest:
    return messages_request(parse_body(MessagesRequest, body), request_id)


def parse_count(body: bytes, request_id: str) -> ClientRequest:
    return messages_request(parse_body(CountTokensRequest, body), request_id)
