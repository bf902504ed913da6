"""Where a JSON text being written stands: a stack of open objects and arrays (with the keys
and items written so far) and the scalar being written, fed a few bytes at a time.

The grammar guarantees the text is a valid prefix, so the tracker only follows it: a byte it
cannot place marks it :attr:`Tracker.lost` (the sequence is then not steered).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from gateway.output.finish.schemas import (
    Doc,
    Schema,
    Unsupported,
    item_schema,
    key_schema,
    kind,
)

#: After ``{``: a key or ``}``; after ``,``: a key or an item; in a key; after a key (its
#: ``:`` next); after ``:``: the value; after a value or an item.
State = Literal["open", "sep", "key", "colon", "value", "after"]
WHITE = b" \t\r\n"
NUMBER = b"0123456789+-.eE"


@dataclass
class Frame:
    """An open object or array, with the schemas it may still be following."""

    array: bool
    schemas: list[Schema]
    state: State = "open"
    keys: list[str] = field(default_factory=list)
    count: int = 0


@dataclass
class Scalar:
    """The string, number or literal being written, from its first byte (``start``: its offset
    in the text fed)."""

    start: int
    schemas: list[Schema]
    kind: Literal["string", "number", "literal"]
    key: bool = False
    raw: bytearray = field(default_factory=bytearray)
    escape: int = 0  # bytes of an escape still to come (-1: the letter after a backslash)

    @property
    def chars(self) -> int:
        """Characters written so far (an escape is one, so is a character cut between
        tokens)."""
        text = self.raw.decode(errors="replace")
        count = i = 0
        while i < len(text):
            count += 1
            i += (6 if text[i + 1 : i + 2] == "u" else 2) if text[i] == "\\" else 1
        return count


class Tracker:
    def __init__(self, doc: Doc, root: object) -> None:
        self.doc = doc
        self.root = root
        self.stack: list[Frame] = []
        self.scalar: Scalar | None = None
        self.done = False
        self.lost: str | None = None
        #: Bytes fed so far, and the last one that was not white space.
        self.size = 0
        self.last = 0
        #: The last byte fed was white space.
        self.white = False

    # -- what comes next --------------------------------------------------------------------

    def expected(self) -> list[Schema]:
        """The schemas the next value may follow."""
        if not self.stack:
            return self.doc.options(self.root)
        top = self.stack[-1]
        out: list[Schema] = []
        for s in top.schemas:
            sub = item_schema(s, top.count) if top.array else key_schema(s, top.keys[-1])
            if sub is not None:
                out.extend(self.doc.options(sub))
        return out

    # -- feeding ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Follow ``data``; the bytes taken (fewer once the value is complete: what follows
        it is not JSON)."""
        for i, byte in enumerate(data):
            if self.lost is not None:
                return i
            if self.done and self.scalar is None:
                return i
            try:
                self._byte(byte)
            except Unsupported as err:
                self.lost = str(err)
            self.size += 1
        return len(data)

    @property
    def string(self) -> Scalar | None:
        """The string being written, if one is."""
        s = self.scalar
        return s if s is not None and s.kind == "string" else None

    def _byte(self, byte: int) -> None:
        s = self.scalar
        if s is not None:
            if s.kind == "string":
                self._string_byte(s, byte)
                return
            if byte in NUMBER or (s.kind == "literal" and 0x61 <= byte <= 0x7A):
                s.raw.append(byte)
                return
            self.scalar = None
            self._value_done(s.raw.decode())
        if byte in WHITE:
            self.white = True
            return
        self.last, self.white = byte, False
        if self.done:
            self.lost = "text after the value"
            return
        self._structure(byte)

    def _string_byte(self, s: Scalar, byte: int) -> None:
        if s.escape == -1:
            s.escape = 4 if byte == 0x75 else 0  # \uXXXX
        elif s.escape > 0:
            s.escape -= 1
        elif byte == 0x5C:
            s.escape = -1
        elif byte == 0x22:
            self.scalar = None
            self.last = byte
            try:
                text = json.loads(b'"' + bytes(s.raw) + b'"')
            except ValueError:
                raise Unsupported("a string the tracker cannot read") from None
            if s.key:
                top = self.stack[-1]
                top.keys.append(text)
                top.state = "colon"
                top.schemas = [x for x in top.schemas if key_schema(x, text) is not None]
                if not top.schemas:
                    raise Unsupported(f"key {text!r} fits no schema")
            else:
                self._value_done(json.dumps(text, ensure_ascii=False))
            return
        s.raw.append(byte)

    def _structure(self, byte: int) -> None:
        top = self.stack[-1] if self.stack else None
        ch = chr(byte)
        if ch == '"' and top is not None and not top.array and top.state in ("open", "sep"):
            top.state = "key"
            self.scalar = Scalar(self.size, top.schemas, "string", key=True)
        elif ch == ":" and top is not None and top.state == "colon":
            top.state = "value"
        elif ch == "," and top is not None and top.state == "after":
            top.state = "sep"
        elif ch in "}]" and top is not None and top.array == (ch == "]"):
            self.stack.pop()
            self._value_done(None)
        elif self._wants_value(top):
            self._value(ch)
        else:
            raise Unsupported(f"unexpected {ch!r}")

    @staticmethod
    def _wants_value(top: Frame | None) -> bool:
        if top is None:
            return True
        return top.state == "value" if not top.array else top.state in ("open", "sep")

    def _value(self, ch: str) -> None:
        options = self.expected()
        if ch in "{[":
            want = "object" if ch == "{" else "array"
            fits = [s for s in options if kind(s) in (want, "any")]
            if not fits:
                raise Unsupported(f"no schema takes an {want} here")
            self.stack.append(Frame(ch == "[", fits))
            return
        if ch == '"':
            self.scalar = Scalar(self.size, options, "string")
        elif ch in "-0123456789":
            self.scalar = Scalar(self.size, options, "number", raw=bytearray(ch.encode()))
        elif ch in "tfn":
            self.scalar = Scalar(self.size, options, "literal", raw=bytearray(ch.encode()))
        else:
            raise Unsupported(f"unexpected {ch!r}")

    def _value_done(self, raw: str | None) -> None:
        """A value ended (``raw``: its JSON text, for a scalar)."""
        if not self.stack:
            self.done = True
            return
        top = self.stack[-1]
        if top.array:
            top.count += 1
        elif raw is not None:
            key = top.keys[-1]
            fits = [s for s in top.schemas if _admits(self.doc, key_schema(s, key), raw)]
            top.schemas = fits or top.schemas
        top.state = "after"


def _admits(doc: Doc, sub: object, raw: str) -> bool:
    """``sub`` does not rule out the scalar ``raw`` by a const or an enum (the test that
    tells a tagged union's branches apart)."""
    if sub is None:
        return False
    schema = doc.resolve(sub)
    value = json.loads(raw)
    if "const" in schema:
        return bool(schema["const"] == value)
    if isinstance(schema.get("enum"), list):
        return value in schema["enum"]
    return True
