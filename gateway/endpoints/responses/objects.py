"""The Responses API's JSON: output items, usage and the ``response`` object, built the same
way for a body, a stream's events and the store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from gateway.endpoints.base import ChoiceResult, ToolCall
from gateway.endpoints.responses.convert import ResponsesState
from gateway.endpoints.responses.items import new_id
from gateway.endpoints.responses.tools import ToolOrigin
from gateway.errors import GatewayError
from gateway.types import FinishReason, TokenLogprob, Usage

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


def output_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, object]]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top
            ],
        }
        for e in entries
    ]


def text_part(text: str, logprobs: list[dict[str, object]] | None = None) -> dict[str, object]:
    part: dict[str, object] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def message_item(
    item_id: str, parts: list[dict[str, object]], status: ItemStatus
) -> dict[str, object]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": parts,
    }


def reasoning_item(item_id: str, text: str | None, status: ItemStatus) -> dict[str, object]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def call_item(
    item_id: str,
    call_id: str,
    name: str,
    arguments: str,
    origin: ToolOrigin | None,
    status: ItemStatus,
) -> dict[str, object]:
    """A ``function_call``, or a ``custom_tool_call`` whose ``input`` is the one string the
    model wrote as its arguments."""
    origin = origin or ToolOrigin(name)
    item: dict[str, object] = {"id": item_id, "call_id": call_id, "name": origin.name}
    if origin.custom:
        item.update(type="custom_tool_call", input=custom_input(arguments))
    else:
        item.update(type="function_call", arguments=arguments)
    if origin.namespace is not None:
        item["namespace"] = origin.namespace
    item["status"] = status
    return item


def custom_input(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return str(value["input"])
    return arguments


def call_item_id(custom: bool) -> str:
    return new_id("ctc" if custom else "fc")


def items_of(
    state: ResponsesState, choice: ChoiceResult, status: ItemStatus
) -> list[dict[str, object]]:
    """A collected choice's output items: reasoning, the message, then the calls."""
    items: list[dict[str, object]] = []
    if choice.reasoning:
        items.append(reasoning_item(new_id("rs"), "".join(choice.reasoning), status))
    if choice.text or not choice.tool_calls:
        logprobs = output_logprobs(choice.logprobs) if state.logprobs else None
        part = text_part("".join(choice.text), logprobs)
        items.append(message_item(new_id("msg"), [part], status))
    items.extend(_call(state, call, status) for call in choice.tool_calls)
    return items


def _call(state: ResponsesState, call: ToolCall, status: ItemStatus) -> dict[str, object]:
    origin = state.origins.get(call.name)
    custom = origin is not None and origin.custom
    return call_item(
        call_item_id(custom), call.id, call.name, "".join(call.arguments), origin, status
    )


def usage_json(usage: Usage, reasoning_tokens: int) -> dict[str, object]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def status_of(reason: FinishReason | None) -> tuple[Status, dict[str, object] | None]:
    if reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_object(
    state: ResponsesState,
    *,
    response_id: str,
    created: int,
    model: str,
    status: Status,
    output: list[dict[str, object]],
    usage: dict[str, object] | None = None,
    incomplete: dict[str, object] | None = None,
    error: GatewayError | None = None,
    completed_at: int | None = None,
) -> dict[str, object]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": completed_at,
        "error": {"code": error.code or error.type, "message": error.message} if error else None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": usage,
        **state.echo,
    }
