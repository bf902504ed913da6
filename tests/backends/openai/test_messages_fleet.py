"""A Messages request to a fleet: in kind to replicas that serve ``/v1/messages``
(``messages_api = true``: stop sequences, tool calls, prefills and usage come back as the
replica sent them), converted to chat completions for the others. The replicas are real
gateways on loopback (the scripted backend); the client is the official anthropic SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message

from gateway.testing import ServerThread
from tests.backends.openai.fleet import front_config, scripted_upstream
from tests.gateway.helpers import scripted

pytestmark = pytest.mark.timeout(30)

ALL = ["streaming", "completions", "tools", "json_schema"]
CALL = {"name": "lookup", "arguments": '{"query": "llama.cpp"}'}
LOOKUP: Any = {
    "name": "lookup",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}
HI: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerThread, ServerThread]]:
    upstream = scripted_upstream(
        {
            "talker": {"reply": "one two three four five", "capabilities": ALL},
            "caller": {"capabilities": ALL, "tool_calls": [CALL]},
            "echo": {"echo": True, "capabilities": ALL},
        }
    )
    with ServerThread(upstream) as up:
        replica = {"replicas": [{"url": up.base_url}], "health": {"path": "/ready"}}
        native = {**replica, "messages_api": True, "capabilities": ["tools", "json_schema"]}
        front = front_config(
            {
                "talker": native,
                "caller": native,
                "echo": native,
                "talker-chat": {**replica, "upstream_model": "talker"},
            }
        )
        with ServerThread(front) as fr:
            yield up, fr


@pytest.fixture
def client(servers: tuple[ServerThread, ServerThread]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=servers[1].base_url, api_key="k", max_retries=0) as c:
        yield c


def upstream_ids(servers: tuple[ServerThread, ServerThread], model: str) -> list[str]:
    return scripted(servers[0].backend(model)).record.started


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_a_messages_request_goes_to_the_replicas_messages_api(
    servers: tuple[ServerThread, ServerThread], client: anthropic.Anthropic
) -> None:
    body = client.messages.create(model="talker", max_tokens=50, messages=HI)
    assert text_of(body) == "one two three four five" and body.stop_reason == "end_turn"
    assert upstream_ids(servers, "talker")[-1].startswith("msg_")  # the replica's /v1/messages
    assert body.usage.input_tokens > 0 and body.usage.output_tokens == 5
    with client.messages.stream(model="talker", max_tokens=50, messages=HI) as stream:
        assert text_of(stream.get_final_message()) == text_of(body)


def test_stop_sequences_and_limits_come_back_as_the_replica_said(
    client: anthropic.Anthropic,
) -> None:
    stopped = client.messages.create(
        model="talker", max_tokens=50, messages=HI, stop_sequences=["three"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "three"
    cut = client.messages.create(model="talker", max_tokens=2, messages=HI)
    assert cut.stop_reason == "max_tokens"


def test_tool_calls_come_back_as_tool_use(client: anthropic.Anthropic) -> None:
    body = client.messages.create(model="caller", max_tokens=50, messages=HI, tools=[LOOKUP])
    uses = [b for b in body.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["lookup"] and uses[0].input == {"query": "llama.cpp"}
    assert uses[0].id.startswith("toolu_") and body.stop_reason == "tool_use"
    with client.messages.stream(
        model="caller", max_tokens=50, messages=HI, tools=[LOOKUP]
    ) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"query": "llama.cpp"}]


def test_a_tool_round_trip_reaches_the_replica_whole(client: anthropic.Anthropic) -> None:
    """Tool results and the user's text after them arrive as one user turn; the echo
    replica answers that turn's last text."""
    turns: Any = [
        *HI,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"query": "x"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found it"},
            {"type": "text", "text": "thanks"}]},
    ]  # fmt: skip
    body = client.messages.create(model="echo", max_tokens=50, messages=turns, tools=[LOOKUP])
    assert text_of(body) == "thanks"


def test_other_fleets_get_a_chat_completion(
    servers: tuple[ServerThread, ServerThread], client: anthropic.Anthropic
) -> None:
    body = client.messages.create(model="talker-chat", max_tokens=50, messages=HI)
    assert text_of(body) == "one two three four five"
    assert upstream_ids(servers, "talker")[-1].startswith("chatcmpl-")


def test_claude_codes_session_keeps_a_conversation_on_one_replica() -> None:
    """``X-Claude-Code-Session-Id`` is the affinity key: turns whose first messages differ
    (Claude Code's reminders change) still go to the replica that holds the session."""
    ups = [scripted_upstream({"talker": {"reply": "ok", "capabilities": ALL}}) for _ in range(3)]
    with ServerThread(ups[0]) as a, ServerThread(ups[1]) as b, ServerThread(ups[2]) as c:
        replicas = [{"url": s.base_url} for s in (a, b, c)]
        table = {"replicas": replicas, "balancing": "affinity", "messages_api": True,
                 "health": {"path": "/ready"}}  # fmt: skip
        with ServerThread(front_config({"talker": table})) as front:
            for session in ("s-1", "s-2", "s-3"):
                headers = {"x-claude-code-session-id": session}
                with anthropic.Anthropic(
                    base_url=front.base_url, api_key="k", max_retries=0, default_headers=headers
                ) as client:
                    for turn in range(4):
                        ask: Any = [{"role": "user", "content": f"turn {turn} of {session}"}]
                        client.messages.create(model="talker", max_tokens=4, messages=ask)
                served = [len(scripted(s.backend("talker")).record.started) for s in (a, b, c)]
                assert sorted(served) == [0, 0, 4], (session, served)
                for s in (a, b, c):
                    scripted(s.backend("talker")).record.started.clear()
