"""Tool calls as the finisher follows them, in the layouts whose calls are JSON objects
``{"name": "f", "<arguments key>": {...}}``:

- ``hermes`` / ``generic``: ``<tool_call>`` call ``</tool_call>`` per call;
- ``llama3``: the call bare (after ``<|python_tag|>`` when the model writes it), ``;`` between;
- ``mistral``: ``[TOOL_CALLS][`` call ``, `` call ``]``.

The head up to the arguments is literal in the request's grammar, so the call's name is known
before its arguments begin and chooses their schema. Once steered, no further call may start.
(``mistral_args``, whose calls are not JSON objects, is not steered.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.output.finish.closing import dearest_step, narrowed, shortest
from gateway.output.finish.envelope import WHITE, Envelope, Finish
from gateway.output.finish.schemas import (
    Doc,
    Narrow,
    Shortest,
    Unsupported,
    alternatives,
    dumps,
    lit,
)
from gateway.output.finish.tracker import Scalar, Tracker
from gateway.output.formats import ChatFormat
from gateway.output.grammar import GrammarBuilder
from gateway.output.schemas import closed
from gateway.types import ToolSpec

LAYOUTS = ("hermes", "generic", "llama3", "mistral")


@dataclass(frozen=True)
class Layout:
    """Where calls sit in a format's output."""

    key: str  # the arguments' key in a call object
    opening: tuple[str, ...]  # pieces before the first call (markers, "[")
    optional: str  # a marker that may precede the first call (llama3's python_tag)
    sep: str  # what starts each later call
    close: str  # what ends each call after its "}"
    end: str  # what ends the calls
    space: bool  # white space may come before a call's "{" and its closing marker


def layout_of(fmt: ChatFormat) -> Layout | None:
    t = fmt.tools
    if t.name in ("hermes", "generic"):
        return Layout(t.arguments_key, (t.call_open,), "", t.call_open, t.call_close, "", True)
    if t.name == "llama3":
        return Layout(t.arguments_key, (), t.start, ";", "", "", False)
    if t.name == "mistral":
        return Layout(t.arguments_key, (t.start, "["), "", ",", "", "]", False)
    return None


@dataclass
class _Call:
    """The call being written: its head, then its arguments' tracker."""

    start: int  # the first byte after what opened it
    tracker: Tracker | None = None
    args_at: int = 0
    args_end: int | None = None  # just past the arguments


class Calls(Envelope):
    """Tool calls; ``forced``: the answer must be calls."""

    def __init__(
        self,
        fmt: ChatFormat,
        layout: Layout,
        tools: tuple[ToolSpec, ...],
        *,
        forced: bool,
        opened: bool,
        more: bool = True,
    ) -> None:
        super().__init__(fmt, opened=opened)
        #: More than one call may be written.
        self.more = more
        self.layout = layout
        self.tools = {t.name: t for t in tools}
        self.forced = forced
        self.builder = GrammarBuilder(fmt)
        key = re.escape(json.dumps(layout.key))
        self.head = re.compile(r'[ \t\r\n]*\{"name": ("(?:[^"\\]|\\.)*"), ' + key + ": ")
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

    # -- following ----------------------------------------------------------------------------

    def _advance(self) -> bool:
        """One step through the text not yet placed; False when it needs more."""
        call = self.call
        if call is None:
            return self._find_call()
        if call.tracker is None:
            return self._head(call)
        if call.args_end is None:
            self._pos += call.tracker.feed(bytes(self.text[self._pos :]))
            if not call.tracker.done:
                return False
            call.args_end = self._pos
            return True
        left = self._close_left(call)
        if left is None or left:
            return False
        after = self._after_args(call)[1:]
        if self.layout.space:
            after = after.lstrip(WHITE)
        end = len(self._after_args(call)) - len(after) + len(self.layout.close)
        self._pos = call.args_end + len(self._after_args(call)[:end].encode())
        self.closed_calls += 1
        self.call = None
        return True

    def _find_call(self) -> bool:
        """The next call's start, once what opens it is written."""
        text = self.text[self._pos :].decode(errors="ignore")
        lay = self.layout
        if self.closed_calls:  # a later call: right after the last one
            rest = text.lstrip(WHITE) if lay.space else text
            if not rest.startswith(lay.sep):
                return False
            at = len(text) - len(rest) + len(lay.sep)
        elif lay.opening:  # after its opening marker, wherever the model writes it
            opener = "".join(lay.opening)
            found = text.find(opener)
            if found < 0:
                self._pos += len(text[: max(0, len(text) - len(opener))].encode())
                return False
            at = found + len(opener)
        elif lay.optional and text.startswith(lay.optional):
            at = len(lay.optional)
        elif lay.optional and lay.optional.startswith(text):
            return False  # its marker may be being written
        else:  # llama3: the call is the answer
            at = 0
        self._pos += len(text[:at].encode())
        self.call = _Call(self._pos)
        return True

    def _head(self, call: _Call) -> bool:
        m = self.head.match(self.text[call.start :].decode(errors="ignore"))
        if m is None:
            return False
        tool = self.tools.get(json.loads(m.group(1)))
        try:
            if tool is None:
                raise Unsupported("a call of a tool the finisher does not steer")
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
        call, lay = self.call, self.layout
        if call is None:
            if self.closed_calls:
                return lay.end
            if not self.forced:
                return None
            short = min(map(self._call_text, self.tools), key=len)
            return self._open_left() + short + "}" + lay.close + lay.end
        if call.tracker is None:
            texts = [self._call_text(n) for n in self._names(call)]
            return min(texts, key=len) + "}" + lay.close + lay.end if texts else None
        if call.args_end is None:
            return shortest(call.tracker).body + "}" + lay.close + lay.end
        left = self._close_left(call)
        return None if left is None else left + lay.end

    def narrowed(self, chars: int) -> Finish | None:
        if self.lost or self.start is None:
            return None
        call, lay = self.call, self.layout
        # no optional white space: the markers and brackets left are forced, so they are
        # written in their usual tokens (what the budget was counted in)
        tail = " ".join(p for p in (self._lit(lay.close), self._lit(lay.end)) if p)
        if call is None:
            if self.closed_calls:  # no further call
                return Finish(None, self._lit(lay.end) or '""')
            if not self.forced:
                return None
            calls, bounded = self._calls(list(self.tools), chars)
            return Finish(None, f'{self._open_expr()} {calls} "}}" {tail}', bounded)
        if call.tracker is None:  # the head is taken again from the call's start
            names = self._names(call)
            if not names:
                return None
            calls, bounded = self._calls(names, chars)
            spaced = self.text[call.start : call.start + 1].decode(errors="ignore").isspace()
            ws = "WS? " if spaced else ""  # white space written after the marker is replayed
            return Finish(call.start, f'{ws}{calls} "}}" {tail}', bounded)
        if call.args_end is None:
            narrow = Narrow(call.tracker.doc, chars)
            rest = narrowed(call.tracker, narrow)
            back = None if rest.back is None else call.args_at + rest.back
            return Finish(back, f'{rest.body} "}}" {tail}', narrow.bounded)
        after = self._after_args(call)
        if not after.startswith("}"):
            return Finish(None, f'"}}" {tail}')
        left = self._close_left(call)
        if left is None:
            return None
        written = after[1:].lstrip(WHITE)
        if not written:
            return Finish(None, tail or '""')
        return Finish(None, " ".join(p for p in (lit(left), self._lit(lay.end)) if p))

    def dearest_step(self) -> str:
        call = self.call
        if call is not None and call.tracker is not None and call.args_end is None:
            return dearest_step(call.tracker)
        if call is None and self.closed_calls and self.more:  # one more call may begin
            return self.layout.sep + min(map(self._call_text, self.tools), key=len) + "}"
        return ""

    # -- pieces -------------------------------------------------------------------------------

    def _lit(self, text: str) -> str:
        return self.builder.lit(text) if text else ""

    def _head_text(self, name: str) -> str:
        return f'{{"name": {dumps(name)}, {json.dumps(self.layout.key)}: '

    def _call_text(self, name: str) -> str:
        doc = Doc(closed(json.loads(self.tools[name].parameters)))
        return self._head_text(name) + Shortest(doc).value(doc.root)

    def _calls(self, names: list[str], chars: int) -> tuple[str, int]:
        """A narrowed call (head and arguments) of one of the tools ``names``, and its
        bounded values."""
        exprs, bounded = [], 0
        for name in names:
            doc = Doc(closed(json.loads(self.tools[name].parameters)))
            narrow = Narrow(doc, chars)
            args = narrow.value(doc.root)
            exprs.append(f"{lit(self._head_text(name))} {args}")
            bounded = max(bounded, narrow.bounded)
        return alternatives(exprs), bounded

    def _names(self, call: _Call) -> list[str]:
        """The tools the head written so far may still name."""
        head = self.text[call.start :].decode(errors="ignore").lstrip(WHITE)
        return [n for n in self.tools if self._head_text(n).startswith(head)]

    def _opening_pieces(self) -> list[str]:
        """The pieces of the opening still to write (the start of a text marker may be)."""
        pieces = list(self.layout.opening)
        tail = self.text[self._pos :].decode(errors="ignore").lstrip(WHITE)
        while pieces and tail:
            first = pieces[0]
            if tail.startswith(first):
                tail = tail[len(first) :]
                pieces.pop(0)
            elif first.startswith(tail):
                pieces[0] = first[len(tail) :]
                tail = ""
            else:
                break
        return pieces

    def _open_left(self) -> str:
        return "".join(self._opening_pieces())

    def _open_expr(self) -> str:
        full = list(self.layout.opening)
        pieces = self._opening_pieces()
        exprs = [self._lit(p) if p in full else lit(p) for p in pieces]
        return " ".join(e for e in exprs if e) or '""'

    def _after_args(self, call: _Call) -> str:
        assert call.args_end is not None
        return self.text[call.args_end :].decode(errors="ignore")

    def _close_left(self, call: _Call) -> str | None:
        """What is left of ``}`` and the closing marker after the arguments ("": the call is
        closed; None: the text went elsewhere)."""
        after = self._after_args(call)
        close = self.layout.close
        if not after.startswith("}"):
            return "}" + close if not after else None
        written = after[1:].lstrip(WHITE) if self.layout.space else after[1:]
        if not close:
            return ""
        return close[len(written) :] if close.startswith(written) else None
