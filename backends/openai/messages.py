"""Anthropic's Messages API upstream, for replicas that serve it (``messages_api = true``): a
request that came in on ``/v1/messages`` goes to theirs in kind (a prefill stays a prefill,
thinking stays thinking), and their events become the gateway's deltas.

Other requests, and every request to replicas that do not declare it, go as chat completions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from backends.openai.errors import ReplicaFailed, UpstreamError, stream_error
from gateway.types import (
    ChatMessage,
    Delta,
    Finish,
    FinishReason,
    GenerationRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Tools,
    Usage,
)

PATH = "/v1/messages"
HEADERS = {"anthropic-version": "2023-06-01"}
#: ``max_tokens`` is required upstream; a request without one (no client or model limit).
DEFAULT_MAX_TOKENS = 4096
_STOP_REASONS: dict[str, FinishReason] = {"max_tokens": "length", "tool_use": "tool_calls"}
Json = dict[str, object]


def _input(arguments: str) -> object:
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _assistant(m: ChatMessage) -> Json:
    blocks: list[Json] = []
    if m.reasoning:
        blocks.append({"type": "thinking", "thinking": m.reasoning, "signature": ""})
    if m.content:
        blocks.append({"type": "text", "text": m.content})
    blocks += [
        {"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c.arguments)}
        for c in m.tool_calls
    ]
    return {"role": "assistant", "content": blocks or m.content}


def _user_blocks(turns: list[Json]) -> list[Json]:
    """The open user turn's blocks (a new one if the last turn is not a user turn)."""
    last = turns[-1] if turns else None
    if last is None or last["role"] != "user" or not isinstance(last["content"], list):
        last = {"role": "user", "content": []}
        turns.append(last)
    content = last["content"]
    assert isinstance(content, list)
    return content


def turns_of(messages: Sequence[ChatMessage]) -> tuple[str | None, list[Json]]:
    """``system`` (the leading system messages) and ``messages``: tool results and the user
    text after them share one user turn, as Anthropic's API expects."""
    head = 0
    while head < len(messages) and messages[head].role in ("system", "developer"):
        head += 1
    system = "\n\n".join(m.content for m in messages[:head]) or None
    turns: list[Json] = []
    for m in messages[head:]:
        if m.role == "tool":
            result: Json = {
                "type": "tool_result",
                "tool_use_id": m.tool_call_id,
                "content": m.content,
            }
            _user_blocks(turns).append(result)
        elif m.role == "user":
            _user_blocks(turns).append({"type": "text", "text": m.content})
        elif m.role == "assistant":
            turns.append(_assistant(m))
        else:  # a system turn inside the conversation
            turns.append({"role": "system", "content": m.content})
    return system, turns


def _tools(tools: Tools) -> tuple[list[Json], Json]:
    specs = [
        {"name": t.name, "description": t.description, "input_schema": json.loads(t.parameters)}
        for t in tools.specs
    ]
    choice: Json
    if tools.choice == "named":
        choice = {"type": "tool", "name": tools.name}
    else:
        choice = {"type": {"auto": "auto", "required": "any", "none": "none"}[tools.choice]}
    if not tools.parallel and tools.choice != "none":
        choice["disable_parallel_tool_use"] = True
    return specs, choice


def messages_body(request: GenerationRequest, model: str) -> bytes:
    """The upstream ``/v1/messages`` body of a request that came in on the Messages API."""
    assert request.messages is not None
    system, turns = turns_of(request.messages)
    body: Json = {
        "model": model,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": turns,
        "stream": True,
    }
    if system is not None:
        body["system"] = system
    s = request.sampling
    body["temperature"] = s.temperature
    if s.top_p != 1.0:
        body["top_p"] = s.top_p
    if s.top_k:
        body["top_k"] = s.top_k
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.tools is not None:
        body["tools"], body["tool_choice"] = _tools(request.tools)
    effort = request.reasoning_effort
    if effort == "none":
        body["thinking"] = {"type": "disabled"}
    elif effort is not None:
        body["thinking"] = {"type": "adaptive"}
        body["output_config"] = {"effort": effort}
    return json.dumps(body, ensure_ascii=False).encode()


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


@dataclass
class MessagesDecoder:
    """One upstream Messages stream's events as deltas (the same interface as the chat
    :class:`~backends.openai.stream.ChunkDecoder`)."""

    reason: FinishReason | None = None
    stop_sequence: str | None = None
    prompt: int = 0
    cached: int = 0
    output: int = 0
    pieces: int = 0
    done: bool = False
    #: Upstream block index -> our call number, for the tool_use blocks.
    _calls: dict[int, int] = field(default_factory=dict)

    def feed(self, data: str) -> list[Delta]:
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise ReplicaFailed(UpstreamError(f"replica sent a malformed event: {data[:200]!r}"))
        kind = event.get("type")
        if kind == "error":
            raise stream_error(event)
        if kind == "message_start":
            message = event.get("message")
            self._usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "content_block_start":
            return self._count(self._start(event))
        elif kind == "content_block_delta":
            return self._count(self._delta(event))
        elif kind == "message_delta":
            self._finish(event)
        elif kind == "message_stop":
            self.done = True
        return []

    def _count(self, deltas: list[Delta]) -> list[Delta]:
        self.pieces += len(deltas)
        return deltas

    def _usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        if "input_tokens" in usage or "cache_read_input_tokens" in usage:
            self.cached = _int(usage.get("cache_read_input_tokens"))
            self.prompt = _int(usage.get("input_tokens")) + self.cached
        self.output = _int(usage.get("output_tokens")) or self.output

    def _start(self, event: Json) -> list[Delta]:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return []
        if block.get("type") == "tool_use":
            call = self._calls[_int(event.get("index"))] = len(self._calls)
            call_id, name = block.get("id"), block.get("name")
            return [ToolCallDelta(call, "", id=str(call_id or f"toolu_{call}"),
                                  name=str(name or ""), tokens=1)]  # fmt: skip
        text = block.get("text")
        return [TextDelta(text)] if block.get("type") == "text" and text else []

    def _delta(self, event: Json) -> list[Delta]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [TextDelta(str(delta["text"]))]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [ReasoningDelta(str(delta["thinking"]))]
        call = self._calls.get(_int(event.get("index")))
        if kind == "input_json_delta" and call is not None and delta.get("partial_json"):
            return [ToolCallDelta(call, str(delta["partial_json"]), tokens=1)]
        return []

    def _finish(self, event: Json) -> None:
        delta = event.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        self.reason = _STOP_REASONS.get(str(reason), "stop")
        sequence = delta.get("stop_sequence") if isinstance(delta, dict) else None
        self.stop_sequence = sequence if isinstance(sequence, str) else None
        self._usage(event.get("usage"))

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def finish(self) -> Finish:
        assert self.reason is not None
        usage = Usage(self.prompt, self.output or self.pieces, self.cached)
        return Finish(self.reason, usage, self.stop_sequence)
