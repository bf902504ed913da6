"""Custom tools (the Responses API's free-form tools) with a Lark, regex or no grammar: a call in
the model's own format with the input raw where the format allows, under the tool's grammar,
and a grammar llguidance cannot compile is a 400 naming the tool's format. Codex's own
``apply_patch`` grammar is taken from the installed Codex CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from gateway.endpoints.responses.tools import tool_set, tools_for
from gateway.errors import InvalidRequest
from gateway.output.calls import CustomInput, custom_input, custom_names
from gateway.output.formats import FORMATS, ChatFormat, ToolFormatName
from gateway.output.grammar import grammar_for, lark_shape, regex_body
from gateway.output.parser import OutputParser
from gateway.output.plan import call_text, check_schemas, generic_messages, plan_output
from gateway.testing import ServerThread
from gateway.types import (
    ChatMessage,
    Finish,
    GenerationRequest,
    TextDelta,
    ToolCallDelta,
    ToolCallRef,
    Tools,
    ToolSpec,
    Usage,
)
from tests.gateway.helpers import scripted_config
from tests.gateway.test_output_grammar import accepts

ROOT = Path(__file__).resolve().parents[2]
CODEX_PACKAGES = ROOT / ".peers" / "codex" / "node_modules" / "@openai"
_GRAMMAR_START = b"start: begin_patch hunk+ end_patch\n"
_GRAMMAR_END = b"%import common.LF\n"


def codex_apply_patch_grammar() -> str:
    """The Lark grammar of Codex's free-form ``apply_patch`` tool, read from the installed
    Codex CLI (its native binary holds it as text); skipped where Codex is not installed."""
    binaries = sorted(CODEX_PACKAGES.glob("codex*/vendor/*/bin/codex*"))
    for path in binaries:
        data = path.read_bytes()
        start = data.find(_GRAMMAR_START)
        end = data.find(_GRAMMAR_END, start)
        if start >= 0 and end > start:
            return data[start : end + len(_GRAMMAR_END)].decode()
    if not binaries:
        pytest.skip(f"Codex CLI not installed under {CODEX_PACKAGES} (make codex)")
    pytest.fail(f"no apply_patch grammar in {[str(p) for p in binaries]}")


@pytest.fixture(scope="module")
def apply_patch() -> dict[str, Any]:
    """Codex's ``apply_patch`` tool as Codex declares it."""
    return {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool.",
        "format": {"type": "grammar", "syntax": "lark", "definition": codex_apply_patch_grammar()},
    }


PATCH = (
    '*** Begin Patch\n*** Add File: src/a b.py\n+print("it\'s \\"quoted\\" \\\\ \\n")\n'
    "*** Update File: README.md\n@@ intro\n-old line\n+new line\n context\n*** End Patch\n"
)
NOT_A_PATCH = '*** Begin Patch\n{"input": "x"}\n*** End Patch\n'
ADD = ToolSpec("add", parameters='{"type": "object", "properties": {"a": {"type": "integer"}}}')
PIN = ToolSpec("pin", param="tools[1].format", freeform=("regex", "^[0-9]{4}$"))
PIN_FORMAT = {"type": "grammar", "syntax": "regex", "definition": "[0-9]{4}"}
NOTE = ToolSpec("note", param="tools[2].format", freeform=("text", ""))


def _spec(tool: dict[str, Any]) -> ToolSpec:
    return tool_set([tool]).specs[0]


def _fmt(name: ToolFormatName) -> ChatFormat:
    return ChatFormat(FORMATS[name])


def raw(name: str, text: str) -> str:
    return f"<tool_call>{name}\n{text}</tool_call>"


@pytest.mark.parametrize("fmt", ["generic", "hermes"])
def test_codex_apply_patch_grammar_is_enforced(
    apply_patch: dict[str, Any], fmt: ToolFormatName
) -> None:
    spec = _spec(apply_patch)
    assert spec.freeform is not None and spec.freeform[0] == "lark"
    named = grammar_for(_fmt(fmt), Tools((spec, ADD), "named", "apply_patch"), None)
    assert accepts(named, raw("apply_patch", PATCH))
    assert accepts(named, raw("apply_patch", PATCH.rstrip("\n")))  # its final LF is optional
    assert not accepts(named, raw("apply_patch", NOT_A_PATCH))
    assert not accepts(named, raw("apply_patch", PATCH.replace("*** Update", "*** Patch")))
    assert not accepts(named, raw("apply_patch", PATCH + "\n"))  # nothing after the input
    assert not accepts(named, '<tool_call>{"name": "apply_patch", "arguments": {"input": "x"}}')
    # auto: text, then a call of either tool, the function's in JSON
    auto = grammar_for(_fmt(fmt), Tools((spec, ADD)), None)
    call_a = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert accepts(auto, "I will patch it." + raw("apply_patch", PATCH) + call_a)
    assert not accepts(auto, "I will patch it." + raw("apply_patch", NOT_A_PATCH))
    assert not accepts(auto, raw("add", "{}"))


def test_regex_and_text_inputs_are_raw() -> None:
    tools = Tools((ADD, PIN, NOTE), "required")
    grammar = grammar_for(_fmt("generic"), tools, None)
    assert accepts(grammar, raw("pin", "1234"))
    assert not accepts(grammar, raw("pin", "12345"))
    assert not accepts(grammar, raw("pin", '"1234"'))
    text = 'any "text" \\ with\nnew lines {"input": 1}'
    assert accepts(grammar, raw("note", text) + raw("pin", "0000"))
    assert not accepts(grammar, raw("note", "a</tool_call>b"))  # the marker ends the input


def test_a_regex_input_never_holds_the_closing_marker() -> None:
    """The parser ends a raw input at the first marker: the grammar agrees."""
    line = ToolSpec("line", param="tools[0].format", freeform=("regex", "[^\\n]*"))
    grammar = grammar_for(_fmt("generic"), Tools((line,), "required"), None)
    assert accepts(grammar, raw("line", 's = "x"'))
    assert not accepts(grammar, raw("line", 's = "</tool_call>"'))
    assert not accepts(grammar, raw("line", "a</tool_call>b"))


@pytest.mark.parametrize("fmt", ["generic", "hermes"])
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_closing_marker_inside_a_patch_stays_in_its_input(
    apply_patch: dict[str, Any], fmt: ToolFormatName, step: int
) -> None:
    """Codex's grammar allows ``</tool_call>`` in a patch line: the model may write it, and
    the parser (checking the input so far against the tool's grammar at each marker) keeps
    it in the input; nothing leaks into the content."""
    spec = _spec(apply_patch)
    patch = '*** Begin Patch\n*** Add File: a.py\n+s = "</tool_call>"\n+t = 1\n*** End Patch\n'
    tools = Tools((spec, ADD), "auto")
    text = "Patching." + raw("apply_patch", patch)
    assert accepts(grammar_for(_fmt(fmt), tools, None), text)
    plan = plan_output(GenerationRequest("r", messages=(), tools=tools), _fmt(fmt)).output
    assert plan is not None and plan.format is not None
    parser = OutputParser(plan.format, parse_tools=True)
    deltas = [
        d for i in range(0, len(text), step) for d in parser.feed(TextDelta(text[i : i + step]))
    ]
    deltas += parser.feed(Finish("stop", Usage(1, 1)))
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "Patching."
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert calls[0].name == "apply_patch"
    assert custom_input("".join(d.arguments for d in calls)) == patch


@pytest.mark.parametrize(
    ("definition", "body"),
    [("^a/b$", "a\\/b"), ("a\\/b", "a\\/b"), ("x\ny", "x\\ny"), ("\\$$", "\\$")],
)
def test_a_regex_becomes_a_lark_terminal(definition: str, body: str) -> None:
    assert regex_body(definition) == body


@pytest.mark.parametrize("fmt", ["llama3", "mistral", "mistral_args"])
def test_formats_without_raw_calls_write_the_json_form(
    apply_patch: dict[str, Any], fmt: ToolFormatName
) -> None:
    pin = _spec({"type": "custom", "name": "pin", "format": PIN_FORMAT})
    grammar = grammar_for(_fmt(fmt), Tools((pin,), "required"), None)
    good = {"name": "pin", "arguments": {"input": "1234"}}
    bad = {"name": "pin", "arguments": {"input": "12a4"}}
    wraps: dict[str, Callable[[dict[str, Any]], str]] = {
        "llama3": lambda c: json.dumps({"name": c["name"], "parameters": c["arguments"]}),
        "mistral": lambda c: "[TOOL_CALLS][" + json.dumps(c) + "]",
        "mistral_args": lambda c: f"[TOOL_CALLS]pin[ARGS]{json.dumps(c['arguments'])}",
    }
    wrap = wraps[fmt]
    assert accepts(grammar, wrap(good)) and not accepts(grammar, wrap(bad))
    # a Lark grammar cannot be enforced inside a JSON string: the input is any string there
    # (declaring Codex's tool never fails a request), never a 400
    patch = tool_set([{"type": "function", "name": "f"}, apply_patch]).specs[1]
    auto = grammar_for(_fmt(fmt), Tools((pin, patch), "auto"), None)
    assert auto is not None
    named = grammar_for(_fmt(fmt), Tools((patch,), "named", "apply_patch"), None)
    call = {"name": "apply_patch", "arguments": {"input": "not a patch </tool_call>"}}
    wraps["mistral_args"] = lambda c: f"[TOOL_CALLS]apply_patch[ARGS]{json.dumps(c['arguments'])}"
    assert accepts(named, wraps[fmt](call))
    assert not accepts(named, wraps[fmt]({"name": "apply_patch", "arguments": {"input": 1}}))


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "grammar", "syntax": "lark", "definition": "start: 'a'"},
        {"type": "grammar", "syntax": "lark", "definition": "start: a\n"},
        {"type": "grammar", "syntax": "lark", "definition": 'start: "a" }\nx: "b"'},
        {"type": "grammar", "syntax": "lark", "definition": ""},
        {"type": "grammar", "syntax": "regex", "definition": "[0-9"},
        {"type": "grammar", "definition": "start: a"},
    ],
)
def test_a_grammar_llguidance_cannot_compile_is_a_400(fmt: dict[str, Any]) -> None:
    tools: list[dict[str, object]] = [
        {"type": "function", "name": "f"},
        {"type": "custom", "name": "t", "format": fmt},
    ]
    with pytest.raises(InvalidRequest) as err:
        check_schemas(
            GenerationRequest("r", prompt="", tools=tools_for(tool_set(tools), None, None))
        )
    assert err.value.param == "tools[1].format"


def test_a_custom_tool_is_chosen_by_name(apply_patch: dict[str, Any]) -> None:
    tools = tool_set([{"type": "function", "name": "f"}, apply_patch])
    chosen = tools_for(tools, {"type": "custom", "name": "apply_patch"}, None)
    assert chosen is not None and chosen.choice == "named" and chosen.name == "apply_patch"
    assert [t.name for t in chosen.offered] == ["apply_patch"]


def test_history_writes_custom_calls_raw() -> None:
    arguments = json.dumps({"input": PATCH})
    call = ToolCallRef("c1", "apply_patch", arguments)
    json_call = ToolCallRef("c2", "add", '{"a": 1}')
    messages = (
        ChatMessage("user", "fix it"),
        ChatMessage("assistant", "", tool_calls=(call, json_call)),
        ChatMessage("tool", "Done!", tool_call_id="c1"),
    )
    spec = ToolSpec("apply_patch", "Edit files", freeform=("lark", "start: x"))
    tools = Tools((spec, ADD))
    out = generic_messages(messages, tools.offered, custom_names(tools))
    assert out[2].content == raw("apply_patch", PATCH) + call_text("add", '{"a": 1}')
    system = out[0].content
    assert '"input": "free text in this Lark grammar:\\nstart: x"' in system
    assert "then the text as it is (not JSON)" in system
    # a call of a tool that is no custom tool (or no longer offered) stays JSON
    assert generic_messages(messages, ())[1].content.startswith('<tool_call>{"name": "apply')


def test_the_client_gets_the_input_exactly() -> None:
    for text in (PATCH, '{"input": "nested"}', "", "\\"):
        assert custom_input(json.dumps({"input": text})) == text


@pytest.mark.timeout(60)
def test_the_input_reaches_the_client_exactly_streamed_and_not(apply_patch: dict[str, Any]) -> None:
    """A scripted model (generic format) that writes a raw call: the Responses API's
    ``custom_tool_call.input``, its input events and a stored turn's history all hold it."""
    reply = "<tool_call>apply_patch\n" + PATCH + "</tool_call>"
    table = {
        "reply": reply,
        "capabilities": ["streaming", "completions", "tools"],
        "tool_format": "generic",
    }
    kw: Any = {
        "model": "m", "input": "patch it", "tools": [apply_patch],
        "tool_choice": {"type": "custom", "name": "apply_patch"},
    }  # fmt: skip
    with (
        ServerThread(scripted_config({"m": table})) as srv,
        OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0) as client,
    ):
        body = client.responses.create(**kw)
        [call] = body.output
        assert call.type == "custom_tool_call" and call.input == PATCH
        assert call.id.startswith("ctc") and body.status == "completed"
        events = list(client.responses.create(**kw, stream=True))
        deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
        done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
        last: Any = events[-1]
        assert len(deltas) > 1 and "".join(deltas) == PATCH  # streamed as it was written
        assert done == [PATCH] and last.response.output[0].input == PATCH
        # the call goes back into the conversation with its output: accepted
        turn: Any = [
            call.to_dict(),
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"},
        ]
        again = client.responses.create(**{**kw, "input": turn, "tool_choice": "auto"})
        assert again.status == "completed"


#: A long input with every kind of escape: quotes, backslashes, control characters, a
#: backslash before a ``u``, non-ASCII text and a character outside the BMP.
LONG = PATCH * 4 + 'é😀 \\u00e9 "quoted" \\ \t\x00 \u2028' + "😀" * 5 + "\n"


def _input_events(events: list[Any]) -> tuple[list[str], list[str], int]:
    """A custom call's input deltas and done inputs, and how many deltas came before the
    first done."""
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
    first_done = kinds.index("response.custom_tool_call_input.done")
    before = kinds[:first_done].count("response.custom_tool_call_input.delta")
    return deltas, done, before


@pytest.mark.timeout(60)
def test_the_responses_stream_sends_the_input_as_it_arrives() -> None:
    """Through the openai SDK's Responses streaming: a long custom input arrives in several
    ``custom_tool_call_input.delta`` events before ``.done``, which together are exactly
    the input, whether the model wrote the call raw (generic format: escaped as it is read)
    or as JSON arguments ``{"input": ...}`` streamed in 3-character pieces, which cut
    escapes (``\\u`` sequences, surrogate pairs) in two."""
    arguments = json.dumps({"input": LONG})
    pieces = [arguments[i : i + 3] for i in range(0, len(arguments), 3)]
    assert any(p.endswith("\\") or "\\u" in p[-5:] for p in pieces)  # escapes are cut
    caps = ["streaming", "completions", "tools"]
    models: dict[str, dict[str, Any]] = {
        "raw": {"reply": raw("note", LONG), "capabilities": caps, "tool_format": "generic"},
        "json": {"capabilities": caps, "tool_calls": [{"name": "note", "arguments": arguments}]},
    }
    note = {"type": "custom", "name": "note", "description": "Take a note"}
    with (
        ServerThread(scripted_config(models)) as srv,
        OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0) as client,
    ):
        for model in models:
            kw: Any = {"model": model, "input": "note it", "tools": [note]}
            with client.responses.stream(**kw) as stream:
                events = list(stream)
                final = stream.get_final_response()
            deltas, done, before = _input_events(events)
            assert before == len(deltas) > 10, model
            assert "".join(deltas) == LONG and done == [LONG], model
            [call] = final.output
            assert call.type == "custom_tool_call" and call.input == LONG, model
            body = client.responses.create(**kw)
            assert body.output[0].type == "custom_tool_call"
            assert body.output[0].input == LONG, model


@pytest.mark.parametrize(
    "arguments",
    ['{"x": 1}', "not json", '{"input": "a\nb"}', '{"input": "a\nb", "x": 1}', ""],
)
def test_the_decoder_ends_with_what_the_body_holds(arguments: str) -> None:
    """Arguments of another shape come whole at the end; a raw control character in the
    string is input: the pieces are always the input a collected body holds."""
    for step in (1, 4, 100):
        decoder = CustomInput()
        text = "".join(
            decoder.feed(arguments[i : i + step]) for i in range(0, len(arguments), step)
        )
        assert text + decoder.end() == custom_input(arguments)
        assert decoder.end() == ""  # once


def _chain(rules: int, brackets: int = 0) -> str:
    """A Lark grammar whose rules reference each other in a chain (each reference inside
    ``brackets`` parentheses)."""
    refs = "".join(f"r{i}: {'(' * brackets}r{i + 1}{')' * brackets}\n" for i in range(rules))
    return f'start: r0\n{refs}r{rules}: "a"\n'


_CHECK = """
import sys
from gateway.endpoints.responses.tools import tool_set, tools_for
from gateway.errors import InvalidRequest
from gateway.output.plan import check_schemas
from gateway.types import GenerationRequest
tool = {"type": "custom", "name": "t", "format": {"type": "grammar", "syntax": "lark",
        "definition": sys.stdin.read()}}
try:
    check_schemas(GenerationRequest("r", prompt="", tools=tools_for(tool_set([tool]), None, None)))
except InvalidRequest as err:
    print(err.param, err)
else:
    print("compiled")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        (_chain(3000), "longer than 32768 characters"),  # ~36 KB: it crashed the server
        (_chain(2000), "has 2002 rules"),  # 23 KB, crashes llguidance from ~2700
        (_chain(900), "nests too deeply"),
        (_chain(450, brackets=10), "nests too deeply"),  # 16 KB, crashes from ~400
        (_chain(500), "compiled"),
        (_chain(100, brackets=2), "compiled"),
    ],
    ids=[
        "chain-3000",
        "chain-2000",
        "chain-900",
        "bracketed-chain-450",
        "chain-500",
        "bracketed-chain-100",
    ],
)
def test_a_grammar_that_would_overflow_llguidance_is_a_400(grammar: str, says: str) -> None:
    """Checked in a child process: a regression would kill it (a segfault), not pytest."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CHECK], input=grammar, capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert says in done.stdout
    if says != "compiled":
        assert done.stdout.startswith("tools[0].format ")


@pytest.mark.parametrize(
    ("grammar", "shape"),
    [
        ('start: a b\na: "x" | b // c d e\nb: /[a-z()]+/ c?\nc: "(" a ")"\n', (4, 4)),
        ('start: x\nx: (((y)))\ny: "("\n%import common.WS\n%ignore WS\n', (3, 9)),
        (_chain(99), (101, 101)),
    ],
)
def test_a_lark_grammar_is_measured_without_compiling_it(
    grammar: str, shape: tuple[int, int]
) -> None:
    """Strings, regexes and comments hold no references or brackets; a cycle counts whole."""
    assert lark_shape(grammar) == shape


def test_a_grammar_too_deep_is_a_400_when_the_request_is_read() -> None:
    tool: dict[str, object] = {
        "type": "custom",
        "name": "t",
        "format": {"type": "grammar", "syntax": "lark", "definition": _chain(900)},
    }
    with pytest.raises(InvalidRequest) as err:
        tool_set([{"type": "function", "name": "f"}, tool])
    assert err.value.param == "tools[1].format" and "nests too deeply" in str(err.value)


def test_a_hermes_model_is_told_the_raw_call_and_sees_earlier_ones_raw() -> None:
    """A native template knows only the JSON form: the raw-call instructions are added and an
    earlier custom call is written raw into the assistant's text (the template writes the
    function calls)."""
    note_call = ToolCallRef("c1", "note", json.dumps({"input": 'a "b"\n'}))
    add_call = ToolCallRef("c2", "add", '{"a": 1}')
    messages = (
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "", tool_calls=(note_call, add_call)),
        ChatMessage("tool", "ok", tool_call_id="c1"),
    )
    request = GenerationRequest("r", messages=messages, tools=Tools((ADD, NOTE)))
    planned = plan_output(request, _fmt("hermes")).messages
    assert planned is not None
    assert (
        planned[0].role == "system"
        and "<tool_call><function name>, a new line" in planned[0].content
    )
    assistant = planned[2]
    assert assistant.content == raw("note", 'a "b"\n') and assistant.tool_calls == (add_call,)
