"""Reading one tool call as its text arrives: a JSON call's name as soon as it is whole, its
arguments as raw fragments (streamed as the model writes them); a custom tool's raw call
(:class:`RawCall`) as the JSON arguments ``{"input": ...}`` of its input, and back: a custom
call's input from those arguments, whole (:func:`custom_input`) or piece by piece as they
stream (:class:`CustomInput`), for every endpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import llguidance

from gateway.types import Tools

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
    character up to the closing marker ``close``, handed on as the JSON arguments
    ``{"input": "..."}`` (the text escaped piece by piece as it streams), so that what the
    client gets decodes to the input exactly as the model wrote it.

    The first ``close`` ends the input, unless ``ends`` (a Lark tool's grammar) says the
    input before it is not complete: then the marker is input text (the output grammar lets
    a Lark input hold the marker; a regex or text input never does)."""

    def __init__(self, name: str, close: str, ends: GrammarEnd | None = None) -> None:
        self.name: str | None = name
        self.close = close
        self.ends = ends
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
            if self.ends is not None:
                self.ends.feed(text)

    def feed(self, text: str, *, final: bool = False, cut: bool = False) -> int:
        """Read ``text``; returns how many characters were used: up to and including the
        closing marker, or all but a tail that could begin it (all, if ``final``; that tail
        dropped if ``cut``: the generation ran out of tokens while writing the marker)."""
        if self.done:
            return 0
        used = 0
        while (at := text.find(self.close, used)) >= 0:
            self._input(text[used:at])
            if self.ends is None or self.ends.complete():
                self._end()
                return at + len(self.close)
            self._input(self.close)  # inside the input: the grammar goes on
            used = at + len(self.close)
        keep = _tail(text[used:], self.close)
        self._input(text[used : len(text) - (0 if final and not cut else keep)])
        if final:
            self._end()
            return len(text)
        return len(text) - keep

    def _end(self) -> None:
        self._pending.append('"}')
        self.phase = "done"


class _Bytes:
    """A vocabulary of one token per byte (and EOS), to run a grammar over text."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


_BYTES: llguidance.LLTokenizer | None = None


@lru_cache(maxsize=64)
def _matcher(lark: str) -> llguidance.LLMatcher | None:
    """A fresh matcher of a custom tool's Lark grammar over bytes (None: it does not
    compile), copied for each call that needs it."""
    global _BYTES
    if _BYTES is None:
        _BYTES = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))
    matcher = llguidance.LLMatcher(_BYTES, llguidance.LLMatcher.grammar_from_lark(lark))
    return None if matcher.is_error() else matcher


class GrammarEnd:
    """Whether a raw input is complete under its tool's Lark grammar. The grammar is only
    compiled (once per grammar, cached) when a closing marker is met inside an input; an
    input the grammar rejects (a backend that did not enforce it) ends at the marker."""

    def __init__(self, lark: str) -> None:
        self.lark = lark
        self._unread: list[bytes] = []
        self._matcher: llguidance.LLMatcher | None = None
        self._failed = False

    def feed(self, text: str) -> None:
        if not self._failed:
            self._unread.append(text.encode())

    def complete(self) -> bool:
        """The input read so far is a whole sentence of the grammar (or the grammar cannot
        tell: it does not compile, or the input left it)."""
        if self._failed:
            return True
        if self._matcher is None:
            base = _matcher(self.lark)
            if base is None:
                self._failed = True
                return True
            self._matcher = base.deep_copy()
        data = b"".join(self._unread)
        self._unread.clear()
        m = self._matcher
        if (data and not m.consume_tokens(list(data))) or m.is_error():
            self._failed = True
            return True
        return m.is_accepting()


def _tail(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def custom_names(tools: Tools | None) -> frozenset[str]:
    """The names of a request's custom tools (free-text input: their calls are written raw
    where the format allows, and a client gets their input, not JSON arguments)."""
    specs = tools.specs if tools is not None else ()
    return frozenset(t.name for t in specs if t.freeform is not None)


def custom_arguments(text: str) -> str:
    """A custom tool's free-text input as the JSON arguments ``{"input": "..."}`` the core
    carries for it (what the model writes in a format that cannot write the input raw)."""
    return json.dumps({"input": text}, ensure_ascii=False)


def input_of(arguments: str) -> str | None:
    """A custom tool call's input from the JSON arguments ``{"input": "..."}`` the core
    carries for it (None: they are not that). A raw control character in the string is
    taken as it is (a model whose output was not held to the grammar may write one)."""
    try:
        value = json.loads(arguments, strict=False)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return str(value["input"])
    return None


def custom_input(arguments: str) -> str:
    """A custom tool call's input, exactly as the model wrote it, from its JSON arguments
    (:func:`input_of`; the arguments themselves if they are not ``{"input": "..."}``)."""
    text = input_of(arguments)
    return arguments if text is None else text


#: The start of a custom call's JSON arguments, up to its input's first character.
_HEAD = re.compile(r'\s*\{\s*"input"\s*:\s*"')
#: JSON string text that decodes alone: characters and whole escapes.
_STRING = re.compile(r'(?:[^"\\]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
#: What could begin an escape, cut by the end of a piece.
_PART_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")


@dataclass
class CustomInput:
    """A custom call's input, piece by piece, from the pieces of its JSON arguments
    ``{"input": "..."}`` as the core streams them: :meth:`feed` says what each piece adds to
    the decoded input (an escape cut in two, or a surrogate pair's high half, held back until
    it is whole), :meth:`end` what is left at the call's end, so that the pieces together
    are :func:`custom_input` of the whole arguments. Arguments of another shape (never
    written under the tool's grammar) come whole at the end."""

    state: Literal["head", "input", "done"] = "head"
    _buf: str = ""
    _arguments: list[str] = field(default_factory=list)
    _sent: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> str:
        self._arguments.append(piece)
        if self.state == "done":
            return ""
        self._buf += piece
        if self.state == "head":
            match = _HEAD.match(self._buf)
            if match is None:
                return ""
            self._buf = self._buf[match.end() :]
            self.state = "input"
        text = self._decode()
        if text:
            self._sent.append(text)
        return text

    def _decode(self) -> str:
        buf = self._buf
        end = _STRING.match(buf)
        assert end is not None  # it matches the empty string
        body, rest = buf[: end.end()], buf[end.end() :]
        if rest.startswith('"'):
            self.state = "done"
            rest = ""
        elif rest and not _PART_ESCAPE.fullmatch(rest):  # not JSON: the rest as it is
            body, rest = body + json.dumps(rest)[1:-1], ""
        elif _HIGH_SURROGATE.search(body):  # its low half may come next
            body, rest = body[:-6], body[-6:] + rest
        self._buf = rest
        return str(json.loads(f'"{body}"', strict=False))

    def end(self) -> str:
        """The input not yet handed on, at the call's end: the rest of
        :func:`custom_input` of the whole arguments ("" where the pieces already went
        another way: arguments cut inside their string, which :func:`custom_input` gives
        whole)."""
        if not self._arguments:
            return ""
        whole = custom_input("".join(self._arguments))
        sent = "".join(self._sent)
        self.state = "done"
        self._arguments.clear()
        if not whole.startswith(sent):
            return ""
        self._sent.append(whole[len(sent) :])
        return whole[len(sent) :]
