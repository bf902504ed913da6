"""Where the JSON sits in a sequence's output, and what must follow it.

- :class:`Answer`: the whole answer is one JSON value (``json_schema``, ``json_object``), after
  the reasoning of a thinking model.
- :class:`~gateway.output.finish.calls.Calls`: tool calls between their markers; forced
  (``required``, a named tool) or, under ``auto``, once the model has opened one.

Both are fed the output's bytes and answer two questions: the shortest text that finishes
(None: nothing to steer now), and the narrowed grammar of the rest, with the offset it starts
from. A narrowed grammar allows no call after the one being written. While a thinking model
reasons, nothing is steered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.output.finish.closing import dearest_step, narrowed, shortest
from gateway.output.finish.schemas import Doc, Narrow
from gateway.output.finish.tracker import Scalar, Tracker
from gateway.output.formats import ChatFormat
from gateway.output.schemas import closed

WHITE = " \t\r\n"


@dataclass(frozen=True)
class Finish:
    """The narrowed grammar ``body`` (a Lark expression) of the output from byte ``back``
    (None: from its end)."""

    back: int | None
    body: str
    #: Strings and numbers in it whose length is bounded (they share the budget left).
    bounded: int = 0


class Envelope:
    """The output's bytes, and whether the answer (after any reasoning) has begun."""

    def __init__(self, fmt: ChatFormat | None, *, opened: bool) -> None:
        self.reasoning = fmt.reasoning if fmt is not None else None
        self.text = bytearray()
        #: Bumped whenever what finishing needs may have changed (not by a string's content).
        self.version = 0
        self.thinking = opened and self.reasoning is not None
        self._decided = self.thinking or self.reasoning is None
        #: Where the answer starts (after the reasoning); None: not yet.
        self.start: int | None = 0 if self.reasoning is None else None
        self._searched = 0  # the reasoning's end marker is not before this offset

    def feed(self, data: bytes) -> None:
        self.text += data
        if self.start is None:
            self._find_start()
            if self.start is None:
                return
            data = bytes(self.text[self.start :])
        before = self.string
        self._answer(data)
        if before is None or self.string is not before:
            self.version += 1

    def _find_start(self) -> None:
        assert self.reasoning is not None
        if not self._decided:
            head = self.text.decode(errors="ignore").lstrip(WHITE)
            opening = self.reasoning.start
            if head.startswith(opening):
                self._decided = self.thinking = True
            elif head and not opening.startswith(head[: len(opening)]):
                self._decided, self.start = True, 0
            return
        marker = self.reasoning.end.encode()
        end = self.text.find(marker, self._searched)
        self._searched = max(0, len(self.text) - len(marker) + 1)
        if end >= 0:
            self.thinking = False
            self.start = end + len(self.reasoning.end)
            self.version += 1

    def _answer(self, data: bytes) -> None:
        raise NotImplementedError

    @property
    def string(self) -> Scalar | None:
        """The JSON string being written (its content does not change the finish)."""
        return None

    @property
    def lost(self) -> bool:
        return False

    def shortest(self) -> str | None:
        """The shortest text that finishes the output (None: nothing to steer now)."""
        raise NotImplementedError

    def dearest_step(self) -> str:
        """The most one step of the model can add to the shortest finish (text)."""
        return ""

    def narrowed(self, chars: int) -> Finish | None:
        """The narrowed grammar of the rest, each free string bounded to ``chars`` more
        characters (None: nothing to steer now)."""
        raise NotImplementedError


class Answer(Envelope):
    """The answer is one JSON value."""

    def __init__(self, fmt: ChatFormat | None, schema: str, *, opened: bool) -> None:
        super().__init__(fmt, opened=opened)
        root = closed(json.loads(schema))
        self.tracker = Tracker(Doc(root), root)

    def _answer(self, data: bytes) -> None:
        self.tracker.feed(data)

    @property
    def string(self) -> Scalar | None:
        return self.tracker.string

    @property
    def lost(self) -> bool:
        return self.tracker.lost is not None

    def shortest(self) -> str | None:
        if self.start is None or self.lost:
            return None
        return shortest(self.tracker).body

    def dearest_step(self) -> str:
        return dearest_step(self.tracker) if not self.lost else ""

    def narrowed(self, chars: int) -> Finish | None:
        if self.start is None or self.lost:
            return None
        narrow = Narrow(self.tracker.doc, chars)
        rest = narrowed(self.tracker, narrow)
        back = None if rest.back is None else self.start + rest.back
        t = self.tracker
        if self.reasoning is not None and not t.stack and t.scalar is None and not t.done:
            return Finish(back, f"WS? {rest.body}", narrow.bounded)  # white space may follow
        return Finish(back, rest.body, narrow.bounded)
