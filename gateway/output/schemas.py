"""JSON schemas from requests (tool parameters, ``response_format``): bounded and checked.

:func:`schema_text` runs while the body is parsed (cheap checks only); :func:`check_schema`
compiles the schema with llguidance (no model needed) and runs in a worker thread before the
request is queued, so a schema the grammar engine cannot enforce is a 400 naming its field.
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


def check_schema(text: str, param: str) -> None:
    """A 400 naming ``param`` if llguidance cannot compile the schema (invalid or unsupported
    keywords, unsatisfiable, over the engine's size limits)."""
    reason = _schema_error(text)
    if reason:
        raise InvalidRequest(f"invalid JSON schema in '{param}': {reason}", param=param)


@lru_cache(maxsize=256)
def _schema_error(text: str) -> str:
    """Why a schema does not compile ("" if it does); agents send the same tools every turn."""
    try:
        with no_panics():
            grammar = llguidance.LLMatcher.grammar_from_lark("start: %json" + text)
            error = llguidance.LLMatcher.validate_grammar(grammar)
    except EnginePanic as err:
        return str(err)
    return error.splitlines()[0].split("JSON schema: ", 1)[-1] if error else ""
