"""A JSON schema as the finisher walks it: the schema of a key or an item, the shortest valid
value (to count what finishing costs) and the narrowed grammar of a value (to finish it).

Schemas come :func:`~gateway.output.schemas.closed` (as the grammar enforces them). What the
finisher cannot reason about (``allOf`` with several members, remote ``$ref``\\ s, a required key
that is not a property) raises :class:`Unsupported`: that sequence is then not steered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.output.grammar import json_rule

Schema = dict[str, Any]

#: Nesting the finisher follows (``$ref`` chains, required sub-objects) before it gives up.
MAX_DEPTH = 32
#: Digits a narrowed number may have (before and after its point).
INT_DIGITS, FRACTION_DIGITS = 15, 6
#: Texts standing for a formatted string when counting the shortest answer.
FORMAT_SAMPLES = {
    "date-time": "2000-01-01T00:00:00Z",
    "date": "2000-01-01",
    "time": "00:00:00Z",
    "email": "a@b.co",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "uri": "http://a.b",
}
#: Length standing for a string under a ``pattern`` when counting.
PATTERN_SAMPLE = 8


class Unsupported(Exception):
    """A schema the finisher cannot reason about."""


def dumps(value: object) -> str:
    """JSON text as the grammar writes it (house separators, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def lit(text: str) -> str:
    """``text`` as a Lark literal."""
    return json.dumps(text, ensure_ascii=False)


def alternatives(exprs: list[str]) -> str:
    """Lark expressions as one (each once, in order)."""
    unique = list(dict.fromkeys(exprs))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


class Doc:
    """One root schema: ``$ref``\\ s resolve against it."""

    def __init__(self, root: object) -> None:
        if not isinstance(root, dict):
            raise Unsupported("a schema that is not an object")
        self.root: Schema = root
        self._defs: dict[str, Any] = {}
        for key in ("$defs", "definitions"):
            if isinstance(self.root.get(key), dict):
                self._defs[key] = self.root[key]

    def resolve(self, schema: object) -> Schema:
        """``schema`` with its ``$ref`` (and a one-member ``allOf``) followed."""
        current: object = schema
        for _ in range(MAX_DEPTH):
            if current is True or current is None:
                return {}
            if not isinstance(current, dict):
                raise Unsupported("a schema that is not an object")
            ref = current.get("$ref")
            if isinstance(ref, str):
                rest = {k: v for k, v in current.items() if k != "$ref"}
                target = self._target(ref)
                if not isinstance(target, dict):
                    raise Unsupported(f"$ref {ref!r}")
                current = {**target, **rest}
                continue
            all_of = current.get("allOf")
            if isinstance(all_of, list):
                if len(all_of) != 1:
                    raise Unsupported("allOf with several members")
                rest = {k: v for k, v in current.items() if k != "allOf"}
                current = {**self.resolve(all_of[0]), **rest}
                continue
            return current
        raise Unsupported("$ref nests too deep")

    def _target(self, ref: str) -> object:
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            raise Unsupported(f"$ref {ref!r}")
        node: object = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise Unsupported(f"$ref {ref!r}")
            node = node[part]
        return node

    def options(self, schema: object) -> list[Schema]:
        """The alternatives a value of ``schema`` may take (``anyOf``/``oneOf`` and type
        lists spread out), each resolved."""
        out: list[Schema] = []
        self._spread(schema, out, 0)
        return out

    def _spread(self, schema: object, out: list[Schema], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Unsupported("anyOf nests too deep")
        s = self.resolve(schema)
        alternatives = s.get("anyOf", s.get("oneOf"))
        if isinstance(alternatives, list):
            rest = {k: v for k, v in s.items() if k not in ("anyOf", "oneOf")}
            for alt in alternatives:
                self._spread({**rest, **self.resolve(alt)}, out, depth + 1)
            return
        types = s.get("type")
        if isinstance(types, list):
            out.extend({**s, "type": t} for t in types)
            return
        out.append(s)

    def embed(self, schema: Schema) -> str:
        """``%json{...}`` for ``schema`` (the root's definitions carried along)."""
        return json_rule(json.dumps({**schema, **self._defs}, ensure_ascii=False))


def kind(schema: Schema) -> str:
    """What a resolved, single-typed schema holds: object, array, string, number, integer,
    boolean, null, value (a const or enum) or any."""
    if "const" in schema or "enum" in schema:
        return "value"
    t = schema.get("type")
    if isinstance(t, str):
        return t
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "any"


def properties(schema: Schema) -> dict[str, Any]:
    props = schema.get("properties")
    return props if isinstance(props, dict) else {}


def required(schema: Schema) -> list[str]:
    """The keys an object must hold, in the order the grammar writes them (the order of
    ``properties``)."""
    names = schema.get("required")
    if not isinstance(names, list):
        return []
    props = properties(schema)
    missing = [n for n in names if n not in props]
    if missing:
        raise Unsupported(f"required key {missing[0]!r} is not a property")
    return [p for p in props if p in names]


def is_open(schema: Schema) -> bool:
    """Keys beyond ``properties`` may be written."""
    extra = schema.get("additionalProperties", True)
    return extra is not False or "patternProperties" in schema


def key_schema(schema: Schema, key: str) -> object | None:
    """The schema of ``key``'s value (None: the key is not allowed)."""
    props = properties(schema)
    if key in props:
        found: object = props[key]
        return found
    if not is_open(schema):
        return None
    extra = schema.get("additionalProperties", True)
    return extra if isinstance(extra, dict) else {}


def item_schema(schema: Schema, index: int) -> object:
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and index < len(prefix):
        return prefix[index]
    items = schema.get("items", {})
    return items if items is not False else {}


def min_items(schema: Schema) -> int:
    n = schema.get("minItems", 0)
    return n if isinstance(n, int) and n > 0 else 0


def plain_string(schema: Schema) -> bool:
    """A string the finisher may bound (no pattern or format to keep)."""
    return "pattern" not in schema and "format" not in schema


def plain_number(schema: Schema) -> bool:
    bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
    return not any(b in schema for b in bounds)


def number_regex(integer: bool, digits: int, fraction: int, exponent: bool = False) -> str:
    """A number of at most ``digits`` digits before its point and ``fraction`` after it."""
    whole = f"-?(0|[1-9][0-9]{{0,{max(digits, 1) - 1}}})"
    if integer:
        return f"/{whole}/"
    tail = "([eE][+-]?[0-9]{1,3})?" if exponent else ""
    return f"/{whole}(\\.[0-9]{{1,{max(fraction, 1)}}})?{tail}/"


class Shortest:
    """The shortest JSON text of a schema's values (an estimate for patterns and formats:
    only counted, never enforced)."""

    def __init__(self, doc: Doc) -> None:
        self.doc = doc

    def value(self, schema: object, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise Unsupported("required values nest too deep")
        texts = [self._one(s, depth) for s in self.doc.options(schema)]
        if not texts:
            raise Unsupported("a schema with no alternative")
        return min(texts, key=len)

    def _one(self, s: Schema, depth: int) -> str:
        k = kind(s)
        if k == "value":
            values = [s["const"]] if "const" in s else list(s["enum"])
            if not values:
                raise Unsupported("an empty enum")
            return min((dumps(v) for v in values), key=len)
        if k == "object":
            parts = [f"{dumps(name)}: {self.value(properties(s)[name], depth + 1)}"
                     for name in required(s)]  # fmt: skip
            return "{" + ", ".join(parts) + "}"
        if k == "array":
            items = [self.value(item_schema(s, i), depth + 1) for i in range(min_items(s))]
            return "[" + ", ".join(items) + "]"
        if k == "string":
            return dumps(self.string(s))
        if k in ("number", "integer"):
            low = s.get("minimum", s.get("exclusiveMinimum"))
            return dumps(low) if isinstance(low, (int, float)) and low > 0 else "0"
        return {"boolean": "true", "null": "null"}.get(k, "0")

    @staticmethod
    def string(s: Schema) -> str:
        n = s.get("minLength", 0)
        n = n if isinstance(n, int) else 0
        fmt = s.get("format")
        if isinstance(fmt, str):
            return FORMAT_SAMPLES.get(fmt, "a" * max(n, PATTERN_SAMPLE))
        if "pattern" in s:
            return "a" * max(n, PATTERN_SAMPLE)
        return "a" * n


@dataclass
class Narrow:
    """Narrowed grammars of values: the least a schema needs, every free string bounded to
    ``chars`` characters, numbers short. :attr:`bounded` counts the strings and numbers made
    (what the budget is spread over)."""

    doc: Doc
    chars: int
    bounded: int = 0

    def value(self, schema: object, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise Unsupported("required values nest too deep")
        exprs = [self._one(s, depth) for s in self.doc.options(schema)]
        if not exprs:
            raise Unsupported("a schema with no alternative")
        return alternatives(exprs)

    def _one(self, s: Schema, depth: int) -> str:
        k = kind(s)
        if k == "object":
            return self.members(s, required(s), first=True, depth=depth) + ' "}"'
        if k == "array":
            need = min_items(s)
            items = [self.value(item_schema(s, i), depth + 1) for i in range(need)]
            return '"[" ' + ' ", " '.join(items) + (' "]"' if items else '"]"')
        if k == "string" and plain_string(s):
            return self.string(s)
        if k in ("number", "integer") and plain_number(s):
            return self.number(k == "integer")
        if k == "any":
            return self.anything()
        return self.doc.embed(s)

    def members(self, s: Schema, names: list[str], *, first: bool, depth: int) -> str:
        """The required ``names`` of object ``s`` with narrowed values; ``first``: no comma
        before the first one (it follows the opening brace)."""
        parts: list[str] = ['"{"'] if first else []
        for i, name in enumerate(names):
            sep = "" if first and i == 0 else ", "
            value = self.value(properties(s)[name], depth + 1)
            parts.append(f"{lit(sep + dumps(name) + ': ')} {value}")
        return " ".join(parts)

    def string(self, s: Schema, *, written: int = 0) -> str:
        """A plain string of at most ``written`` + :attr:`chars` characters (its
        ``minLength`` and ``maxLength`` kept)."""
        self.bounded += 1
        low = s.get("minLength", 0)
        low = low if isinstance(low, int) else 0
        high = max(low, written + self.chars)
        cap = s.get("maxLength")
        if isinstance(cap, int):
            high = min(high, cap)
        return json_rule(dumps({"type": "string", "minLength": low, "maxLength": high}))

    def number(self, integer: bool) -> str:
        """A new number, its digits bounded as strings are (a digit is about a token)."""
        self.bounded += 1
        digits = min(INT_DIGITS, max(2, self.chars))
        return number_regex(integer, digits, min(FRACTION_DIGITS, max(1, self.chars // 2)))

    def anything(self) -> str:
        """Any short JSON value (for a value whose schema says nothing)."""
        scalars = f'"null" | "true" | "false" | {self.number(False)} | {self.string({})}'
        return f'({scalars} | "{{}}" | "[]")'
