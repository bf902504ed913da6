"""Where the JSON sits in a sequence's output, and what must follow it.

- :class:`Answer`: the whole answer is one JSON value (``json_schema``, ``json_object``), after
  the reasoning of a thinking model.
- :class:`Calls`: tool calls in the ``hermes`` layout (``generic`` too): ``<tool_call>``, the
  head ``{"name": "f", "arguments": ``, the arguments, ``}``, ``</tool_call>``; forced
  (``required``, a named tool) or, under ``auto``, once the model has opened one.

Both are fed the output's bytes and answer two questions: the shortest text that finishes
(None: nothing to steer now), and the narrowed grammar of the rest, with the offset it starts
from. A narrowed grammar allows no call after the one being written. While a thinking model
reasons, nothing is steered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.output.finish.closing import narrowed, shortest
from gateway.output.finish.schemas import Doc, Narrow, Shortest, Unsupported, dumps, lit
from gateway.output.finish.tracker import Scalar, Tracker
from gateway.output.formats import ChatFormat
from gateway.output.grammar import GrammarBuilder
from gateway.output.schemas import closed
from gateway.types import GenerationRequest, ToolSpec

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
        end = self.text.find(self.reasoning.end.encode())
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


@dataclass
class _Call:
    """The call being written: its head, then its arguments' tracker."""

    start: int  # the first byte after the opening marker
    tracker: Tracker | None = None
    args_at: int = 0
    args_end: int | None = None  # just past the arguments


class Calls(Envelope):
    """Tool calls in the ``hermes`` layout; ``forced``: the answer must be calls."""

    HEAD = re.compile(r'[ \t\r\n]*\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')

    def __init__(
        self, fmt: ChatFormat, tools: tuple[ToolSpec, ...], *, forced: bool, opened: bool
    ) -> None:
        super().__init__(fmt, opened=opened)
        self.tools = {t.name: t for t in tools}
        self.forced = forced
        self.builder = GrammarBuilder(fmt)
        self.open, self.close = fmt.tools.call_open, fmt.tools.call_close
        self.call: _Call | None = None
        self.closed_calls = 0
        self._pos = 0
        self._lost = False

    @property
    def string(self) -> Scalar | None:
        call = self.call
        return call.tracker.string if call is not None and call.tracker is not None else None

    @property
    def lost(self) -> bool:
        call = self.call
        tracker = call.tracker if call is not None else None
        return self._lost or (tracker is not None and tracker.lost is not None)

    def _answer(self, data: bytes) -> None:
        assert self.start is not None
        self._pos = max(self._pos, self.start)
        while not self.lost and self._advance():
            pass

    def _advance(self) -> bool:
        """One step through the text not yet placed; False when it needs more."""
        call, text = self.call, self.text
        if call is None:
            at = text.find(self.open.encode(), self._pos)
            if at < 0:
                return False
            self._pos = at + len(self.open.encode())
            self.call = _Call(self._pos)
            return True
        if call.tracker is None:
            return self._head(call)
        if call.args_end is None:
            self._pos += call.tracker.feed(bytes(text[self._pos :]))
            if not call.tracker.done:
                return False
            call.args_end = self._pos
            return True
        at = text.find(self.close.encode(), call.args_end)
        if at < 0:
            return False
        self.closed_calls += 1
        self._pos = at + len(self.close.encode())
        self.call = None
        return True

    def _head(self, call: _Call) -> bool:
        m = self.HEAD.match(self.text[call.start :].decode(errors="ignore"))
        if m is None:
            return False
        tool = self.tools.get(json.loads(m.group(1)))
        try:
            if tool is None:
                raise Unsupported("a call of a tool not offered")
            root = closed(json.loads(tool.parameters))
            call.tracker = Tracker(Doc(root), root)
        except (ValueError, Unsupported):
            self._lost = True
            return False
        call.args_at = self._pos = call.start + len(m.group(0).encode())
        return True

    # -- finishing ----------------------------------------------------------------------------

    def shortest(self) -> str | None:
        if self.lost or self.start is None:
            return None
        call = self.call
        if call is None:
            if self.closed_calls:
                return ""
            if not self.forced:
                return None
            return self._open_left() + min(map(self._call_text, self.tools), key=len) + self.close
        if call.tracker is None:
            texts = [self._call_text(n) for n in self._names(call)]
            return min(texts, key=len) + self.close if texts else None
        if call.args_end is None:
            return shortest(call.tracker).body + "}" + self.close
        return self._close_left(call)

    def narrowed(self, chars: int) -> Finish | None:
        if self.lost or self.start is None:
            return None
        call = self.call
        close = f"WS? {self.builder.lit(self.close)}"
        if call is None:
            if self.closed_calls or not self.forced:
                return None
            left = self._open_left()
            opening = self.builder.lit(self.open) if left == self.open else lit(left)
            calls, bounded = self._calls(list(self.tools), chars)
            return Finish(None, f"{opening} WS? {calls} {close}", bounded)
        if call.tracker is None:  # the head is taken again from the call's start
            names = self._names(call)
            if not names:
                return None
            calls, bounded = self._calls(names, chars)
            return Finish(call.start, f"WS? {calls} {close}", bounded)
        if call.args_end is None:
            narrow = Narrow(call.tracker.doc, chars)
            rest = narrowed(call.tracker, narrow)
            back = None if rest.back is None else call.args_at + rest.back
            return Finish(back, f'{rest.body} "}}" {close}', narrow.bounded)
        after = self._after_args(call)
        if not after.startswith("}"):
            return Finish(None, f'"}}" {close}')
        written = after[1:].lstrip(WHITE)
        return Finish(None, lit(self._close_left(call)) if written else close)

    # -- pieces -------------------------------------------------------------------------------

    def _head_text(self, name: str) -> str:
        return f'{{"name": {dumps(name)}, "arguments": '

    def _call_text(self, name: str) -> str:
        doc = Doc(closed(json.loads(self.tools[name].parameters)))
        return self._head_text(name) + Shortest(doc).value(doc.root) + "}"

    def _calls(self, names: list[str], chars: int) -> tuple[str, int]:
        """A narrowed call of one of the tools ``names``, and its bounded values."""
        exprs, bounded = [], 0
        for name in names:
            doc = Doc(closed(json.loads(self.tools[name].parameters)))
            narrow = Narrow(doc, chars)
            args = narrow.value(doc.root)
            exprs.append(f'{lit(self._head_text(name))} {args} "}}"')
            bounded = max(bounded, narrow.bounded)
        return _choice(exprs), bounded

    def _names(self, call: _Call) -> list[str]:
        """The tools the head written so far may still name."""
        head = self.text[call.start :].decode(errors="ignore").lstrip(WHITE)
        return [n for n in self.tools if self._head_text(n).startswith(head)]

    def _open_left(self) -> str:
        """What is left of the opening marker (its start may be written)."""
        tail = self.text[self._pos :].decode(errors="ignore")
        for n in range(min(len(self.open), len(tail)), 0, -1):
            if self.open.startswith(tail[-n:]):
                return self.open[n:]
        return self.open

    def _after_args(self, call: _Call) -> str:
        assert call.args_end is not None
        return self.text[call.args_end :].decode(errors="ignore")

    def _close_left(self, call: _Call) -> str:
        """What is left of ``}`` and the closing marker after the arguments."""
        after = self._after_args(call)
        if not after.startswith("}"):
            return "}" + self.close
        written = after[1:].lstrip(WHITE)
        return self.close[len(written) :] if self.close.startswith(written) else self.close


def _choice(options: list[str]) -> str:
    unique = list(dict.fromkeys(options))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


def envelope_for(request: GenerationRequest) -> Envelope | None:
    """The envelope of a constrained generation (None: nothing the finisher can steer)."""
    plan = request.output
    if plan is None or plan.grammar is None:
        return None
    fmt = plan.format
    opened = request.tokenized is not None and request.tokenized.reasoning_open
    offered = request.tools.offered if request.tools is not None else ()
    if offered:
        # a custom tool's raw input follows its own grammar: the finisher steers the others
        tools = tuple(t for t in offered if t.freeform is None)
        if fmt is None or fmt.tools.name not in ("hermes", "generic") or not tools:
            return None
        forced = request.tools is not None and request.tools.choice in ("required", "named")
        return Calls(fmt, tools, forced=forced, opened=opened)
    rf = request.response_format
    if rf is None:
        return None
    return Answer(fmt, rf.schema or '{"type": "object"}', opened=opened)
