"""Upstream SSE: lines into ``data`` payloads, payloads into the gateway's deltas.

The replica is asked for one choice (``n`` = 1) and for usage (``stream_options.include_usage``);
its chunks become :class:`TextDelta` pieces and, at ``[DONE]``, one :class:`Finish` carrying
its usage, cached prompt tokens included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backends.openai.errors import ReplicaFailed, UpstreamError, stream_error
from gateway.types import Finish, FinishReason, TextDelta, Usage

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

    def feed(self, data: str) -> TextDelta | None:
        """One event's data; the text it carries, if any. Raises on an upstream error event."""
        if data == DONE:
            self.done = True
            return None
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
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text += self._text(choice)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.reason = "length" if reason == "length" else "stop"
        if not text:
            return None
        self.pieces += 1
        return TextDelta(text)

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
