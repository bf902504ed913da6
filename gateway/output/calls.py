"""Reading one tool call's JSON as its text arrives: the name as soon as it is whole, the
arguments as raw fragments (streamed as the model writes them)."""

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
