"""``/v1/messages`` with the official ``anthropic`` SDK over real HTTP (scripted backend):
bodies and events from the same blocks, tool calls interleaved with text, Anthropic's error
shape on every path before and after the headers, ``x-api-key``, the queue's 529."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config
from tests.support import sse_json, wait_for

pytestmark = pytest.mark.timeout(30)

TOOLS = ["streaming", "completions", "tools", "json_schema"]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
ADD: Any = {
    "name": "add",
    "input_schema": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    },
}
HI: Any = [{"role": "user", "content": "hello there"}]
#: sha256 of "sk-test-1234567890"
KEY_SHA = "e0af5a5e4f889b9add80637ed964016306db6a23e18782c759ee32bdb8230a62"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "m": {"reply": "one two three four five", "aliases": ["claude-haiku-4-5"]},
            "mixed": {
                "reply": f"Let me check. {CALL} Done.",
                "capabilities": TOOLS,
                "tool_format": "hermes",
            },
            "thinker": {
                "reply": "<think>hmm so</think>The answer.",
                "capabilities": TOOLS,
                "tool_format": "hermes",
            },
            "broken": {"reply": "a b c d e f", "fail_after_tokens": 2},
            "echo": {"echo": True, "capabilities": TOOLS},
            "echo-tools": {
                "echo": True,
                "capabilities": TOOLS,
                "tool_format": "hermes",
                "context_length": 200_000,
            },
        },
        server={"keepalive_s": 0.05},
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as c:
        yield c


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def post(server: ServerThread, path: str, body: Any, **kw: Any) -> httpx.Response:
    """A raw request (``httpx``), for what the SDK would not send or would hide."""
    return httpx.post(server.base_url + path, json=body, timeout=10, **kw)


def test_a_plain_message_through_an_alias(client: anthropic.Anthropic) -> None:
    body = client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=HI)
    assert body.model == "claude-haiku-4-5" and body.stop_reason == "end_turn"
    assert [b.type for b in body.content] == ["text"]
    assert text_of(body) == "one two three four five"
    assert body.usage.output_tokens == 5 and body.usage.input_tokens > 0


def test_max_tokens_cut_is_named(client: anthropic.Anthropic) -> None:
    body = client.messages.create(model="m", max_tokens=2, messages=HI)
    assert body.stop_reason == "max_tokens" and body.usage.output_tokens == 2


def test_stop_sequence_is_named(client: anthropic.Anthropic) -> None:
    body = client.messages.create(
        model="m",
        max_tokens=50,
        messages=HI,
        stop_sequences=["three"],
    )
    assert body.stop_reason == "stop_sequence" and body.stop_sequence == "three"
    assert text_of(body).strip() == "one two"


def test_interleaved_text_and_calls_agree_in_body_and_stream(
    client: anthropic.Anthropic,
) -> None:
    kw: Any = {"model": "mixed", "max_tokens": 100, "messages": HI, "tools": [ADD]}
    body = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    shapes = [(b.type, getattr(b, "text", None), getattr(b, "input", None)) for b in body.content]
    assert [s[0] for s in shapes] == ["text", "tool_use", "text"]
    assert shapes[1][2] == {"a": 1, "b": 2}
    streamed = [
        (b.type, getattr(b, "text", None), getattr(b, "input", None)) for b in final.content
    ]
    assert streamed == shapes
    assert body.stop_reason == final.stop_reason == "tool_use"


def test_thinking_blocks_only_when_asked(client: anthropic.Anthropic) -> None:
    kw: Any = {"model": "thinker", "max_tokens": 100, "messages": HI}
    shown = client.messages.create(**kw, thinking={"type": "enabled", "budget_tokens": 1024})
    hidden = client.messages.create(**kw, thinking={"type": "disabled"})
    assert [b.type for b in shown.content] == ["thinking", "text"]
    assert getattr(shown.content[0], "thinking", None) == "hmm so"
    assert [b.type for b in hidden.content] == ["text"]
    with client.messages.stream(**kw, thinking={"type": "disabled"}) as stream:
        events = list(stream)
    starts = [e.index for e in events if e.type == "content_block_start"]
    assert starts == [0]  # hidden blocks take no index


def test_conversation_blocks_reach_the_prompt(client: anthropic.Anthropic) -> None:
    """Billing line out, tool results as tool messages, thinking fed back, prefill last."""
    body = client.messages.create(
        model="echo",
        max_tokens=200,
        tools=[ADD],
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=1;\nBe nice."}
        ],
        messages=[
            {"role": "user", "content": "add"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "use the tool", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "3"}],
                    },
                    {"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
    )
    echoed = text_of(body)
    assert echoed == "thanks"  # the echo backend answers the last message's text


def test_count_tokens(server: ServerThread) -> None:
    body = {"model": "m", "messages": HI, "system": "Be brief."}
    r = post(server, "/v1/messages/count_tokens", body)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    made = post(server, "/v1/messages", {**body, "max_tokens": 5}).json()
    assert (
        made["usage"]["input_tokens"] + made["usage"]["cache_read_input_tokens"]
        == r.json()["input_tokens"]
    )


def _anthropic_error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert set(body) == {"type", "error"}


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        (
            "/v1/messages",
            {"model": "nope", "max_tokens": 4, "messages": HI},
            404,
            "not_found_error",
        ),
        ("/v1/messages", {"model": "m", "messages": HI}, 400, "invalid_request_error"),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": "4", "messages": HI},
            400,
            "invalid_request_error",
        ),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 4, "messages": []},
            400,
            "invalid_request_error",
        ),
        (
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "bogus"}]}],
            },
            400,
            "invalid_request_error",
        ),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 4, "messages": HI, "tool_choice": {"type": "any"}},
            400,
            "invalid_request_error",
        ),
        ("/v1/messages", [1, 2], 400, "invalid_request_error"),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 5000, "messages": HI},
            400,
            "invalid_request_error",
        ),
        ("/v1/messages/count_tokens", {"model": "nope", "messages": HI}, 404, "not_found_error"),
        ("/v1/messages/count_tokens", {"messages": HI}, 400, "invalid_request_error"),
        ("/v1/messages/nothing", {}, 404, "not_found_error"),
    ],
)
def test_errors_in_anthropics_shape(
    server: ServerThread, path: str, body: Any, status: int, kind: str
) -> None:
    _anthropic_error(post(server, path, body), status, kind)


def test_transport_errors_in_anthropics_shape(server: ServerThread) -> None:
    url = server.base_url + "/v1/messages"
    _anthropic_error(httpx.get(url), 405, "invalid_request_error")
    bad = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    _anthropic_error(bad, 400, "invalid_request_error")
    text = httpx.post(url, content=b"{}", headers={"content-type": "text/plain"})
    _anthropic_error(text, 415, "invalid_request_error")
    big = httpx.post(url, content=b"x" * (3 << 20), headers={"content-type": "application/json"})
    _anthropic_error(big, 413, "request_too_large")


def test_openai_endpoints_keep_openais_shape(server: ServerThread) -> None:
    r = post(server, "/v1/chat/completions", {"model": "nope", "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_an_engine_failure_after_the_headers_is_one_error_event(server: ServerThread) -> None:
    body = {"model": "broken", "max_tokens": 50, "messages": HI, "stream": True}
    r = post(server, "/v1/messages", body)
    assert r.status_code == 200
    events = sse_json(r.text)
    assert events[0]["type"] == "message_start"
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert "event: error\n" in r.text
    assert not any(e["type"] == "message_stop" for e in events)


def test_sdk_raises_the_right_classes(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=4, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="m", max_tokens=4, messages=[])


def test_a_full_queue_is_529_overloaded() -> None:
    """The one slot is held by an open stream; the next request finds no queue room."""
    slow = {"token_delay_s": 0.2, "reply": "a b c d e f g h",
            "batching": {"max_concurrent": 1, "max_queue": 0}}  # fmt: skip
    with ServerThread(scripted_config({"slow": slow})) as srv:
        body = {"model": "slow", "max_tokens": 8, "messages": HI}
        url = srv.base_url + "/v1/messages"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=10) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # admitted and generating
            r = post(srv, "/v1/messages", body)
            _anthropic_error(r, 529, "overloaded_error")
            assert int(r.headers["retry-after"]) >= 1


def test_api_keys_accept_x_api_key() -> None:
    config = scripted_config(
        {"m": {"reply": "ok"}},
        plugins={"api_keys": {"keys": [{"name": "a", "sha256": KEY_SHA}]}},
    )
    with ServerThread(config) as srv:
        body = {"model": "m", "max_tokens": 4, "messages": HI}
        _anthropic_error(post(srv, "/v1/messages", body), 401, "authentication_error")
        bad = post(srv, "/v1/messages", body, headers={"x-api-key": "wrong"})
        _anthropic_error(bad, 401, "authentication_error")
        ok = post(srv, "/v1/messages", body, headers={"x-api-key": "sk-test-1234567890"})
        assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "ok"
        with anthropic.Anthropic(
            base_url=srv.base_url, api_key="sk-test-1234567890", max_retries=0
        ) as c:
            assert c.messages.count_tokens(model="m", messages=HI).input_tokens > 0
            assert "m" in [m.id for m in c.models.list()]
        openai_style = post(
            srv, "/v1/messages", body, headers={"authorization": "Bearer sk-test-1234567890"}
        )
        assert openai_style.status_code == 200


def test_ping_is_anthropics_event(server: ServerThread) -> None:
    """A stream waiting for its first token sends ``event: ping`` (not an SSE comment)."""
    config = scripted_config(
        {"slow": {"prefill_delay_s": 0.3, "reply": "a"}}, server={"keepalive_s": 0.05}
    )
    with ServerThread(config) as srv:
        body = {"model": "slow", "max_tokens": 4, "messages": HI, "stream": True}
        r = post(srv, "/v1/messages", body)
    assert 'event: ping\ndata: {"type":"ping"}' in r.text
    assert all(
        json.loads(line[6:])["type"] for line in r.text.splitlines() if line.startswith("data: ")
    )


REMINDER = "<system-reminder>x</system-reminder>"
BILLING = "x-anthropic-billing-header: cc_version=2.1.332.0b8; cc_entrypoint=sdk-cli;"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
#: What Claude Code 2.1 sends for one print-mode turn (trimmed: a short system prompt, one
#: tool), recorded against a stand-in server.
CLAUDE_CODE_TURN: Any = {
    "model": "claude-haiku-4-5",
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": REMINDER},
                                     {"type": "text", "text": "say hi",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Platform: linux",
                                        "cache_control": {"type": "ephemeral"}}],
         "output_config": {"effort": "medium"}},
    ],
    "system": [
        {"type": "text", "text": BILLING},
        {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
    ],
    "tools": [
        {"name": "Read", "description": "Read a file",
         "input_schema": {"$schema": DRAFT_2020_12, "type": "object",
                          "properties": {"file_path": {"type": "string"},
                                         "limit": {"type": "integer", "exclusiveMinimum": 0,
                                                   "maximum": 9007199254740991}},
                          "required": ["file_path"], "additionalProperties": False}},
        {"name": "DeferredToolPlaceholder", "description": "d", "defer_loading": True,
         "input_schema": {"type": "object", "properties": {}}},
    ],
    "metadata": {"user_id": '{"device_id":"abc","account_uuid":"","session_id":"s-1"}'},
    "max_tokens": 32000,
    "thinking": {"type": "enabled", "budget_tokens": 31999, "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "medium"},
    "stream": True,
}  # fmt: skip


def test_a_claude_code_turn_is_served(server: ServerThread) -> None:
    """System turns, the billing block, thinking display, context_management, deferred tools
    and 2020-12 schemas are all accepted; the prompt keeps the system turn in place."""
    headers = {
        "anthropic-version": "2023-06-01",
        "x-claude-code-session-id": "s-1",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    body = {**CLAUDE_CODE_TURN, "model": "echo-tools"}
    r = post(server, "/v1/messages?beta=true", body, headers=headers)
    assert r.status_code == 200, r.text
    events = sse_json(r.text)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == "# Environment\n - Platform: linux"  # the echo: the last turn, in place


def test_the_billing_block_is_not_in_the_prompt(server: ServerThread) -> None:
    body = {k: v for k, v in CLAUDE_CODE_TURN.items() if k not in ("stream", "tools")}
    count = post(server, "/v1/messages/count_tokens", body).json()["input_tokens"]
    without = {**body, "system": body["system"][1:]}
    assert post(server, "/v1/messages/count_tokens", without).json()["input_tokens"] == count
    as_text = {
        **body,
        "system": "x-anthropic-billing-header: cc_version=2; cch=99;\nYou are a coding agent.",
    }
    assert post(server, "/v1/messages/count_tokens", as_text).json()["input_tokens"] == count


def test_a_context_overflow_is_worded_as_anthropic_words_it(server: ServerThread) -> None:
    """Claude Code parses this sentence and retries with a smaller ``max_tokens``."""
    body = {"model": "m", "max_tokens": 128000, "messages": HI}
    r = post(server, "/v1/messages", body)
    _anthropic_error(r, 400, "invalid_request_error")
    found = re.search(
        r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)",
        r.json()["error"]["message"],
    )
    assert found is not None and int(found[2]) == 128000 and int(found[3]) == 4096
    chat = post(server, "/v1/chat/completions", {**body, "messages": HI})
    assert "maximum context length" in chat.json()["error"]["message"]  # OpenAI's words there


def test_a_client_leaving_a_stream_frees_its_sequence() -> None:
    """A Messages stream whose client leaves mid-answer: the generation is cancelled and the
    model's sequence goes back to the queue at once."""
    slow = {"token_delay_s": 0.05, "reply": " ".join(["w"] * 200)}
    with ServerThread(scripted_config({"slow": slow})) as srv:
        body = {"model": "slow", "max_tokens": 500, "messages": HI, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/messages", json=body, timeout=10) as r:
            lines = r.iter_lines()
            while "content_block_delta" not in next(lines):
                pass  # generating
        record = scripted(srv.backend("slow")).record
        admission = srv.services.pool.resolve("slow").admission
        wait_for(lambda: admission.active == 0 and record.active == 0, what="the slot freed")
        assert len(record.cancelled) == 1 and record.tokens_generated < 200
