"""``/v1/messages`` on the real SmolLM2 over HTTP with the official ``anthropic`` SDK: create
and stream agree, forced tools validate (streamed ``input_json_delta``s accumulate in the
SDK), a ``tool_result`` round trip, ``count_tokens`` equals the request's prompt, prefill,
stop sequences, ``thinking``, errors in Anthropic's shape, and Claude Code's changing billing
line does not defeat the prefix cache.

The SDK no longer has sampling arguments; ``temperature`` goes in ``extra_body`` as older
clients send it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from anthropic.types import Message

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0}


def city_tool(name: str, description: str) -> dict[str, Any]:
    """A tool that takes one short ``city`` string."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    }
    return {"name": name, "description": description, "input_schema": schema}


WEATHER = city_tool("get_weather", "The current weather in a city.")
TIME = city_tool("get_time", "The local time in a city.")
SCHEMAS = {"get_weather": WEATHER["input_schema"], "get_time": TIME["input_schema"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    table = model_table(smol_path, kv_cache={"n_ctx_per_slot": 4096})
    with serve({SMOL: table}) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=server.base_url, api_key="t", max_retries=0, timeout=100
    ) as c:
        yield c


def create(client: anthropic.Anthropic, **kw: Any) -> Message:
    message: Message = client.messages.create(model=SMOL, **kw)
    return message


def stream(client: anthropic.Anthropic, **kw: Any) -> tuple[list[Any], Message]:
    with client.messages.stream(model=SMOL, **kw) as events:
        seen = list(events)
        return seen, events.get_final_message()


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def prompt_of(message: Message) -> int:
    return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


def test_create_and_stream_agree_at_temperature_0(client: anthropic.Anthropic) -> None:
    kw: Any = {"max_tokens": 24, "extra_body": GREEDY,
               "messages": [{"role": "user", "content": "Name a color."}]}  # fmt: skip
    body = create(client, **kw)
    events, final = stream(client, **kw)
    assert body.id.startswith("msg_") and body.type == "message" and body.role == "assistant"
    assert body.model == SMOL and body.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in body.content] == ["text"] == [b.type for b in final.content]
    assert text_of(body) and text_of(body) == text_of(final)
    assert body.stop_reason == final.stop_reason
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert body.usage.output_tokens == final.usage.output_tokens > 0
    assert prompt_of(body) == prompt_of(final)


def test_raw_events_are_exact(server: ServerThread) -> None:
    """Each event has its ``event:`` line matching its type; block indexes are consecutive."""
    body = {"model": SMOL, "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    r = httpx.post(server.base_url + "/v1/messages?beta=true", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for chunk in r.text.split("\n\n"):
        lines = [line for line in chunk.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        data = json.loads(lines[1].removeprefix("data: "))
        assert lines[0] == f"event: {data['type']}"
        events.append(data)
    assert events[0]["type"] == "message_start"
    assert events[0]["message"]["usage"]["input_tokens"] > 0
    indexes = [e["index"] for e in events if e["type"] == "content_block_start"]
    assert indexes == list(range(len(indexes)))
    assert events[-2]["type"] == "message_delta" and events[-1] == {"type": "message_stop"}


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_forced_tools_validate(client: anthropic.Anthropic, choice: dict[str, Any]) -> None:
    kw: Any = {"max_tokens": 200, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice}
    body = create(client, **kw)
    assert body.stop_reason == "tool_use"
    uses = [b for b in body.content if b.type == "tool_use"]
    assert uses and all(u.id.startswith("toolu_") for u in uses)
    if choice["type"] == "tool":
        assert [u.name for u in uses] == ["get_weather"]
    for use in uses:
        jsonschema.validate(use.input, SCHEMAS[use.name])
    events, final = stream(client, **kw)
    assert any(e.type == "input_json" for e in events)  # the SDK's accumulated deltas
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert streamed and final.stop_reason == "tool_use"
    for use in streamed:
        jsonschema.validate(use.input, SCHEMAS[use.name])


def test_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    forced: Any = {"type": "tool", "name": "get_weather"}
    first = create(client, max_tokens=200, messages=ASK, tools=[WEATHER], tool_choice=forced)
    use = next(b for b in first.content if b.type == "tool_use")
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C"}
    turns: Any = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [result]},
    ]
    second = create(client, max_tokens=40, tools=[WEATHER], messages=turns)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.content and prompt_of(second) > prompt_of(first)


def test_count_tokens_equals_the_requests_prompt(client: anthropic.Anthropic) -> None:
    kw: Any = {"model": SMOL, "system": "You are terse.", "messages": ASK, "tools": [WEATHER]}
    counted = client.messages.count_tokens(**kw)
    body = client.messages.create(**kw, max_tokens=4)
    assert counted.input_tokens == prompt_of(body) > 20


def test_prefill_is_continued(client: anthropic.Anthropic) -> None:
    turns: Any = [
        {"role": "user", "content": "Count from 1 to 9, separated by commas."},
        {"role": "assistant", "content": "1, 2, 3,"},
    ]
    body = create(client, max_tokens=12, messages=turns, extra_body=GREEDY)
    text = text_of(body)
    assert text and not text.lstrip().startswith("1")  # the continuation only
    assert "4" in text


def test_stop_sequence_is_named(client: anthropic.Anthropic) -> None:
    turns: Any = [{"role": "user", "content": "List three fruits separated by commas."}]
    body = create(
        client, max_tokens=40, messages=turns, stop_sequences=[",", "."], extra_body=GREEDY
    )
    if body.stop_reason == "stop_sequence":
        assert body.stop_sequence in (",", ".")
        assert body.stop_sequence not in text_of(body)
    else:  # the model may end its turn first
        assert body.stop_reason in ("end_turn", "max_tokens") and body.stop_sequence is None


@pytest.mark.parametrize(
    "thinking",
    [{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}, {"type": "adaptive"}],
)
def test_thinking_is_accepted(client: anthropic.Anthropic, thinking: dict[str, Any]) -> None:
    turns: Any = [{"role": "user", "content": "Hi"}]
    body = create(client, max_tokens=8, messages=turns, thinking=thinking)
    assert body.stop_reason in ("end_turn", "max_tokens")


def test_billing_line_does_not_defeat_the_prefix_cache(client: anthropic.Anthropic) -> None:
    """Claude Code's first system line changes every request; the second turn still reads
    at least 90% of the first turn's prompt from the KV cache."""
    rules = {"type": "text", "text": "You are a careful assistant. " * 40,
             "cache_control": {"type": "ephemeral"}}  # fmt: skip
    turns: Any = [{"role": "user", "content": "Say one word."}]

    def billed(cch: str) -> Any:
        line = f"x-anthropic-billing-header: cc_version=2.0.1; cch={cch};"
        return [{"type": "text", "text": line}, rules]

    first = create(client, max_tokens=4, system=billed("aaaa1111"), messages=turns)
    again = create(client, max_tokens=4, system=billed("bbbb2222"), messages=turns)
    assert (again.usage.cache_read_input_tokens or 0) >= 0.9 * prompt_of(first)


def test_models_list_parses_in_both_sdks(server: ServerThread, client: anthropic.Anthropic) -> None:
    from openai import OpenAI

    assert SMOL in [m.id for m in client.models.list()]
    with OpenAI(base_url=server.base_url + "/v1", api_key="t", max_retries=0) as oai:
        assert SMOL in [m.id for m in oai.models.list()]


@pytest.mark.parametrize(
    ("kw", "status", "kind"),
    [
        ({"model": "nope", "max_tokens": 4}, 404, "not_found_error"),
        ({"model": SMOL, "max_tokens": 4, "extra_body": {"temperature": 3}}, 400,
         "invalid_request_error"),
        ({"model": SMOL, "max_tokens": 100_000}, 400, "invalid_request_error"),  # the context
    ],
)  # fmt: skip
def test_errors_are_anthropics(
    client: anthropic.Anthropic, kw: dict[str, Any], status: int, kind: str
) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(messages=[{"role": "user", "content": "hi"}], **kw)
    assert info.value.status_code == status
    body: Any = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert body["error"]["message"]


def test_images_are_a_clean_400(client: anthropic.Anthropic) -> None:
    image = {"type": "image",
             "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}  # fmt: skip
    turns: Any = [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, max_tokens=4, messages=turns)
    assert "image" in info.value.message
