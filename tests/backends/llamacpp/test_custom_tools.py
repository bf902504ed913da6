"""Codex's free-form ``apply_patch`` tool (a custom tool with a Lark grammar, taken from the
installed Codex CLI) on the real SmolLM2 over ``/v1/responses``: chosen by name, the model's
call is a ``custom_tool_call`` whose input is a patch the grammar accepts, streamed and not; a
custom tool with a small Lark grammar over ``/v1/chat/completions`` likewise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL
from tests.gateway.test_custom_tools import codex_apply_patch_grammar
from tests.gateway.test_output_grammar import accepts

pytestmark = pytest.mark.timeout(60)
#: The patch to write is in the request: a 135M model left to invent one loops on a line.
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"
ASK = f"Call apply_patch with this patch:\n{PATCH}"


@pytest.fixture(scope="module")
def client(smol_server: ServerThread) -> Iterator[OpenAI]:
    with OpenAI(base_url=smol_server.base_url + "/v1", api_key="test", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_codex_apply_patch_call_follows_its_grammar(client: OpenAI, stream: bool) -> None:
    grammar = codex_apply_patch_grammar()
    tool: Any = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool, "
        "so do not wrap the patch in JSON.",
        "format": {"type": "grammar", "syntax": "lark", "definition": grammar},
    }
    kw: Any = {
        "model": SMOL, "input": ASK, "tools": [tool], "max_output_tokens": 64,
        "tool_choice": {"type": "custom", "name": "apply_patch"}, "temperature": 0,
    }  # fmt: skip
    if stream:
        with client.responses.stream(**kw) as s:
            events = list(s)
            response = s.get_final_response()
        inputs = [e for e in events if e.type == "response.custom_tool_call_input.done"]
        deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    else:
        response = client.responses.create(**kw)
    [call] = response.output
    assert response.status == "completed", response
    assert call.type == "custom_tool_call" and call.name == "apply_patch", call
    assert accepts(grammar, call.input), call.input
    assert call.input.startswith("*** Begin Patch\n*** Add File: ")
    if stream:
        assert [e.input for e in inputs] == ["".join(deltas)] == [call.input]


#: A small bounded language: a 135M model finishes it well within its tokens.
SETTING = 'start: "set " KEY " = " VALUE\nKEY: /[a-z]{1,12}/\nVALUE: /[0-9]{1,4}/\n'


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_chat_custom_tool_call_follows_its_grammar(client: OpenAI, stream: bool) -> None:
    """The same free-form tool over ``/v1/chat/completions``, spelled as the SDK spells it:
    the answer's call is ``{"type": "custom", "custom": {"name", "input"}}`` and its input
    is one the grammar accepts (streamed: the ``custom.input`` pieces put together)."""
    tool: Any = {
        "type": "custom",
        "custom": {
            "name": "settings",
            "description": "Change a setting, e.g. `set volume = 3`.",
            "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": SETTING}},
        },
    }
    kw: Any = {
        "model": SMOL, "messages": [{"role": "user", "content": "Set the volume to 7."}],
        "tools": [tool], "tool_choice": {"type": "custom", "custom": {"name": "settings"}},
        "max_tokens": 48, "temperature": 0,
    }  # fmt: skip
    if stream:
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        for chunk in client.chat.completions.create(**kw, stream=True):
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for piece in choice.delta.tool_calls or ():
                    data = piece.to_dict()
                    if piece.index in calls:
                        calls[piece.index]["custom"]["input"] += data["custom"]["input"]
                    else:
                        calls[piece.index] = data
        [call] = calls.values()
        assert call["type"] == "custom" and call["id"], call
        name, text = call["custom"]["name"], call["custom"]["input"]
    else:
        body = client.chat.completions.create(**kw)
        finish = body.choices[0].finish_reason
        [made] = body.choices[0].message.tool_calls or []
        assert made.type == "custom", made
        name, text = made.custom.name, made.custom.input
    assert finish == "tool_calls" and name == "settings"
    assert accepts(SETTING, text), text
    assert text.startswith("set "), text
