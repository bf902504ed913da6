"""The streaming output parser, per tool-call format: text cut into any pieces comes out as the
same content, reasoning and tool calls, reassembled by the openai SDK's stream state and by
LangChain's chunk addition."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from langchain_core.messages import AIMessageChunk
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from gateway.endpoints.chat import ChatStreamEncoder
from gateway.output.formats import FORMATS, ChatFormat, Reasoning, ToolFormatName
from gateway.output.parser import OutputParser
from gateway.types import (
    ClientRequest,
    Delta,
    Finish,
    FinishReason,
    GenerationRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)

WEATHER = {"city": "Paris", "units": {"deg": "C"}, "note": 'say "hi" {not a brace}'}
ADD = {"a": 1, "b": [2, 3]}

#: One model answer per format: text, two calls, what the parser must find.
SAMPLES: dict[ToolFormatName, str] = {
    "hermes": (
        "Let me check.<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": WEATHER})
        + "\n</tool_call>\n<tool_call>\n"
        + json.dumps({"name": "add", "arguments": ADD})
        + "\n</tool_call>"
    ),
    "generic": (
        "Let me check.<tool_call>"
        + json.dumps({"name": "get_weather", "arguments": WEATHER})
        + "</tool_call><tool_call>"
        + json.dumps({"arguments": ADD, "name": "add"})  # keys in any order
        + "</tool_call>"
    ),
    "llama3": (
        "Let me check.<|python_tag|>"
        + json.dumps({"name": "get_weather", "parameters": WEATHER})
        + "; "
        + json.dumps({"name": "add", "parameters": ADD})
    ),
    "mistral": (
        "Let me check.[TOOL_CALLS]"
        + json.dumps(
            [{"name": "get_weather", "arguments": WEATHER}, {"name": "add", "arguments": ADD}]
        )
    ),
    "mistral_args": (
        "Let me check.[TOOL_CALLS]get_weather[ARGS]"
        + json.dumps(WEATHER)
        + "[TOOL_CALLS]add[ARGS]"
        + json.dumps(ADD)
    ),
}


def cuts(text: str, how: str, seed: int = 0) -> list[str]:
    if how == "chars":
        return list(text)
    if how == "whole":
        return [text]
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i : i + n])
        i += n
    return out


def run(fmt: ChatFormat, pieces: list[str], *, parse_tools: bool = True) -> list[Delta]:
    parser = OutputParser(fmt, parse_tools=parse_tools)
    out: list[Delta] = []
    for piece in pieces:
        out += parser.feed(TextDelta(piece))
    out += parser.feed(Finish("stop", Usage(1, len(pieces))))
    return out


def sse_chunks(deltas: list[Delta]) -> list[ChatCompletionChunk]:
    gen = GenerationRequest("r", messages=())
    request = ClientRequest("chat", "m", (gen,), stream=True)
    encoder = ChatStreamEncoder(request, "chatcmpl-1", 0)
    frames = encoder.start() + [f for d in deltas for f in encoder.delta(0, d)]
    return [
        ChatCompletionChunk.model_validate_json(f.decode().removeprefix("data: ").strip())
        for f in frames
    ]


@pytest.mark.parametrize("how", ["chars", "random", "whole"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_calls_reassemble_in_the_sdk_and_langchain(name: ToolFormatName, how: str) -> None:
    deltas = run(ChatFormat(FORMATS[name]), cuts(SAMPLES[name], how))
    content = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert content == "Let me check."
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "tool_calls"
    firsts = [d for d in deltas if isinstance(d, ToolCallDelta) and d.id is not None]
    assert [d.name for d in firsts] == ["get_weather", "add"]
    assert [d.call for d in firsts] == [0, 1]
    ids = [d.id or "" for d in firsts]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)

    state = ChatCompletionStreamState()
    for chunk in sse_chunks(deltas):
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    assert message.content == "Let me check."
    calls = message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", WEATHER),
        ("add", ADD),
    ]

    total = AIMessageChunk(content="")
    for chunk in sse_chunks(deltas):
        delta = chunk.choices[0].delta if chunk.choices else None
        pieces = [
            {
                "name": tc.function.name if tc.function else None,
                "args": tc.function.arguments if tc.function else None,
                "id": tc.id,
                "index": tc.index,
            }
            for tc in (delta.tool_calls or [] if delta else [])
        ]
        total = total + AIMessageChunk(
            content=(delta.content or "") if delta else "", tool_call_chunks=pieces
        )
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [
        ("get_weather", WEATHER),
        ("add", ADD),
    ]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_markup_is_content_when_tools_are_not_parsed(name: ToolFormatName) -> None:
    deltas = run(ChatFormat(FORMATS[name]), cuts(SAMPLES[name], "chars"), parse_tools=False)
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == SAMPLES[name]
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "stop"


@pytest.mark.parametrize("how", ["chars", "random"])
def test_reasoning_is_split_from_content(how: str) -> None:
    fmt = ChatFormat(FORMATS["hermes"], Reasoning())
    text = "<think>Paris is in France.\n</think>\n\nIt is sunny."
    deltas = run(fmt, cuts(text, how))
    assert "".join(d.text for d in deltas if isinstance(d, ReasoningDelta)) == (
        "Paris is in France.\n"
    )
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "It is sunny."


def test_a_marker_prefix_that_does_not_complete_is_released() -> None:
    deltas = run(ChatFormat(FORMATS["hermes"]), list("a <tool and <tool_c"))
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "a <tool and <tool_c"


def test_llama3_bare_json_call_and_plain_answer() -> None:
    fmt = ChatFormat(FORMATS["llama3"])
    call = json.dumps({"name": "add", "parameters": ADD})
    deltas = run(fmt, list("  " + call))
    assert not [d for d in deltas if isinstance(d, TextDelta)]
    named = [d for d in deltas if isinstance(d, ToolCallDelta) and d.name]
    assert [d.name for d in named] == ["add"]
    plain = run(fmt, list("No call {here}."))
    assert "".join(d.text for d in plain if isinstance(d, TextDelta)) == "No call {here}."


def test_arguments_written_as_a_string_are_decoded() -> None:
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    deltas = run(ChatFormat(FORMATS["hermes"]), list(text))
    args = "".join(d.arguments for d in deltas if isinstance(d, ToolCallDelta))
    assert json.loads(args) == {"a": 1}


def test_a_call_cut_by_max_tokens_keeps_its_name_and_length() -> None:
    parser = OutputParser(ChatFormat(FORMATS["hermes"]), parse_tools=True)
    out = parser.feed(TextDelta('<tool_call>{"name": "add", "arguments": {"a": 1'))
    out += parser.feed(Finish("length", Usage(1, 5)))
    assert [d.name for d in out if isinstance(d, ToolCallDelta) and d.name] == ["add"]
    assert isinstance(out[-1], Finish) and out[-1].reason == "length"


def test_tokens_are_accounted_once() -> None:
    parser = OutputParser(ChatFormat(FORMATS["hermes"]), parse_tools=True)
    out: list[Delta] = []
    for piece in ["Hi ", "<tool", "_call>", '{"name": "add", ', '"arguments": {}}', "</tool_call>"]:
        out += parser.feed(TextDelta(piece, tokens=2))
    counted = sum(d.tokens for d in out if isinstance(d, TextDelta | ToolCallDelta))
    assert counted == 10  # the closing marker's tokens are owed to no later delta


#: A custom tool's raw input: quotes, backslashes, new lines, a JSON look-alike, a partial
#: closing marker, non-ASCII.
RAW_INPUT = (
    '*** Begin Patch\n+print("a \\"b\\" \\\\n")\n{"input": 1} </tool_cal x\n\té✓\\\n*** End Patch\n'
)


def raw_format(name: ToolFormatName) -> ChatFormat:
    """The format with the custom tools the raw-call tests offer."""
    raw = {"apply_patch": ("text", ""), "note": ("text", "")}
    return ChatFormat(FORMATS[name], raw_tools=raw)


def _calls(deltas: list[Delta]) -> dict[int, tuple[str | None, str]]:
    calls: dict[int, tuple[str | None, str]] = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            name, args = calls.get(d.call, (None, ""))
            calls[d.call] = (name or d.name, args + d.arguments)
    return calls


@pytest.mark.parametrize("name", ["generic", "hermes"])
@pytest.mark.parametrize("how", ["chars", "whole", "random0", "random1", "random2", "random3"])
def test_a_raw_call_keeps_its_input_exactly(name: ToolFormatName, how: str) -> None:
    text = (
        "Sure.<tool_call>apply_patch\n"
        + RAW_INPUT
        + "</tool_call>\n<tool_call>"
        + json.dumps({"name": "add", "arguments": ADD})
        + "</tool_call><tool_call> note\n</tool_call>"
    )
    seed = int(how[-1]) if how.startswith("random") else 0
    deltas = run(raw_format(name), cuts(text, how.rstrip("0123456789"), seed))
    content = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert content == "Sure."
    calls = _calls(deltas)
    assert calls[0][0] == "apply_patch" and json.loads(calls[0][1]) == {"input": RAW_INPUT}
    assert calls[1][0] == "add" and json.loads(calls[1][1]) == ADD
    assert calls[2][0] == "note" and json.loads(calls[2][1]) == {"input": ""}
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "tool_calls"


@pytest.mark.parametrize(
    ("reason", "kept"), [("length", 'ab"c'), ("stop", 'ab"c</tool')], ids=["length", "stop"]
)
def test_a_raw_call_cut_by_max_tokens_keeps_its_input(reason: FinishReason, kept: str) -> None:
    """Cut by max_tokens while writing the closing marker: the marker's start is dropped."""
    parser = OutputParser(raw_format("generic"), parse_tools=True)
    out = parser.feed(TextDelta('<tool_call>note\nab"c</tool'))
    out += parser.feed(Finish(reason, Usage(1, 5)))
    assert _calls(out) == {0: ("note", json.dumps({"input": kept}))}


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ("<tool_call>note", {0: ("note", '{"input": ""}')}),
        ("<tool_call>not", {}),
        ("<tool_call>apply_pa", {}),
    ],
)
def test_a_raw_call_cut_before_its_name_ends_is_no_content(
    text: str, calls: dict[int, tuple[str, str]]
) -> None:
    parser = OutputParser(raw_format("generic"), parse_tools=True)
    out = parser.feed(TextDelta(text))
    out += parser.feed(Finish("length", Usage(1, 5)))
    assert not [d for d in out if isinstance(d, TextDelta)]
    assert _calls(out) == calls


def test_only_offered_custom_tools_are_called_raw() -> None:
    """A name that is no offered custom tool opens no raw call (here: no tools offered)."""
    text = "<tool_call>note\nx</tool_call>"
    out = run(ChatFormat(FORMATS["generic"]), list(text))
    assert _calls(out) == {}


LARK_PATCH = (
    'start: "*** Begin Patch" LF line+ "*** End Patch" LF?\n'
    "line: /[+ -][^\\n]*/ LF\n"
    "%import common.LF\n"
)


@pytest.mark.parametrize("how", ["chars", "whole", "random0", "random1"])
def test_a_closing_marker_inside_a_lark_input_is_input(how: str) -> None:
    """The marker where the input is not yet complete under the tool's grammar is input text
    (the output grammar lets it be); the first one where it is complete ends the call."""
    patch = '*** Begin Patch\n+s = "</tool_call>"\n+t = 1</tool_call>\n*** End Patch\n'
    fmt = replace(raw_format("hermes"), raw_tools={"apply_patch": ("lark", LARK_PATCH)})
    text = f"<tool_call>apply_patch\n{patch}</tool_call>"
    seed = int(how[-1]) if how.startswith("random") else 0
    deltas = run(fmt, cuts(text, how.rstrip("0123456789"), seed))
    assert not [d for d in deltas if isinstance(d, TextDelta)]
    assert _calls(deltas) == {0: ("apply_patch", json.dumps({"input": patch}))}


def test_a_lark_input_its_grammar_rejects_ends_at_the_first_marker() -> None:
    fmt = replace(raw_format("hermes"), raw_tools={"apply_patch": ("lark", LARK_PATCH)})
    deltas = run(fmt, ["<tool_call>apply_patch\nnot a patch</tool_call>"])
    assert _calls(deltas) == {0: ("apply_patch", '{"input": "not a patch"}')}


def test_text_after_a_call_is_no_raw_call() -> None:
    text = "<tool_call>note\nx</tool_call>\nDone.\nAll good"
    deltas = run(raw_format("generic"), list(text))
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "Done.\nAll good"
    assert _calls(deltas) == {0: ("note", '{"input": "x"}')}
