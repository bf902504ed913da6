"""The access log: one JSON line per request, whatever its outcome, never a key or a prompt."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing import ServerThread
from tests.plugins.helpers import SLOW_REPLY, chat, config, post, sha256, wait_for

KEY = "sk-access-log-secret-0000"
PROMPT = "a very private question"


def gateway(tmp_path: Path | None = None) -> ServerThread:
    access: dict[str, Any] = {"path": str(tmp_path / "logs" / "access.jsonl")} if tmp_path else {}
    cfg = config(
        {
            "m": {"aliases": ["m-alias"], "reply": "one two three", "token_delay_s": 0.005},
            "slow": {"reply": SLOW_REPLY, "token_delay_s": 0.02},
        },
        plugins={
            "api_keys": {"keys": [{"name": "alice", "sha256": sha256(KEY)}]},
            "access_log": access,
        },
    )
    return ServerThread(cfg)


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


def private_chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {**chat(model, **extra), "messages": [{"role": "user", "content": PROMPT}]}


def test_one_json_line_per_request_with_its_facts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"), gateway() as server:
        ok = post(server, private_chat("m-alias"), key=KEY)
        streamed = post(server, private_chat("m", stream=True), key=KEY)
        unauthorized = post(server, private_chat(), key="sk-wrong")
        missing = post(server, private_chat("nope"), key=KEY)
        wait_for(lambda: len(lines(caplog)) == 4)
    assert [r.status_code for r in (ok, streamed, unauthorized, missing)] == [200, 200, 401, 404]
    first, stream, denied, unknown = lines(caplog)

    assert first["request_id"] == ok.headers["x-request-id"]
    assert first["key"] == "alice"
    assert first["model"] == "m"
    assert first["requested_model"] == "m-alias"
    assert first["status"] == 200
    assert first["outcome"] == "completed"
    assert first["stream"] is False
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        ok.json()["usage"]["prompt_tokens"],
        3,
    )
    assert 0 < first["ttft_s"] <= first["duration_s"]
    assert 0 <= first["queue_wait_s"] < first["ttft_s"]  # admitted before its first token
    assert first["client"] == "127.0.0.1"
    assert first["path"] == "/v1/chat/completions"
    assert first["error"] is None

    assert stream["request_id"] == streamed.headers["x-request-id"]
    assert stream["stream"] is True
    assert stream["outcome"] == "completed"

    assert denied["status"] == 401
    assert denied["key"] is None
    assert denied["model"] is None
    assert denied["outcome"] == "failed"
    assert denied["error"] == "invalid_api_key"
    assert denied["ttft_s"] is None

    assert unknown["status"] == 404
    assert unknown["error"] == "model_not_found"
    assert unknown["key"] == "alice"

    text = caplog.text
    assert KEY not in text
    assert "sk-wrong" not in text
    assert PROMPT not in text
    assert "one two three" not in text


def test_a_client_leaving_is_logged_as_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"), gateway() as server:
        url = server.base_url + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", url, json=chat("slow", stream=True), headers=headers) as r:
            events = r.iter_lines()
            for _ in range(3):
                next(events)
        wait_for(lambda: len(lines(caplog)) == 1)
    (line,) = lines(caplog)
    assert line["outcome"] == "cancelled"
    assert line["model"] == "slow"
    assert 1 <= line["completion_tokens"] < 60  # what was generated before the client left


def test_lines_also_go_to_a_file_as_bare_json(tmp_path: Path) -> None:
    with gateway(tmp_path) as server:
        for _ in range(3):
            assert post(server, chat("m"), key=KEY).status_code == 200
        path = tmp_path / "logs" / "access.jsonl"
        wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 200, 200]
    assert len({r["request_id"] for r in records}) == 3
    # the handler is gone after shutdown: nothing more is written
    assert not any(
        isinstance(h, logging.FileHandler) for h in logging.getLogger("gateway.access").handlers
    )
