"""OpenAI response bodies and stream chunks.

Stream chunks are built from per-request templates: only the text is JSON-escaped per chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.types import Endpoint, FinishReason, Usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Line breaks to ``str.splitlines()`` (and so to httpx's ``iter_lines``) that JSON leaves raw;
#: escaped in stream chunks so such a client still reads one event per line.
_SPLITLINES_BREAKS = re.compile("[\x85\u2028\u2029]")
_ESCAPED_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _one_line(json_text: str) -> str:
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


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason


class StreamEncoder:
    """Serializes one request's chunks; everything but the text is rendered once."""

    def __init__(self, endpoint: Endpoint, response_id: str, created: int, model: str) -> None:
        self._chat = endpoint == "chat"
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        self._head = (
            f'{{"id":{_dumps(response_id)},"object":"{obj}","created":{created},'
            f'"model":{_dumps(model)},"system_fingerprint":null,"choices":'
        )
        self._prefixes: dict[int, str] = {}

    def _prefix(self, index: int) -> str:
        prefix = self._prefixes.get(index)
        if prefix is None:
            key = '"delta":{"content":' if self._chat else '"text":'
            prefix = f'{self._head}[{{"index":{index},{key}'
            self._prefixes[index] = prefix
        return prefix

    def text(self, index: int, text: str) -> str:
        close = (
            '},"logprobs":null,"finish_reason":null}]}'
            if self._chat
            else (',"logprobs":null,"finish_reason":null}]}')
        )
        return self._prefix(index) + _one_line(_dumps(text)) + close

    def role(self, index: int) -> str | None:
        """The opening chunk of a chat choice (role and empty content); None for completions."""
        if not self._chat:
            return None
        return (
            f'{self._head}[{{"index":{index},"delta":{{"role":"assistant","content":""}},'
            '"logprobs":null,"finish_reason":null}]}'
        )

    def finish(self, index: int, reason: FinishReason) -> str:
        body = '"delta":{}' if self._chat else '"text":""'
        return (
            f'{self._head}[{{"index":{index},{body},"logprobs":null,"finish_reason":"{reason}"}}]}}'
        )

    def usage(self, usage: Usage) -> str:
        return f'{self._head}[],"usage":{_dumps(usage_json(usage))}}}'


def error_event(body: object) -> str:
    return _one_line(_dumps(body))


def completion_body(
    endpoint: Endpoint,
    response_id: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: Usage,
) -> bytes:
    if endpoint == "chat":
        items: list[dict[str, object]] = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ]
        obj = "chat.completion"
    else:
        items = [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for c in choices
        ]
        obj = "text_completion"
    body = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": items,
        "usage": usage_json(usage),
    }
    return _dumps(body).encode()


def model_json(
    model_id: str, created: int, owned_by: str, state: str, context_length: int | None = None
) -> dict[str, object]:
    """A ``/v1/models`` entry; ``max_model_len`` (vLLM's name) once the model is loaded."""
    extra: dict[str, object] = {} if context_length is None else {"max_model_len": context_length}
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "state": state,
        **extra,
    }
