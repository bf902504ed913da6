"""The llama.cpp engine reports a long prompt's progress chunk by chunk (64-token prefill steps
on the session's SmolLM2 server), over real HTTP: from what the KV cache gave, up to the whole
prompt, before the first token; a repeated prompt starts from its cached prefix."""

from __future__ import annotations

import json
from itertools import pairwise

import httpx
import pytest

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PROMPT = "Read this list and answer briefly. " + " ".join(f"item {i} is red;" for i in range(80))


def progress_of(server: ServerThread) -> tuple[list[dict[str, float]], str]:
    body = {
        "model": SMOL, "stream": True, "return_progress": True, "max_tokens": 4,
        "temperature": 0, "messages": [{"role": "user", "content": PROMPT}],
    }  # fmt: skip
    seen: list[dict[str, float]] = []
    text: list[str] = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "prompt_progress" in chunk:
                assert not text, "progress comes before the answer"
                seen.append(chunk["prompt_progress"])
            for choice in chunk["choices"]:
                if content := choice["delta"].get("content"):
                    text.append(content)
    return seen, "".join(text)


def test_a_long_prompt_reports_each_chunk(smol_server: ServerThread) -> None:
    first, _ = progress_of(smol_server)
    total = first[0]["total"]
    assert total > 400 and first[0]["cache"] == first[0]["processed"]
    processed = [p["processed"] for p in first]
    assert processed[-1] == total and processed == sorted(processed)
    steps = [b - a for a, b in pairwise(processed)]
    assert max(steps) <= 64 and len(first) >= (total - first[0]["cache"]) // 64
    times = [p["time_ms"] for p in first]
    assert times == sorted(times)
    again, _ = progress_of(smol_server)
    assert again[0]["cache"] >= total - 1 and again[0]["processed"] == again[0]["cache"]
    assert again[-1]["processed"] == total and len(again) <= 2
