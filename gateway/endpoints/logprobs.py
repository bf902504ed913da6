"""Log probabilities as the two completion APIs write them."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.types import TokenLogprob, TopLogprob


def _top(t: TopLogprob) -> dict[str, object]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, object]:
    """``choices[].logprobs`` of a chat completion (or of one chunk)."""
    content = [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [_top(t) for t in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob], offset: int, top: int
) -> dict[str, object]:
    """``choices[].logprobs`` of a text completion; ``offset``: where the first token's text
    starts in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top[:top]} for e in entries]
        if top
        else None,
        "text_offset": offsets,
    }
