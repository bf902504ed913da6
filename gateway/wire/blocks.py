"""Deltas into content blocks (text, reasoning, tool call), in the order the model wrote them.

One :class:`Segmenter` per choice decides where a block opens, grows and closes; a body is
its :attr:`Segmenter.blocks` once the choice finished, a stream's events are what
:meth:`Segmenter.feed` returns on the way. Both come from the same decisions, so a collected
answer and a streamed one always have the same blocks (the Responses API's output items, the
Messages API's content blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, assert_never

from gateway.types import (
    Delta,
    EmbeddingDelta,
    Finish,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

BlockKind = Literal["text", "reasoning", "call"]


@dataclass
class Block:
    """One block of an answer; ``call_id`` and ``name`` only for a tool call."""

    kind: BlockKind
    index: int
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        """The text, a reasoning's text, or a call's arguments (JSON text)."""
        return "".join(self.pieces)


@dataclass(frozen=True, slots=True)
class Opened:
    block: Block


@dataclass(frozen=True, slots=True)
class Grew:
    block: Block
    piece: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Closed:
    block: Block


#: What feeding one delta did to the blocks; each consumer matches them exhaustively.
BlockEvent = Opened | Grew | Closed


class Segmenter:
    """The blocks of one choice. A text or reasoning delta grows the open block of its kind
    or opens a new one; a call's first delta opens a call block; :class:`Finish` closes the
    last one. Empty text opens nothing (a block is never empty of text unless it is a call).
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.current: Block | None = None
        self.finish: Finish | None = None
        self.reasoning_tokens = 0

    def feed(self, delta: Delta) -> list[BlockEvent]:
        match delta:
            case TextDelta(text=text, logprobs=logprobs):
                return self._grow("text", text, logprobs)
            case ReasoningDelta(text=text, tokens=tokens):
                self.reasoning_tokens += tokens
                return self._grow("reasoning", text, ())
            case ToolCallDelta(id=call_id, name=name, arguments=arguments):
                events = [] if call_id is None else self._open("call", call_id, name or "")
                block = self.current
                assert block is not None and block.kind == "call", "a call's first delta has id"
                if not arguments:
                    return events
                block.pieces.append(arguments)
                return [*events, Grew(block, arguments)]
            case Finish():
                self.finish = delta
                return self.close()
            case EmbeddingDelta():
                raise TypeError("an answer's blocks hold no embedding")
            case PromptProgress():
                return []  # before the answer, not part of it
            case _:
                assert_never(delta)

    def close(self) -> list[BlockEvent]:
        """Close the open block (idempotent)."""
        block, self.current = self.current, None
        return [] if block is None else [Closed(block)]

    @property
    def cut(self) -> bool:
        """The answer was cut by ``max_tokens``."""
        return self.finish is not None and self.finish.reason == "length"

    def _grow(
        self, kind: BlockKind, text: str, logprobs: tuple[TokenLogprob, ...]
    ) -> list[BlockEvent]:
        if not text and not logprobs:
            return []
        current = self.current
        events = [] if current is not None and current.kind == kind else self._open(kind)
        block = self.current
        assert block is not None
        block.pieces.append(text)
        block.logprobs.extend(logprobs)
        return [*events, Grew(block, text, logprobs)]

    def _open(self, kind: BlockKind, call_id: str = "", name: str = "") -> list[BlockEvent]:
        events = self.close()
        block = Block(kind, len(self.blocks), call_id=call_id, name=name)
        self.blocks.append(block)
        self.current = block
        return [*events, Opened(block)]
