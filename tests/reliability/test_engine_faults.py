"""Engine faults: a backend that raises mid-stream ends the stream with one error event and
frees its slot; a model file that is missing, truncated or not GGUF stops ``gateway serve``
at startup with a message naming the file and a non-zero exit code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.gateway.helpers import scripted, scripted_config, sse_events
from tests.reliability.helpers import (
    NO_EOS,
    chat,
    default_model_path,
    gateway_process,
    needs_llamacpp,
    real_model_table,
    wait_for,
)

CHAT = "/v1/chat/completions"


# --- mid-stream faults --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = scripted_config(
        {
            "broken": {
                "reply": " ".join(f"w{i}" for i in range(50)),
                "token_delay_s": 0.005,
                "fail_after_tokens": 5,
                "batching": {"max_concurrent": 4},
            }
        }
    )
    with ServerThread(config) as srv:
        yield srv


def _errors(events: list[str]) -> list[dict[str, Any]]:
    return [json.loads(e) for e in events if e.startswith('{"error"')]


@pytest.mark.parametrize("n", [1, 3])
def test_fault_mid_stream_is_one_error_event_and_frees_every_slot(
    server: ServerThread, n: int
) -> None:
    backend = scripted(server.backend("broken"))
    failed = len(backend.record.failed)
    r = httpx.post(server.base_url + CHAT, json=chat("broken", n=n), timeout=10)
    assert r.status_code == 200
    events = sse_events(r.text)
    errors = _errors(events)
    assert len(errors) == 1 and events[-1].startswith('{"error"'), events[-3:]
    assert "[DONE]" not in events
    assert errors[0]["error"]["code"] == "engine_error"
    adm = server.services.pool.resolve("broken").admission
    wait_for(lambda: adm.active == 0 and backend.record.active == 0, 5)
    # every choice failed on its own or was stopped when the first one failed
    rec = backend.record
    assert len(rec.failed) >= failed + 1
    assert len(rec.started) == len(rec.finished) + len(rec.cancelled) + len(rec.failed)


def test_fault_without_streaming_is_a_500_and_frees_the_slot(server: ServerThread) -> None:
    r = httpx.post(server.base_url + CHAT, json=chat("broken", stream=False, n=2), timeout=10)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    adm = server.services.pool.resolve("broken").admission
    wait_for(lambda: adm.active == 0 and scripted(server.backend("broken")).record.active == 0)


FAULTY = "smol-faulty"


@needs_llamacpp
@pytest.mark.slow
def test_real_engine_fault_mid_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The llama.cpp engine thread raising while sampling: the running stream gets one error
    event, the slot is released, /ready reports the dead engine, and the next request reloads
    the model instead of hanging or failing."""
    from backends.llamacpp.engine import Engine

    real_verify = Engine._verify
    calls = 0

    def failing_verify(self: Engine, row: Any) -> Any:
        nonlocal calls
        if self.name != FAULTY:  # an engine another test left behind is not this one
            return real_verify(self, row)
        calls += 1
        if calls == 6:
            raise RuntimeError("injected fault in the engine thread")
        return real_verify(self, row)

    monkeypatch.setattr(Engine, "_verify", failing_verify)
    config = parse_config({"models": {FAULTY: real_model_table()}}, "<faults>")
    with ServerThread(config) as srv:
        r = httpx.post(srv.base_url + CHAT, json=chat(FAULTY, max_tokens=50, **NO_EOS), timeout=30)
        assert r.status_code == 200
        events = sse_events(r.text)
        errors = _errors(events)
        assert len(errors) == 1 and events[-1].startswith('{"error"'), events[-3:]
        message = errors[0]["error"]["message"]  # the fault's text is the log's (issue 23 #11)
        assert "engine failed" in message and "injected fault" not in message
        admin = httpx.get(srv.base_url + "/admin/models").json()
        assert "injected fault" in json.dumps(admin)  # the operator sees it
        adm = srv.services.pool.resolve(FAULTY).admission
        wait_for(lambda: adm.active == 0, 5)
        # the dead engine is visible: not ready, the model's state is "failed"
        assert httpx.get(srv.base_url + "/ready").status_code == 503
        models = httpx.get(srv.base_url + "/v1/models").json()["data"]
        assert {m["id"]: m["state"] for m in models}[FAULTY] == "failed"
        # the next request reloads the model and is served
        later = httpx.post(srv.base_url + CHAT, json=chat(FAULTY, max_tokens=2), timeout=60)
        assert later.status_code == 200, later.text
        assert srv.services.pool.resolve(FAULTY).loads == 2
        assert httpx.get(srv.base_url + "/ready").status_code == 200
        assert adm.active == 0


# --- bad model files at startup -----------------------------------------------------------------


def _model_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    real = default_model_path().read_bytes() if kind.startswith("truncated") else b""
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-gguf":
        path.write_text("this is not a model\n" * 100)
    elif kind == "truncated-header":
        path.write_bytes(real[:200])
    elif kind == "truncated-data":
        path.write_bytes(real[: len(real) // 3])
    elif kind == "directory":
        path.mkdir()
    return path


@needs_llamacpp
@pytest.mark.parametrize(
    "kind", ["missing", "empty", "not-gguf", "truncated-header", "truncated-data", "directory"]
)
def test_bad_model_file_fails_startup_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _model_file(tmp_path, kind)
    table = {"backend": "llamacpp", "model_path": str(path), "batching": {"n_threads": 1}}
    gw = gateway_process(tmp_path, "gateway", {"models": {"x": table}}).start(wait="no")
    code = gw.wait(timeout=30)
    log = gw.log()
    assert code != 0, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and str(path) in errors[0], log
    assert "Traceback" not in log, log


def test_backend_failing_to_start_exits_non_zero(tmp_path: Path) -> None:
    config = {"models": {"x": {"backend": "scripted", "fail_on_start": True}}}
    gw = gateway_process(tmp_path, "gateway", config).start(wait="no")
    assert gw.wait(timeout=30) == 1
    assert "error: model 'x' failed to load" in gw.log()
