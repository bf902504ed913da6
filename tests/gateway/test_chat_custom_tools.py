"""Custom tools (free-form input, optionally in a Lark or regex grammar) on the Chat Completions
API, spelled as OpenAI's SDK spells them: ``{"type": "custom", "custom": {"name", "description",
"format"}}`` tools, ``{"type": "custom", "custom": {"name"}}`` and ``allowed_tools`` choices,
assistant messages carrying ``{"type": "custom", "custom": {"name", "input"}}`` calls; the
answer's calls carry the input exactly as the model wrote it, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.endpoints.responses.tools import tool_set
from gateway.errors import InvalidRequest
from gateway.output.calls import CustomInput, custom_names
from gateway.output.plan import call_text, check_schemas, generic_messages
from gateway.testing import ServerThread
from gateway.types import ClientRequest, ToolCallRef
from gateway.wire.convert import chat_request
from tests.gateway.helpers import scripted_config
from tests.support import openai_client

LARK = 'start: "*** Begin\\n" line+ "*** End"\nline: /[+-][^\\n]*\\n/\n'
PATCH = '*** Begin\n+print("it\'s \\"quoted\\" \\\\ \\n")\n-é😀 {"input": 1}\n*** End'
PATCHER: dict[str, Any] = {
    "type": "custom",
    "custom": {
        "name": "patch",
        "description": "Edit files with a patch",
        "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": LARK}},
    },
}
PIN: dict[str, Any] = {
    "type": "custom",
    "custom": {
        "name": "pin",
        "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": "[0-9]{4}"}},
    },
}
NOTE: dict[str, Any] = {"type": "custom", "custom": {"name": "note"}}
ADD: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}
ASK: list[dict[str, Any]] = [{"role": "user", "content": "patch it"}]
ADDED = '{"a": 1}'


def _parse(**body: Any) -> ClientRequest:
    return chat_request(json.dumps({"model": "m", "messages": ASK, **body}).encode(), "req")


def _bad(**body: Any) -> InvalidRequest:
    """The 400 of parsing the request, or of compiling its grammars (in the worker thread)."""
    with pytest.raises(InvalidRequest) as err:
        check_schemas(_parse(**body).generations[0])
    return err.value


@pytest.mark.timeout(10)
def test_custom_tools_become_the_same_specs_as_on_the_responses_api() -> None:
    request = _parse(tools=[ADD, PATCHER, PIN, NOTE])
    tools = request.generations[0].tools
    assert tools is not None and tools.choice == "auto"
    add, patch, pin, note = tools.specs
    assert add.freeform is None and patch.freeform == ("lark", LARK)
    assert pin.freeform == ("regex", "[0-9]{4}") and note.freeform == ("text", "")
    assert (
        patch.param == "tools[1].custom.format" and patch.description == "Edit files with a patch"
    )
    assert json.loads(pin.parameters)["properties"]["input"]["pattern"] == "^(?:[0-9]{4})$"
    # one conversion: the Responses API's flat spelling of the same tools makes the same specs
    flat: list[dict[str, Any]] = [{"type": "custom", **t["custom"]} for t in (PATCHER, PIN, NOTE)]
    for f in flat:
        if "format" in f and f["format"]["type"] == "grammar":
            f["format"] = {"type": "grammar", **f["format"]["grammar"]}
    responses = tool_set(flat).specs
    for chat, other in zip((patch, pin, note), responses, strict=True):
        assert (chat.name, chat.parameters, chat.freeform) == (
            other.name,
            other.parameters,
            other.freeform,
        )


@pytest.mark.timeout(10)
def test_a_custom_tool_is_chosen_by_name_or_among_allowed_tools() -> None:
    named = _parse(
        tools=[ADD, PATCHER], tool_choice={"type": "custom", "custom": {"name": "patch"}}
    )
    tools = named.generations[0].tools
    assert tools is not None and tools.choice == "named" and tools.name == "patch"
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [
                {"type": "custom", "custom": {"name": "pin"}},
                {"type": "function", "function": {"name": "add"}},
            ],
        },
    }
    tools = _parse(tools=[ADD, PATCHER, PIN], tool_choice=allowed).generations[0].tools
    assert tools is not None and tools.choice == "required"
    assert [t.name for t in tools.offered] == ["add", "pin"]


@pytest.mark.timeout(10)
def test_a_remote_replica_gets_custom_tools_as_functions() -> None:
    request = _parse(tools=[PATCHER], tool_choice={"type": "custom", "custom": {"name": "patch"}})
    sent = dict(request.generations[0].passthrough)
    [tool] = json.loads(sent["tools"])
    assert tool["type"] == "function" and tool["function"]["name"] == "patch"
    assert tool["function"]["parameters"]["required"] == ["input"]
    assert json.loads(sent["tool_choice"]) == {"type": "function", "function": {"name": "patch"}}
    # function tools alone still go as the client sent them
    plain = dict(_parse(tools=[ADD], tool_choice="required").generations[0].passthrough)
    assert json.loads(plain["tools"]) == [ADD] and json.loads(plain["tool_choice"]) == "required"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: 'a'"}},
        {"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: a\n"}},
        {"type": "grammar", "grammar": {"syntax": "lark", "definition": ""}},
        {"type": "grammar", "grammar": {"syntax": "regex", "definition": "[0-9"}},
        {"type": "grammar", "grammar": {"definition": "start: a"}},
        {"type": "grammar", "grammar": {"syntax": "ebnf", "definition": "start: a"}},
        {"type": "grammar"},
        {"type": "lark"},
    ],
)
def test_a_bad_grammar_is_a_400_naming_the_tools_format(fmt: dict[str, Any]) -> None:
    tool = {"type": "custom", "custom": {"name": "t", "format": fmt}}
    err = _bad(tools=[ADD, tool])
    assert err.param is not None and err.param.startswith("tools[1].custom.format"), err.param


def _named(kind: str, name: str) -> dict[str, Any]:
    return {"type": kind, kind: {"name": name}}


def _allowed(*names: dict[str, Any]) -> dict[str, Any]:
    return {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": list(names)}}


def _history(*calls: dict[str, Any]) -> list[dict[str, Any]]:
    return [*ASK, {"role": "assistant", "tool_calls": list(calls)}]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{"type": "custom"}]}, "tools[0].custom"),
        ({"tools": [{"type": "custom", "custom": {"name": "a b"}}]}, "tools[0].custom.name"),
        ({"tools": [NOTE, NOTE]}, "tools"),
        ({"tools": [ADD], "tool_choice": _named("custom", "x")}, "tool_choice"),
        ({"tools": [ADD], "tool_choice": _named("custom", "add")}, "tool_choice"),
        ({"tools": [PATCHER], "tool_choice": _named("function", "patch")}, "tool_choice"),
        (
            {"tools": [PATCHER], "tool_choice": _allowed(_named("custom", "x"))},
            "tool_choice.allowed_tools.tools[0]",
        ),
        (
            {"messages": _history({"id": "c", "type": "custom", "custom": {"name": "patch"}})},
            "messages[1].tool_calls[0].custom.input",
        ),
        ({"messages": _history({"id": "c", "type": "mcp"})}, "messages[1].tool_calls[0]"),
    ],
)
def test_bad_custom_tool_fields_are_400s_naming_them(body: dict[str, Any], param: str) -> None:
    assert _bad(**body).param == param


@pytest.mark.timeout(10)
def test_custom_calls_in_the_history_are_rendered_back_raw() -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "custom", "custom": {"name": "patch", "input": PATCH}},
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": ADDED}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Done!"},
    ]  # fmt: skip
    request = _parse(messages=history, tools=[ADD, PATCHER])
    generation = request.generations[0]
    assert generation.messages is not None and generation.tools is not None
    call, function = generation.messages[1].tool_calls
    assert call == ToolCallRef("c1", "patch", json.dumps({"input": PATCH}, ensure_ascii=False))
    assert function == ToolCallRef("c2", "add", ADDED)
    tools = generation.tools
    out = generic_messages(generation.messages, tools.offered, custom_names(tools))
    assert out[2].content == f"<tool_call>patch\n{PATCH}</tool_call>" + call_text("add", ADDED)
    assert "<tool_response>\nDone!\n</tool_response>" in out[3].content


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", [PATCH, "", "\\", "\\u12", 'a"b', "é😀\u2028\x00"])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_the_streamed_input_decodes_piece_by_piece(text: str, step: int) -> None:
    spellings = [
        json.dumps({"input": text}, ensure_ascii=False),
        json.dumps({"input": text}),
        '{ "input" : "' + json.dumps(text)[1:-1] + '"}',
    ]
    for arguments in spellings:
        decoder = CustomInput()
        pieces = [decoder.feed(arguments[i : i + step]) for i in range(0, len(arguments), step)]
        assert "".join(pieces) + decoder.end() == text
    other = CustomInput()  # not {"input": ...}: the arguments whole, at the end
    assert other.feed('{"x": 1}') == "" and other.end() == '{"x": 1}'


SCRIPTED: dict[str, Any] = {
    "capabilities": ["streaming", "completions", "tools"],
    "tool_format": "generic",
}
#: The model answers with a raw custom call, then a JSON function call (the generic format).
RAW_REPLY = (
    f"<tool_call>patch\n{PATCH}</tool_call>"
    '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    models: dict[str, dict[str, Any]] = {
        "raw": {**SCRIPTED, "reply": RAW_REPLY},
        # a format's JSON form: arguments {"input": ...} in 3-character pieces
        "json": {
            "capabilities": SCRIPTED["capabilities"],
            "tool_calls": [{"name": "patch", "arguments": json.dumps({"input": PATCH})}],
        },
    }
    with ServerThread(scripted_config(models)) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[OpenAI]:
    with openai_client(server.base_url) as c:
        yield c


def _streamed_calls(client: OpenAI, **kw: Any) -> dict[int, dict[str, Any]]:
    """The streamed calls reassembled (a custom call's input from its ``custom.input``
    pieces), checking each call's first piece names it and later ones do not."""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for piece in chunk.choices[0].delta.tool_calls or ():
            data = piece.to_dict()
            if piece.index not in calls:
                assert data["id"] and data["type"] in ("custom", "function")
                calls[piece.index] = data
                continue
            assert "id" not in data and "type" not in data
            call = calls[piece.index]
            if call["type"] == "custom":
                assert set(data) == {"index", "custom"} and set(data["custom"]) == {"input"}
                call["custom"]["input"] += data["custom"]["input"]
            else:
                call["function"]["arguments"] += data["function"]["arguments"]
    assert finish == "tool_calls"
    return calls


@pytest.mark.timeout(60)
def test_a_raw_custom_call_reaches_the_sdk_exactly_streamed_and_not(client: OpenAI) -> None:
    kw: Any = {"model": "raw", "messages": ASK, "tools": [PATCHER, ADD]}
    body = client.chat.completions.create(**kw)
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    custom, function = choice.message.tool_calls or []
    assert custom.type == "custom" and custom.custom.name == "patch"
    assert custom.custom.input == PATCH and custom.id
    assert function.type == "function" and json.loads(function.function.arguments) == {"a": 1}
    calls = _streamed_calls(client, **kw)
    assert calls[0]["custom"] == {"name": "patch", "input": PATCH}
    assert calls[1]["function"]["name"] == "add"
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1}
    # the call goes back with the tool's answer, chosen by name: accepted
    turn = [
        *ASK,
        choice.message.to_dict(exclude_none=True),
        {"role": "tool", "tool_call_id": custom.id, "content": "Done!"},
        {"role": "tool", "tool_call_id": function.id, "content": "2"},
    ]
    named = _named("custom", "patch")
    again = client.chat.completions.create(**{**kw, "messages": turn, "tool_choice": named})
    call = (again.choices[0].message.tool_calls or [])[0]  # (the scripted model ignores it)
    assert call.type == "custom" and call.custom.input == PATCH


@pytest.mark.timeout(60)
def test_json_form_arguments_stream_as_input_pieces(client: OpenAI, server: ServerThread) -> None:
    kw: Any = {"model": "json", "messages": ASK, "tools": [PATCHER]}
    [call] = client.chat.completions.create(**kw).choices[0].message.tool_calls or []
    assert call.type == "custom" and call.custom.input == PATCH
    assert _streamed_calls(client, **kw)[0]["custom"] == {"name": "patch", "input": PATCH}
    # a wire check of one piece: the function-call delta's shape, custom for function
    body = {**kw, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    pieces = [
        p for c in lines if c["choices"] for p in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert set(pieces[0]) == {"index", "id", "type", "custom"} and pieces[0]["type"] == "custom"
    assert pieces[1] == {"index": 0, "custom": {"input": pieces[1]["custom"]["input"]}}


@pytest.mark.timeout(60)
def test_a_bad_grammar_is_a_400_through_the_sdk(client: OpenAI) -> None:
    grammar = {"syntax": "lark", "definition": "start: a\n"}
    tool = {
        "type": "custom",
        "custom": {"name": "t", "format": {"type": "grammar", "grammar": grammar}},
    }
    kw: Any = {"model": "raw", "messages": ASK, "tools": [ADD, tool]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    body: Any = err.value.body
    assert body["param"] == "tools[1].custom.format" and "lark grammar" in body["message"]


@pytest.mark.timeout(10)
def test_a_grammar_too_large_or_deep_is_a_400_naming_the_tools_format() -> None:
    """Bounded before llguidance sees it (a chain of ~3000 rules crashed the server)."""
    chain = "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(3000)) + 'r3000: "a"\n'
    deep = "start: r0\n" + "".join(f"r{i}: ((((r{i + 1}))))\n" for i in range(300)) + 'r300: "a"\n'
    for definition, says in ((chain, "longer than"), (deep, "nests too deeply")):
        grammar = {"syntax": "lark", "definition": definition}
        tool = {
            "type": "custom",
            "custom": {"name": "t", "format": {"type": "grammar", "grammar": grammar}},
        }
        with pytest.raises(InvalidRequest) as err:
            _parse(tools=[ADD, tool])  # read, not compiled
        assert err.value.param == "tools[1].custom.format" and says in str(err.value)
