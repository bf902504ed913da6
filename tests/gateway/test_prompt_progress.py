"""``return_progress`` (llama-server's): a streaming request that asks gets the prompt's
progress while it is read, in its wire API's shape: a chat or completion chunk with no choice
and ``prompt_progress``, a ``response.prompt_progress`` event; the openai SDK reads the rest of
the stream as before; a request that does not ask, or does not stream, gets none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.gateway.helpers import scripted_config, sse_events

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config({"m": {"reply": "one two three", "prefill_delay_s": 0.05}})
    with ServerThread(config) as srv:
        yield srv


def chunks(server: ServerThread, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = httpx.post(server.base_url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": True}


def test_chat_chunks_carry_the_prompts_progress_before_the_answer(server: ServerThread) -> None:
    seen = chunks(server, "/v1/chat/completions", {**CHAT, "return_progress": True})
    progress = [c["prompt_progress"] for c in seen if "prompt_progress" in c]
    assert len(progress) == 2 and all(c["choices"] == [] for c in seen if "prompt_progress" in c)
    total = progress[0]["total"]
    assert total > 0 and [p["processed"] for p in progress] == [total // 2, total]
    assert set(progress[0]) == {"total", "cache", "processed", "time_ms"}
    first_text = next(
        i for i, c in enumerate(seen) if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    assert first_text > max(i for i, c in enumerate(seen) if "prompt_progress" in c)


def test_no_progress_unless_asked_or_without_streaming(server: ServerThread) -> None:
    assert not any("prompt_progress" in c for c in chunks(server, "/v1/chat/completions", CHAT))
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={**CHAT, "stream": False, "return_progress": True},
    )
    assert r.status_code == 200 and "prompt_progress" not in r.text


def test_completions_report_it_once_per_prompt(server: ServerThread) -> None:
    body = {"model": "m", "prompt": "say it", "stream": True, "n": 2, "return_progress": True}
    progress = [c for c in chunks(server, "/v1/completions", body) if "prompt_progress" in c]
    assert len(progress) == 2  # two steps of one prompt, not one per choice


def test_responses_events_and_the_sdk_reads_past_them(server: ServerThread) -> None:
    client = OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    events = list(
        client.responses.create(
            model="m", input="hello", stream=True, extra_body={"return_progress": True}
        )
    )
    kinds: list[str] = [e.type for e in events]
    assert kinds.count("response.prompt_progress") == 2
    assert kinds.index("response.prompt_progress") < kinds.index("response.output_text.delta")
    assert kinds[-1] == "response.completed"
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    done = events[-1]
    assert done.type == "response.completed" and done.response.output_text == "one two three"
