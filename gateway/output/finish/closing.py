"""From where a JSON text stands (:class:`~gateway.output.finish.tracker.Tracker`) to what
finishes it: the shortest text that does (to count its tokens), and the narrowed grammar of
the rest (to enforce it).

Both walk the same way: the scalar being written (from its first byte: a string may run on
within its bound, a key becomes one of the keys still allowed), then each open container
from the innermost out: an object gets the required keys it lacks and its ``}``, an array the
items its ``minItems`` still needs and its ``]``. The object schema a container follows is, of
the alternatives its keys and values still allow, the one with the shortest finish.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from gateway.output.finish.schemas import (
    INT_DIGITS,
    Doc,
    Narrow,
    Schema,
    Shortest,
    Unsupported,
    alternatives,
    dumps,
    item_schema,
    key_schema,
    kind,
    lit,
    min_items,
    number_regex,
    plain_number,
    plain_string,
    properties,
    required,
)
from gateway.output.finish.tracker import Frame, Scalar, Tracker

LITERALS = ("true", "false", "null")


class Writer(Protocol):
    """Text (the shortest finish) or a Lark expression (the narrowed grammar)."""

    def value(self, schema: object) -> str: ...
    def text(self, text: str) -> str: ...
    def join(self, parts: list[str]) -> str: ...
    def choice(self, options: list[str]) -> str: ...
    def open_key(self, written: int) -> str: ...
    def new_key(self) -> str: ...


class TextWriter:
    def __init__(self, doc: Doc) -> None:
        self.shortest = Shortest(doc)

    def value(self, schema: object) -> str:
        return self.shortest.value(schema)

    def text(self, text: str) -> str:
        return text

    def join(self, parts: list[str]) -> str:
        return "".join(parts)

    def choice(self, options: list[str]) -> str:
        return min(options, key=len)

    def open_key(self, written: int) -> str:
        return '"'

    def new_key(self) -> str:
        return '""'


class LarkWriter:
    def __init__(self, narrow: Narrow) -> None:
        self.narrow = narrow

    def value(self, schema: object) -> str:
        return self.narrow.value(schema)

    def text(self, text: str) -> str:
        return lit(text) if text else ""

    def join(self, parts: list[str]) -> str:
        return " ".join(p for p in parts if p)

    def choice(self, options: list[str]) -> str:
        return alternatives(options)

    def open_key(self, written: int) -> str:
        return self.narrow.string({}, written=written)

    def new_key(self) -> str:
        return self.narrow.string({})


@dataclass(frozen=True)
class Rest:
    """What finishes the JSON: from byte ``back`` of the tracked text (the start of the scalar
    being written; None: from the end), its ``body``: the shortest text or a Lark
    expression."""

    back: int | None
    body: str


def shortest(tracker: Tracker) -> Rest:
    """The shortest text that finishes the JSON from the end of what is written."""
    doc = tracker.doc
    return Rest(None, _rest(tracker, TextWriter(doc), text_mode=True))


def narrowed(tracker: Tracker, narrow: Narrow) -> Rest:
    """The narrowed grammar of the rest, from the start of the scalar being written."""
    back = tracker.scalar.start if tracker.scalar is not None else None
    return Rest(back, _rest(tracker, LarkWriter(narrow), text_mode=False))


def dearest_step(tracker: Tracker) -> str:
    """The most one step of the model can add to the shortest finish: one more item in an
    open array, or the dearest optional key not yet written in an open object (a single
    token may close a value and open the next)."""
    short = Shortest(tracker.doc)
    worst = ""
    for frame in tracker.stack:
        for s in frame.schemas:
            if frame.array:
                cap = s.get("maxItems")
                if not isinstance(cap, int) or frame.count + 1 < cap:
                    worst = max(worst, ", " + short.value(item_schema(s, frame.count + 1)), key=len)
                continue
            names = [n for n in properties(s) if n not in frame.keys and n not in required(s)]
            steps = [f", {dumps(n)}: {short.value(properties(s)[n])}" for n in names]
            if key_schema(s, "\0") is not None:
                steps.append(', "": 0')
            worst = max([worst, *steps], key=len)
    return worst


def _rest(t: Tracker, w: Writer, *, text_mode: bool) -> str:
    if t.done:
        return ""
    if not t.stack and t.scalar is None:
        return w.value(t.root)
    s = t.scalar
    frames = list(reversed(t.stack))
    parts: list[str] = []
    if s is not None and s.key:
        parts.append(_key_rest(s, frames[0], w, text_mode=text_mode))
    elif s is not None and frames and not frames[0].array:
        parts.append(_value_rest(t.doc, s, frames[0], w, text_mode=text_mode))
    else:
        if s is not None:
            part = _scalar_part(t.doc, s, w, text_mode=text_mode)
            if part is None:
                raise Unsupported("a scalar no schema allows")
            parts.append(part)
        if frames:
            state = "after" if s is not None else frames[0].state
            space = s is None and not t.white and t.last in (0x2C, 0x3A)  # right after , or :
            parts.append(_container(t.doc, frames[0], state, w, space=space, child=s is not None))
    parts += [_container(t.doc, f, "after", w, space=False, child=True) for f in frames[1:]]
    return w.join(parts)


def _value_rest(doc: Doc, s: Scalar, frame: Frame, w: Writer, *, text_mode: bool) -> str:
    """The value being written in an object, and the rest of the object, for each schema the
    object may still follow (a tagged union's tag decides which)."""
    options: list[str] = []
    for o in frame.schemas:
        sub = key_schema(o, frame.keys[-1])
        fits = replace(s, schemas=doc.options(sub if sub is not None else {}))
        value = _scalar_part(doc, fits, w, text_mode=text_mode)
        if value is not None:
            rest = _object_rest(doc, o, frame, "after", w, False)
            options.append(w.join([value, rest]))
    if not options:
        raise Unsupported("a value no schema allows")
    return w.choice(options)


def _scalar_part(doc: Doc, s: Scalar, w: Writer, *, text_mode: bool) -> str | None:
    """The end (text) or the whole (grammar) of the scalar being written; None if none of its
    schemas allows what is written."""
    return _scalar_text(s) if text_mode else _scalar_expr(doc, s, w)


def _key_rest(s: Scalar, frame: Frame, w: Writer, *, text_mode: bool) -> str:
    """The key being written, its value and the rest of its object, for each key it may
    still become."""
    raw = s.raw.decode(errors="replace")
    options: list[str] = []
    for o in frame.schemas:
        o = {"type": "object"} if kind(o) == "any" else o
        missing = [n for n in required(o) if n not in frame.keys]
        fits = [n for n in properties(o) if n not in frame.keys and dumps(n)[1:].startswith(raw)]
        needed = [n for n in fits if n in missing]
        for name in needed or fits:  # an optional key only if the text written chose it
            text = dumps(name)
            key = text[1 + len(raw) :] if text_mode else lit(text)
            rest = _members(o, [m for m in missing if m != name], w)
            options.append(w.join([key, w.text(": "), w.value(properties(o)[name]), rest,
                                   w.text("}")]))  # fmt: skip
        extra = key_schema(o, "\0")
        if extra is not None:
            key = _string_end(s) + '"' if text_mode else w.open_key(s.chars)
            rest = _members(o, missing, w)
            options.append(w.join([key, w.text(": "), w.value(extra), rest, w.text("}")]))
    if not options:
        raise Unsupported("a key no schema allows")
    return w.choice(options)


def _container(doc: Doc, frame: Frame, state: str, w: Writer, *, space: bool, child: bool) -> str:
    """The rest of one open object or array (``child``: a value inside it is being written and
    counts as written)."""
    if frame.array:
        options = [_array_rest(doc, s, frame, state, w, space, child) for s in frame.schemas]
    else:
        options = [_object_rest(doc, s, frame, state, w, space) for s in frame.schemas]
    if len(options) == 1:
        return options[0]
    text = TextWriter(doc)
    if frame.array:
        costs = [_array_rest(doc, s, frame, state, text, space, child) for s in frame.schemas]
    else:
        costs = [_object_rest(doc, s, frame, state, text, space) for s in frame.schemas]
    return options[min(range(len(costs)), key=lambda i: len(costs[i]))]


def _object_rest(doc: Doc, s: Schema, f: Frame, state: str, w: Writer, space: bool) -> str:
    if kind(s) == "any":
        s = {"type": "object"}
    missing = [n for n in required(s) if n not in f.keys]
    lead = w.text(" ") if space else ""
    if state in ("open", "sep"):
        if missing:
            first = w.join([w.text(dumps(missing[0]) + ": "), w.value(properties(s)[missing[0]])])
            return w.join([lead, first, _members(s, missing[1:], w), w.text("}")])
        if state == "open":
            return w.text("}")
        return w.join([lead, _any_key(doc, s, f, w), w.text("}")])
    if state in ("colon", "value"):
        sub = key_schema(s, f.keys[-1])
        head = w.text(": ") if state == "colon" else lead
        return w.join([head, w.value(sub if sub is not None else {}), _members(s, missing, w),
                       w.text("}")])  # fmt: skip
    return w.join([_members(s, missing, w), w.text("}")])


def _members(s: Schema, names: list[str], w: Writer) -> str:
    props = properties(s)
    return w.join([w.join([w.text(f", {dumps(n)}: "), w.value(props[n])]) for n in names])


def _any_key(doc: Doc, s: Schema, f: Frame, w: Writer) -> str:
    """A key after a comma when no required key is missing: one of the properties not yet
    written, or (an open object) a short new key."""
    props = properties(s)
    options = [w.join([w.text(f"{dumps(n)}: "), w.value(v)])
               for n, v in props.items() if n not in f.keys]  # fmt: skip
    extra = key_schema(s, "\0")
    if extra is not None:
        options.append(w.join([w.new_key(), w.text(": "), w.value(extra)]))
    if not options:
        options.append(w.join([w.new_key(), w.text(": "), w.value({})]))
    return w.choice(options)


def _array_rest(
    doc: Doc, s: Schema, f: Frame, state: str, w: Writer, space: bool, child: bool
) -> str:
    written = f.count + (1 if child else 0)
    need = max(0, min_items(s) - written)
    lead = w.text(" ") if space else ""
    items: list[str] = []
    if state == "sep":  # a comma promises one more item
        items.append(w.join([lead, w.value(item_schema(s, written))]))
        written, need = written + 1, max(0, need - 1)
    elif state == "open" and need:
        items.append(w.value(item_schema(s, written)))
        written, need = written + 1, need - 1
    items += [w.join([w.text(", "), w.value(item_schema(s, written + i))]) for i in range(need)]
    return w.join([*items, w.text("]")])


def _scalar_text(s: Scalar) -> str | None:
    """The shortest end of the scalar being written."""
    raw = s.raw.decode(errors="replace")
    if s.kind == "number":
        return "0" if raw[-1:] in ("-", ".", "e", "E", "+") else ""
    if s.kind == "literal":
        return next((w[len(raw) :] for w in LITERALS if w.startswith(raw)), "")
    cut = _string_end(s)
    ends: list[str] = []
    for o in s.schemas:
        if "const" in o or "enum" in o:
            ends += [v[1 + len(raw) :] for v in _values(o, raw)]
        elif kind(o) in ("string", "any"):
            sample = Shortest.string(o)
            ends.append("a" * max(0, len(sample) - len(raw)) + '"')
    return cut + min(ends, key=len) if ends else None


def _values(o: Schema, raw: str) -> list[str]:
    """The JSON texts of a const or enum that begin as ``raw`` (a string's content so far)."""
    values = [o["const"]] if "const" in o else o["enum"]
    texts = [dumps(v) for v in values]
    return [t for t in texts if t.startswith('"') and t[1:].startswith(raw)]


def _string_end(s: Scalar) -> str:
    """What the string being written needs before it may close: the rest of an escape or of
    a character a token split."""
    escape = "n" if s.escape == -1 else "0" * s.escape
    return escape + "a" * _cut_bytes(s.raw)


def _cut_bytes(raw: bytes | bytearray) -> int:
    """Bytes missing from a UTF-8 character cut at the end of ``raw``."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 != 0x80:  # the first byte of a character
            size = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return max(0, size - back)
    return 0


def _scalar_expr(doc: Doc, s: Scalar, w: Writer) -> str | None:
    """The narrowed grammar of the scalar being written, from its first byte."""
    assert isinstance(w, LarkWriter)
    raw = s.raw.decode(errors="replace")
    options: list[str] = []
    for o in s.schemas:
        k = kind(o)
        if s.kind == "string" and k in ("string", "any") and plain_string(o):
            options.append(w.narrow.string(o if k == "string" else {}, written=s.chars))
        elif s.kind == "number" and k in ("number", "integer", "any") and plain_number(o):
            w.narrow.bounded += 1
            options.append(_open_number(raw, k == "integer", w.narrow.chars))
        elif s.kind == "literal" and k == "any":
            options += [lit(x) for x in LITERALS if x.startswith(raw)]
        elif k == "value" and s.kind == "string":
            if _values(o, raw):
                options.append(doc.embed(o))
        elif _same_kind(s, o):
            options.append(doc.embed(o))
    return w.choice(options) if options else None


def _open_number(raw: str, integer: bool, chars: int) -> str:
    """The number being written (``raw`` so far), with at most ``chars`` more digits."""
    mantissa = raw.lstrip("-").split("e")[0].split("E")[0]
    whole, _, fraction = mantissa.partition(".")
    more = min(chars, INT_DIGITS)
    return number_regex(integer, len(whole) + more, len(fraction) + more, "e" in raw.lower())


def _same_kind(s: Scalar, o: Schema) -> bool:
    k = kind(o)
    if k == "value":
        return True
    if s.kind == "string":
        return k == "string"
    if s.kind == "number":
        return k in ("number", "integer")
    return k in ("boolean", "null")
