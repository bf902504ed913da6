"""Upstream SSE: lines into ``data`` payloads, payloads into the gateway's deltas.

The replica is asked for one choice (``n`` = 1) and for usage (``stream_options.include_usage``);
its chunks become :class:`TextDelta` pieces and, at ``[DONE]``, one :class:`Finish` carrying
its usage, cached prompt tokens included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from backends.openai.errors import ReplicaFailed, UpstreamError, stream_error
from gateway.types import Delta, Finish, FinishReason, TextDelta, ToolCallDelta, Usage

DONE = "[DONE]"


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each SSE event; comments (keep-alive pings) and other fields skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=_int(raw.get("prompt_tokens")),
        completion_tokens=_int(raw.get("completion_tokens")),
        cached_tokens=_int(cached),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


@dataclass
class ChunkDecoder:
    """Turns one upstream stream's chunks into deltas (chat or text completion chunks)."""

    chat: bool
    reason: FinishReason | None = None
    usage: Usage | None = None
    pieces: int = 0
    done: bool = False
    #: Upstream tool-call index -> (our call number, whether its name has been sent).
    _calls: dict[int, int] = field(default_factory=dict)

    def feed(self, data: str) -> list[Delta]:
        """One event's data; the deltas it carries. Raises on an upstream error event."""
        if data == DONE:
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            raise ReplicaFailed(UpstreamError(f"replica sent a malformed chunk: {data[:200]!r}"))
        if "error" in chunk:
            raise stream_error(chunk)
        self.usage = _usage(chunk.get("usage")) or self.usage
        text = ""
        calls: list[Delta] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text += self._text(choice)
            calls += self._tool_calls(choice)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.reason = reason if reason in ("length", "tool_calls") else "stop"
        out: list[Delta] = [TextDelta(text)] if text else []
        out += calls
        self.pieces += len(out)
        return out

    def _tool_calls(self, choice: dict[str, object]) -> list[Delta]:
        delta = choice.get("delta") if self.chat else None
        raw = delta.get("tool_calls") if isinstance(delta, dict) else None
        out: list[Delta] = []
        for item in raw if isinstance(raw, list) else ():
            if not isinstance(item, dict):
                continue
            upstream = item.get("index", 0)
            function = item.get("function")
            function = function if isinstance(function, dict) else {}
            args = function.get("arguments")
            args = args if isinstance(args, str) else ""
            if upstream not in self._calls:
                self._calls[upstream] = len(self._calls)
                call_id, name = item.get("id"), function.get("name")
                out.append(
                    ToolCallDelta(
                        self._calls[upstream],
                        args,
                        id=call_id if isinstance(call_id, str) else f"call_{upstream}",
                        name=name if isinstance(name, str) else "",
                        tokens=1,
                    )
                )
            elif args:
                out.append(ToolCallDelta(self._calls[upstream], args, tokens=1))
        return out

    def _text(self, choice: dict[str, object]) -> str:
        if self.chat:
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
        else:
            content = choice.get("text")
        return content if isinstance(content, str) else ""

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def finish(self) -> Finish:
        """The closing delta. A replica that sent no usage (llama-cpp-python's server) gets the
        number of text pieces as its completion tokens and 0 prompt tokens."""
        assert self.reason is not None
        usage = self.usage or Usage(completion_tokens=self.pieces)
        return Finish(self.reason, usage)
