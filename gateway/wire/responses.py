"""JSON for OpenAI response bodies and stream chunks: the pieces every endpoint's encoder
uses (compact dumps that keep one event on one line, usage, errors, model entries)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from gateway.types import Usage

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Line breaks to ``str.splitlines()`` (and so to httpx's ``iter_lines``) that JSON leaves raw;
#: escaped in stream chunks so such a client still reads one event per line.
_SPLITLINES_BREAKS = re.compile("[\x85\u2028\u2029]")
_ESCAPED_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(json_text: str) -> str:
    if _SPLITLINES_BREAKS.search(json_text):
        return json_text.translate(_ESCAPED_BREAKS)
    return json_text


def usage_json(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def error_event(body: object) -> str:
    return json_line(body)


def json_line(value: object) -> str:
    """Compact JSON on one line (also to ``str.splitlines``)."""
    return one_line(dumps(value))


def model_json(
    model_id: str,
    created: int,
    owned_by: str,
    state: str,
    context_length: int | None = None,
    *,
    load: str | None = None,
    capabilities: dict[str, object] | None = None,
) -> dict[str, object]:
    """A ``/v1/models`` entry both SDKs read: OpenAI's fields (``object``, ``created``,
    ``owned_by``) and Anthropic's (``type``, ``display_name``, ``created_at``); the model's
    ``state``, when it loads (``load``: ``startup`` or ``on_demand``) and what it can do
    (``capabilities``); ``max_model_len`` (vLLM's name) once the model is loaded."""
    extra: dict[str, object] = {} if context_length is None else {"max_model_len": context_length}
    if load is not None:
        extra["load"] = load
    if capabilities is not None:
        extra["capabilities"] = capabilities
    stamp = datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "type": "model",
        "display_name": model_id,
        "created_at": stamp,
        "state": state,
        **extra,
    }


def model_list(models: list[dict[str, object]]) -> dict[str, object]:
    """``/v1/models``: OpenAI's list, with Anthropic's page fields (one page)."""
    return {
        "object": "list",
        "data": models,
        "has_more": False,
        "first_id": models[0]["id"] if models else None,
        "last_id": models[-1]["id"] if models else None,
    }
