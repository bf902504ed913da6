"""The grammars a request forces, checked with llguidance over a byte-level vocabulary: what a
model may write under each tool choice and format, and what it may not."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest

from gateway.output.formats import FORMATS, ChatFormat, Reasoning, ToolFormatName
from gateway.output.grammar import grammar_for
from gateway.types import ResponseFormat, ToolChoiceMode, Tools, ToolSpec


class _Bytes:
    """One token per byte, plus EOS (256)."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, text: Any) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        return list(data)


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))
WEATHER = ToolSpec(
    "get_weather",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
ADD = ToolSpec(
    "add",
    parameters=json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    ),
)
BOTH = (WEATHER, ADD)
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_A = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'


def accepts(grammar: str | None, text: str) -> bool:
    if grammar is None:  # nothing forced: free text
        return True
    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    assert not llguidance.LLMatcher.validate_grammar(compiled, TOKENIZER), grammar
    matcher = llguidance.LLMatcher(TOKENIZER, compiled, log_level=0)
    tokens = TOKENIZER.tokenize_str(text)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


HERMES_CASES: list[tuple[Tools, ResponseFormat | None, str, bool]] = [
    (Tools(BOTH, "required"), None, CALL_W, True),
    (Tools(BOTH, "required"), None, CALL_W + CALL_A, True),
    (Tools(BOTH, "required"), None, "I will not call.", False),
    (
        Tools(BOTH, "required"),
        None,
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        False,
    ),
    (
        Tools(BOTH, "required"),
        None,
        '<tool_call>{"name": "add", "arguments": {"a": "x"}}</tool_call>',
        False,
    ),
    (Tools(BOTH, "required", parallel=False), None, CALL_W, True),
    # white space around a call is bounded: a model cannot pad until max_tokens
    (Tools(BOTH, "required"), None, CALL_A.replace("</", "    </"), True),
    (Tools(BOTH, "required"), None, CALL_A.replace("</", "     </"), False),
    (Tools(BOTH, "required"), None, CALL_W + " " * 5 + CALL_A, False),
    (Tools(BOTH, "required", parallel=False), None, CALL_W + CALL_A, False),
    (Tools(BOTH, "named", "add"), None, CALL_A, True),
    (Tools(BOTH, "named", "add"), None, CALL_W, False),
    (Tools(BOTH, "named", "add"), None, CALL_A + CALL_A, False),  # a named choice is one call
    (Tools(BOTH, "auto"), None, "Plain words.", True),
    (Tools(BOTH, "auto"), None, "First " + CALL_W, True),
    (
        Tools(BOTH, "auto"),
        None,
        'Hi <tool_call>{"name": "zzz", "arguments": {}}</tool_call>',
        False,
    ),
    (Tools(BOTH, "auto"), ResponseFormat(), '{"x": 1}', True),
    (Tools(BOTH, "auto"), ResponseFormat(), CALL_A, True),
    (Tools(BOTH, "auto"), ResponseFormat(), "words", False),
    (Tools(BOTH, "none"), None, CALL_A, True),  # nothing forced: free text
]


OTHER_CASES: list[tuple[ToolFormatName, ToolChoiceMode, str, bool]] = [
    ("llama3", "required", '{"name": "add", "parameters": {"a": 1}}', True),
    (
        "llama3",
        "required",
        '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}',
        True,
    ),
    ("llama3", "required", '{"name": "add", "arguments": {"a": 1}}', False),
    ("llama3", "auto", "Just text.", True),
    ("llama3", "auto", '<|python_tag|>{"name": "add", "parameters": {"a": 1}}', True),
    (
        "mistral",
        "required",
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, '
        '{"name": "add", "arguments": {"a": 2}}]',
        True,
    ),
    ("mistral", "auto", "Just text.", True),
    ("mistral", "auto", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]', True),
    ("mistral", "auto", '[TOOL_CALLS][{"name": "ad"}]', False),
    ("mistral_args", "required", '[TOOL_CALLS]add[ARGS]{"a": 1}', True),
    (
        "mistral_args",
        "required",
        '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]get_weather[ARGS]{"city": "P"}',
        True,
    ),
    ("mistral_args", "auto", 'Sure. [TOOL_CALLS]add[ARGS]{"a": 1}', True),
    ("mistral_args", "auto", '[TOOL_CALLS]add[ARGS]{"a": "q"}', False),
]


CASES = [
    *((name, *case) for name in ("hermes", "generic") for case in HERMES_CASES),
    *((name, Tools(BOTH, choice), None, text, ok) for name, choice, text, ok in OTHER_CASES),
]


@pytest.mark.parametrize(("name", "tools", "rf", "text", "ok"), CASES)
def test_what_each_grammar_accepts(
    name: ToolFormatName, tools: Tools, rf: ResponseFormat | None, text: str, ok: bool
) -> None:
    assert accepts(grammar_for(ChatFormat(FORMATS[name]), tools, rf), text) is ok


SCHEMA = ResponseFormat(
    json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
)


def test_response_format_and_reasoning() -> None:
    plain = grammar_for(ChatFormat(FORMATS["generic"]), None, SCHEMA)
    assert accepts(plain, '{"a": 1}') and not accepts(plain, '{"a": "x"}')
    assert grammar_for(ChatFormat(FORMATS["generic"]), None, None) is None
    thinking = grammar_for(ChatFormat(FORMATS["hermes"], Reasoning()), None, SCHEMA)
    assert accepts(thinking, '<think>maybe {"a": "x"}</think>\n{"a": 1}')
    assert accepts(thinking, '{"a": 2}')
    assert not accepts(thinking, '<think>no end {"a": 1}')


def test_control_token_markers_are_named_as_tokens() -> None:
    fmt = ChatFormat(FORMATS["hermes"], special={"<tool_call>": 7, "</tool_call>": 8})
    grammar = grammar_for(fmt, Tools(BOTH, "required"), None)
    assert grammar is not None and "<[7]>" in grammar and "<[8]>" in grammar
    assert "<tool_call>" not in grammar


#: llguidance 1.x panics (a Rust ``PanicException``, a ``BaseException``) cutting its error
#: message for this schema inside a multi-byte character; found by the hostile-input fuzzing.
PANICKING_SCHEMA = {
    "pattern": [
        None,
        {"0\r\x07\x80\x80\x80𐀀𐀀": None},
        [None, None, -(10**14), "000000\x1f\x1f\x1f\x1fࠀ"],
    ]
}


def test_a_grammar_engine_panic_is_a_400() -> None:
    import json

    import llguidance

    from gateway.errors import InvalidRequest
    from gateway.output.schemas import check_schema

    text = json.dumps(PANICKING_SCHEMA)
    with pytest.raises(BaseException, match="char boundary") as raw:
        llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_lark("start: %json" + text)
        )
    assert not isinstance(raw.value, Exception)  # what `except Exception` would have missed
    with pytest.raises(InvalidRequest, match="grammar engine failed") as err:
        check_schema(text, "response_format.json_schema.schema")
    assert err.value.param == "response_format.json_schema.schema"


def _schema_grammar(schema: dict[str, Any]) -> str | None:
    return grammar_for(ChatFormat(FORMATS["generic"]), None, ResponseFormat(json.dumps(schema)))


OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}}
CLOSED_CASES: list[tuple[dict[str, Any], str, bool]] = [
    # an object listing its properties takes no other key (a model cannot ramble in extra keys)
    (OBJ, '{"a": 1}', True),
    (OBJ, "{}", True),
    (OBJ, '{"a": 1, "b": 2}', False),
    # unless the schema says so, or says nothing of properties
    ({**OBJ, "additionalProperties": True}, '{"a": 1, "b": 2}', True),
    ({**OBJ, "additionalProperties": {"type": "string"}}, '{"a": 1, "b": "x"}', True),
    ({**OBJ, "additionalProperties": {"type": "string"}}, '{"a": 1, "b": 2}', False),
    ({**OBJ, "patternProperties": {"^x": {"type": "integer"}}}, '{"a": 1, "x1": 2}', True),
    ({"type": "object"}, '{"b": 2}', True),
    # a required key the properties do not list stays possible
    ({**OBJ, "required": ["b"]}, '{"b": 2}', True),
    # nested objects, arrays of objects and $defs are closed too
    (
        {"type": "object", "properties": {"p": OBJ}, "required": ["p"]},
        '{"p": {"a": 1, "z": 0}}',
        False,
    ),
    ({"type": "array", "items": OBJ}, '[{"a": 1}, {"c": 1}]', False),
    (
        {"$defs": {"o": OBJ}, "type": "object", "properties": {"o": {"$ref": "#/$defs/o"}}},
        '{"o": {"a": 1, "q": 1}}',
        False,
    ),
    ({"anyOf": [OBJ, {"type": "string"}]}, '{"a": 1, "b": 1}', False),
    # allOf members stay open: closing each would forbid the other's keys
    (
        {"allOf": [OBJ, {"type": "object", "properties": {"b": {"type": "integer"}}}]},
        '{"a": 1, "b": 2}',
        True,
    ),
    # values are data, not schemas: a const object keeps its keys
    ({"const": {"properties": {"x": 1}, "y": 2}}, '{"properties": {"x": 1}, "y": 2}', True),
]


@pytest.mark.parametrize(("schema", "text", "ok"), CLOSED_CASES)
def test_objects_with_properties_are_closed(schema: dict[str, Any], text: str, ok: bool) -> None:
    assert accepts(_schema_grammar(schema), text) is ok


def test_tool_arguments_are_closed_too() -> None:
    tool = ToolSpec("f", parameters=json.dumps(OBJ))
    grammar = grammar_for(ChatFormat(FORMATS["generic"]), Tools((tool,), "named", "f"), None)
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert accepts(grammar, call)
    assert not accepts(grammar, call.replace("1}", '1, "extra": "ramble"}'))
