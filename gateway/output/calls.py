"""Reading one tool call as its text arrives: a JSON call's name as soon as it is whole, its
arguments as raw fragments (streamed as the model writes them); a custom tool's raw call
(:class:`RawCall`) as the JSON arguments ``{"input": ...}`` of its input."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["key", "colon", "value", "after", "done"]
_WS = " \t\r\n"


@dataclass
class _Value:
    """The value of one key of the call object, being read."""

    key: str
    kind: Literal["string", "container", "primitive"]
    raw: list[str] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, c: str) -> bool:
        """Take ``c``; True once the value is complete (``c`` included), False if it goes on.
        A primitive ends before the character that ends it: the caller re-reads that one."""
        if self.kind == "primitive":
            if c in ",}" or c in _WS:
                return True
            self.raw.append(c)
            return False
        self.raw.append(c)
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                return self.kind == "string"
            return False
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class CallObject:
    """One call object, ``{"name": "...", "arguments": {...}}`` (keys in any order), or with
    ``name`` given, an arguments object alone (Mistral's ``name[ARGS]{...}``)."""

    def __init__(self, arguments_keys: tuple[str, ...], name: str | None = None) -> None:
        self.arguments_keys = arguments_keys
        self.name = name
        self.phase: Phase = "key"
        self._key: _Value | None = None
        self._value: _Value | None = None
        self._pending: list[str] = []
        self.saw_arguments = False
        #: An arguments object alone: every character is arguments text.
        self._whole = _Value("", "container") if name is not None else None
        self._opened = False
        self._key_name = ""

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def take_arguments(self) -> str:
        """Arguments text read since the last call (only once the name is known)."""
        if self.name is None or not self._pending:
            return ""
        text = "".join(self._pending)
        self._pending.clear()
        return text

    def feed(self, text: str) -> int:
        """Read ``text`` (starting at or after the object's ``{``); returns how many characters
        belong to the object (the rest follows it)."""
        for i, c in enumerate(text):
            if self.done:
                return i
            if self._whole is not None:
                self._pending.append(c)
                self.saw_arguments = True
                if self._whole.feed(c):
                    self.phase = "done"
                continue
            self._step(c)
        return len(text)

    def _step(self, c: str) -> None:
        if not self._opened:  # the opening brace
            self._opened = True
            return
        if self._value is not None:
            self._value_char(c)
            return
        if self._key is not None:
            if self._key.feed(c):
                self._key_name = self._key_text()
                self.phase = "colon"
            return
        if c in _WS:
            return
        if self.phase == "key" and c == '"':
            self._key = _Value("", "string", raw=[c], in_string=True)
        elif self.phase == "colon" and c == ":":
            self.phase = "value"
        elif self.phase == "value":
            self._start_value(c)
        elif c == ",":
            self.phase = "key"
        elif c == "}":
            self.phase = "done"

    def _start_value(self, c: str) -> None:
        key = self._key_name
        kind: Literal["string", "container", "primitive"] = (
            "string" if c == '"' else "container" if c in "{[" else "primitive"
        )
        self._value = _Value(key, kind)
        self._value_char(c)

    def _key_text(self) -> str:
        key, self._key = self._key, None
        if key is None:
            return ""
        try:
            text = json.loads("".join(key.raw))
        except ValueError:
            return ""
        return text if isinstance(text, str) else ""

    def _value_char(self, c: str) -> None:
        value = self._value
        assert value is not None
        complete = value.feed(c)
        if value.key in self.arguments_keys and value.kind == "container":
            self._pending.append(c)
            self.saw_arguments = True
        if not complete:
            return
        self._value = None
        self.phase = "after"
        self._finish_value(value)
        if value.kind == "primitive":
            self._step(c)  # the character that ended it belongs to the object

    def _finish_value(self, value: _Value) -> None:
        raw = "".join(value.raw)
        if value.key == "name" and value.kind == "string":
            try:
                name = json.loads(raw)
            except ValueError:
                return
            if isinstance(name, str):
                self.name = name
        elif value.key in self.arguments_keys and value.kind != "container":
            self.saw_arguments = True
            try:  # arguments written as a JSON string holding the JSON text
                decoded = json.loads(raw)
            except ValueError:
                decoded = raw
            self._pending.append(decoded if isinstance(decoded, str) else raw)


class RawCall:
    """A custom tool's raw call (``name`` read from its first line): its input is every
    character up to the first ``close`` marker, handed on as the JSON arguments
    ``{"input": "..."}`` (the text escaped piece by piece as it streams), so that what the
    client gets decodes to the input exactly as the model wrote it."""

    def __init__(self, name: str, close: str) -> None:
        self.name: str | None = name
        self.close = close
        self.saw_arguments = True
        self.phase: Literal["input", "done"] = "input"
        self._pending: list[str] = ['{"input": "']

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def take_arguments(self) -> str:
        text = "".join(self._pending)
        self._pending.clear()
        return text

    def _input(self, text: str) -> None:
        if text:
            self._pending.append(json.dumps(text, ensure_ascii=False)[1:-1])

    def feed(self, text: str, *, final: bool = False) -> int:
        """Read ``text``; returns how many characters were used: up to and including the
        closing marker, or all but a tail that could begin it (all, if ``final``)."""
        if self.done:
            return 0
        at = text.find(self.close)
        if at >= 0:
            self._input(text[:at])
            self._end()
            return at + len(self.close)
        keep = 0 if final else _tail(text, self.close)
        self._input(text[: len(text) - keep])
        if final:
            self._end()
        return len(text) - keep

    def _end(self) -> None:
        self._pending.append('"}')
        self.phase = "done"


def _tail(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
