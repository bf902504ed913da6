"""The Responses API's JSON: output items, usage and the ``response`` object, built the same
way for a body, a stream's events and the store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from gateway.endpoints.responses.convert import ResponsesState
from gateway.endpoints.responses.items import new_id
from gateway.endpoints.responses.tools import ToolOrigin
from gateway.errors import GatewayError
from gateway.output.calls import custom_input
from gateway.types import FinishReason, TokenLogprob, Usage
from gateway.wire.blocks import Block, Segmenter

Json = dict[str, object]
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


def call_item_id(custom: bool) -> str:
    return new_id("ctc" if custom else "fc")


def block_item_id(state: ResponsesState, block: Block) -> str:
    if block.kind == "call":
        origin = state.origins.get(block.name)
        return call_item_id(origin is not None and origin.custom)
    return new_id("msg" if block.kind == "text" else "rs")


def item_of(state: ResponsesState, block: Block, item_id: str, status: ItemStatus) -> Json:
    """A finished block as its output item (a body's, a stream's ``output_item.done``)."""
    if block.kind == "text":
        logprobs = output_logprobs(block.logprobs) if state.logprobs else None
        return message_item(item_id, [text_part(block.text, logprobs)], status)
    if block.kind == "reasoning":
        return reasoning_item(item_id, block.text, status)
    origin = state.origins.get(block.name)
    return call_item(item_id, block.call_id, block.name, block.text, origin, status)


def block_status(segments: Segmenter, block: Block | None) -> ItemStatus:
    """A block is incomplete when ``max_tokens`` cut the answer inside it (the last one)."""
    last = block is None or block.index == len(segments.blocks) - 1
    return "incomplete" if segments.cut and last else "completed"


def answers(segments: Segmenter) -> bool:
    """The blocks hold an answer (text or a call); if not, an empty message is the answer."""
    return any(b.kind != "reasoning" for b in segments.blocks)


def items_of(state: ResponsesState, segments: Segmenter) -> list[Json]:
    """A collected choice's output items, one per block in the order written (as a stream
    gives them)."""
    items = [
        item_of(state, b, block_item_id(state, b), block_status(segments, b))
        for b in segments.blocks
    ]
    if not answers(segments):
        empty = Block("text", len(items))
        items.append(item_of(state, empty, new_id("msg"), block_status(segments, None)))
    return items


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
