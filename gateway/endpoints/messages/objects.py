"""The Messages API's JSON: content blocks, stop reasons, usage and the ``message`` object,
built the same way for a body and a stream's events (from the shared segmenter's blocks)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from gateway.types import Finish, Usage
from gateway.wire.blocks import Block

Json = dict[str, object]


def tool_use_id(call_id: str) -> str:
    """Anthropic's ``toolu_`` id for a call the core named ``call_...`` (a replica's own
    ``toolu_`` id is kept)."""
    if call_id.startswith("toolu_"):
        return call_id
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> Json:
    """A call's arguments as its ``input`` object ({} if the text is not one: a call cut by
    ``max_tokens``, which ``stop_reason`` then says)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def block_json(block: Block, *, started: bool = False) -> Json:
    """A finished block, or with ``started`` its ``content_block_start`` form (empty)."""
    if block.kind == "text":
        return {"type": "text", "text": "" if started else block.text}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": "" if started else block.text, "signature": ""}
    arguments = {} if started else tool_input(block.text)
    return {"type": "tool_use", "id": tool_use_id(block.call_id), "name": block.name,
            "input": arguments}  # fmt: skip


def shown(blocks: Sequence[Block], thinking: bool) -> list[Block]:
    """The blocks a client sees: reasoning only when it asked for thinking."""
    return [b for b in blocks if thinking or b.kind != "reasoning"]


def stop_reason(finish: Finish | None) -> tuple[str, str | None]:
    """``stop_reason`` and ``stop_sequence``."""
    if finish is None or finish.reason == "stop":
        sequence = finish.stop_sequence if finish is not None else None
        return ("end_turn", None) if sequence is None else ("stop_sequence", sequence)
    if finish.reason == "length":
        return "max_tokens", None
    return "tool_use", None


def usage_json(usage: Usage) -> Json:
    """Anthropic counts the prompt in parts: ``input_tokens`` (not read from the cache) and
    ``cache_read_input_tokens`` (the engine's reused prefix)."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def message_json(
    message_id: str,
    model: str,
    content: list[Json],
    finish: Finish | None,
    usage: Usage,
) -> Json:
    reason, sequence = stop_reason(finish) if finish is not None else (None, None)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_json(usage),
    }
