"""JSON schemas from requests (tool parameters, ``response_format``): bounded and checked.

:func:`schema_text` runs while the body is parsed (cheap checks only); :func:`check_schema`
compiles the schema with llguidance (no model needed) and runs in a worker thread before the
request is queued, so a schema the grammar engine cannot enforce is a 400 naming its field.

The grammar enforces :func:`closed` schemas: an object with ``properties`` and no word on
``additionalProperties`` admits no other keys (as xgrammar's strict mode, vLLM's default).
JSON Schema would allow any extra key, and a small model then writes keys until
``max_tokens`` cuts the call; what the grammar admits still validates against the schema.
"""

from __future__ import annotations

import json
from functools import lru_cache

import llguidance

from gateway.errors import InvalidRequest
from gateway.output.panics import EnginePanic, no_panics

MAX_SCHEMA_CHARS = 256 * 1024
MAX_SCHEMA_DEPTH = 64


def _depth(doc: object) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((child, depth + 1) for child in value.values())
        elif isinstance(value, list):
            stack.extend((child, depth + 1) for child in value)
    return deepest


def schema_text(schema: dict[str, object], param: str) -> str:
    """The schema as JSON text, or a 400 if it is too large or too deep."""
    text = json.dumps(schema, ensure_ascii=False, sort_keys=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(
            f"the schema in '{param}' is longer than {MAX_SCHEMA_CHARS} characters", param=param
        )
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(
            f"the schema in '{param}' nests deeper than {MAX_SCHEMA_DEPTH} levels", param=param
        )
    return text


#: Keywords whose value is one schema, or a list or a name map of schemas.
_SUBSCHEMA = frozenset({"items", "additionalProperties", "not", "if", "then", "else",
                        "contains", "propertyNames", "unevaluatedProperties",
                        "additionalItems", "unevaluatedItems"})  # fmt: skip
_SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: object, *, close: bool = True) -> object:
    """``schema`` with ``additionalProperties: false`` on each object that lists its
    ``properties``, says nothing of other keys and requires none it does not list. Members of
    an ``allOf`` stay open (closing each would forbid the others' keys); values (``const``,
    ``enum``, ``default``, ``examples``) are never touched."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, object] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA:
            out[key] = closed(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed(v) for v in value]
        elif key == "allOf" and isinstance(value, list):
            out[key] = [closed(v, close=False) for v in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(v) for name, v in value.items()}
        else:
            out[key] = value
    props, required = schema.get("properties"), schema.get("required", [])
    if (
        close
        and isinstance(props, dict)
        and not any(k in schema for k in _OPEN_KEYS)
        and isinstance(required, list)
        and all(name in props for name in required)
    ):
        out["additionalProperties"] = False
    return out


def check_schema(text: str, param: str) -> None:
    """A 400 naming ``param`` if llguidance cannot compile the schema (invalid or unsupported
    keywords, unsatisfiable, over the engine's size limits)."""
    reason = _schema_error(text)
    if reason:
        raise InvalidRequest(f"invalid JSON schema in '{param}': {reason}", param=param)


def closed_text(text: str) -> str:
    """:func:`closed` on a schema's JSON text."""
    return json.dumps(closed(json.loads(text)), ensure_ascii=False)


@lru_cache(maxsize=256)
def _schema_error(text: str) -> str:
    """Why a schema does not compile ("" if it does); agents send the same tools every turn."""
    try:
        with no_panics():
            grammar = llguidance.LLMatcher.grammar_from_lark("start: %json" + closed_text(text))
            error = llguidance.LLMatcher.validate_grammar(grammar)
    except EnginePanic as err:
        return str(err)
    return error.splitlines()[0].split("JSON schema: ", 1)[-1] if error else ""
