"""The ``openai`` backend against real gateways on loopback (scripted backend upstream).

Two upstream gateways, A and B, serve models of the same names with different behaviour;
one front gateway serves models of the ``openai`` backend over them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.backends.openai.fleet import (
    chat,
    fleet,
    free_port,
    front_config,
    scripted_upstream,
    sse_payloads,
    wait_for,
)
from tests.gateway.helpers import scripted
from tests.support import openai_client

SLOW = {"reply": " ".join(f"w{i}" for i in range(200)), "token_delay_s": 0.05}


def upstream(name: str) -> dict[str, dict[str, Any]]:
    flaky_a = name == "a"
    return {
        "m": {"reply": "one two three four", "context_length": 64},
        "who": {"reply": f"replica-{name}"},
        "slow": SLOW,
        "stall": {"reply": "x y z", "token_delay_s": 1.0},
        # A fails before its first token (HTTP 500); B works
        "flaky": {"fail_after_tokens": 0} if flaky_a else {"reply": "fine"},
        "broken": {"reply": "a b c d e", "fail_after_tokens": 2},
        # A takes 3 s to its first token; B answers at once
        "late": {"reply": "on time", "prefill_delay_s": 3.0 if flaky_a else 0.0},
    }


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[ServerThread, ServerThread]]:
    with (
        ServerThread(scripted_upstream(upstream("a"))) as a,
        ServerThread(scripted_upstream(upstream("b"))) as b,
    ):
        yield a, b


HEALTH = {"path": "/ready", "interval_s": 1.0}


@pytest.fixture(scope="module")
def front(replicas: tuple[ServerThread, ServerThread]) -> Iterator[ServerThread]:
    a, b = replicas
    both = [{"url": a.base_url}, {"url": b.base_url}]
    dead = [{"url": f"http://127.0.0.1:{free_port()}"}]

    def model(upstream_model: str, **extra: Any) -> dict[str, Any]:
        return {"replicas": both, "upstream_model": upstream_model, "health": HEALTH, **extra}

    config = front_config(
        {
            "f": model("m", aliases=["f-alias"]),
            "rr": model("who", balancing="round_robin", context_length=4096),
            "lo": model("who", context_length=4096),
            "aff": model("who", balancing="affinity", context_length=4096),
            "slow": model("slow", replicas=both[:1]),
            "stall": model("stall", timeouts={"first_byte_s": 5, "between_chunks_s": 0.3}),
            "flaky": model(
                "flaky", balancing="round_robin", health={**HEALTH, "eject_after_failures": 2}
            ),
            "broken": model("broken"),
            "late": model("late", balancing="round_robin", timeouts={"first_byte_s": 0.5}),
            "down": {"replicas": dead, "context_length": 4096, "health": HEALTH},
            "down-fb": {
                "replicas": dead,
                "context_length": 4096,
                "health": HEALTH,
                "fallback_model": "local",
            },
        },
        local={"local": {"reply": "served locally"}},
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def client(front: ServerThread) -> OpenAI:
    return openai_client(front.base_url, api_key="unused")


def post(
    front: ServerThread, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> httpx.Response:
    return httpx.post(front.base_url + path, json=body, timeout=30)


def started(*servers: ServerThread, model: str) -> int:
    return sum(len(scripted(s.backend(model)).record.started) for s in servers)


# -- passthrough -----------------------------------------------------------------------------


def test_chat_stream_and_non_stream_relabel_the_model(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="f-alias", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.model == "f-alias" and r.choices[0].message.content == "one two three four"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 4)
    chunks = list(
        client.chat.completions.create(
            model="f",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.model for c in chunks} == {"f"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_usage_reaches_the_client_only_if_asked(front: ServerThread) -> None:
    events = sse_payloads(post(front, chat("f", stream=True)).text)
    assert events[-1] == "[DONE]" and not any('"usage"' in e for e in events)


def test_text_completion_with_max_tokens_and_stop_passed_upstream(front: ServerThread) -> None:
    r = post(front, {"model": "f", "prompt": "say", "max_tokens": 3}, "/v1/completions").json()
    assert r["choices"][0] == {
        "index": 0,
        "text": "one two three",
        "logprobs": None,
        "finish_reason": "length",
    }
    r = post(front, chat("f", stop=[" three"])).json()
    assert r["choices"][0]["message"]["content"] == "one two"


def test_n_choices_are_separate_upstream_requests(front: ServerThread) -> None:
    r = post(front, chat("rr", n=2)).json()
    assert sorted(c["message"]["content"] for c in r["choices"]) == ["replica-a", "replica-b"]


def test_context_length_is_discovered_from_upstream_models(front: ServerThread) -> None:
    model = httpx.get(front.base_url + "/v1/models/f").json()
    assert model["max_model_len"] == 64


def test_models_list_what_the_fleet_serves(front: ServerThread) -> None:
    model = httpx.get(front.base_url + "/v1/models/f").json()
    caps = model["capabilities"]
    assert caps["context_length"] == 64 and caps["chat"] is True
    # what the table declares (nothing beyond chat and completions here)
    assert caps["tools"] is False and caps["embeddings"] is False
    assert caps["reasoning"] is None  # the replicas' to send or not


# -- errors before the first byte keep their status ------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_context_overflow_is_the_same_400(
    client: OpenAI, front: ServerThread, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="f", messages=[{"role": "user", "content": "word " * 100}], stream=stream
        )
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert "maximum context length is 64" in err.value.message
    assert all(r.failures == 0 and r.up for r in fleet(front, "f").replicas)


def test_max_tokens_beyond_the_context_is_refused_locally(front: ServerThread) -> None:
    r = post(front, chat("f", max_tokens=64))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("field", ["base_url", "api_base"])
def test_request_supplied_base_url_is_rejected_and_never_forwarded(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread], field: str
) -> None:
    before = started(*replicas, model="m")
    r = post(front, chat("f", **{field: "http://169.254.169.254/latest"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert started(*replicas, model="m") == before


@pytest.mark.parametrize("stream", [False, True])
def test_every_replica_down_is_503_with_retry_after(front: ServerThread, stream: bool) -> None:
    r = post(front, chat("down", stream=stream))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "model_unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_every_replica_down_falls_back_to_another_model(front: ServerThread, stream: bool) -> None:
    r = post(front, chat("down-fb", stream=stream))
    assert r.status_code == 200
    if stream:
        events = [json.loads(e) for e in sse_payloads(r.text) if e != "[DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert events[0]["model"] == "down-fb"
    else:
        text = r.json()["choices"][0]["message"]["content"]
        assert r.json()["model"] == "down-fb"
    assert text == "served locally"
    assert front.services.pool.resolve("local").admission.active == 0


# -- retries, mid-stream failures, timeouts --------------------------------------------------


def test_failure_before_the_first_byte_is_retried_and_ejects(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread]
) -> None:
    a, _ = replicas
    for _ in range(4):
        r = post(front, chat("flaky", stream=True))
        assert r.status_code == 200 and '"content":"fine"' in r.text and "[DONE]" in r.text
    backend = fleet(front, "flaky")
    replica_a = backend.replica(a.base_url)
    assert backend.retries >= 1 and replica_a.failed == backend.retries
    assert replica_a.ejections == 1  # two consecutive failures
    assert len(scripted(a.backend("flaky")).record.failed) == replica_a.failed


def test_failure_after_the_first_byte_is_one_error_event(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread]
) -> None:
    before = started(*replicas, model="broken")
    r = post(front, chat("broken", stream=True))
    assert r.status_code == 200
    events = sse_payloads(r.text)
    text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "") for e in events if '"choices"' in e
    )
    assert text == "a b" and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    assert started(*replicas, model="broken") == before + 1  # not retried once text flowed


def test_silence_between_chunks_is_an_error_event_and_closes_upstream(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread]
) -> None:
    records = [scripted(s.backend("stall")).record for s in replicas]
    r = post(front, chat("stall", stream=True))
    events = sse_payloads(r.text)
    assert '"content":"x"' in r.text and "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_timeout" and "between_chunks_s=0.3" in error["message"]
    assert not any(s.base_url in error["message"] for s in replicas)  # addresses stay inside
    wait_for(lambda: sum(len(rec.cancelled) for rec in records) == 1, what="upstream cancelled")


def test_no_text_within_first_byte_s_moves_to_the_next_replica(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread]
) -> None:
    a, _ = replicas
    for _ in range(2):  # round-robin: one of the two starts on A
        r = post(front, chat("late"))
        assert r.json()["choices"][0]["message"]["content"] == "on time"
    assert fleet(front, "late").retries == 1
    wait_for(lambda: len(scripted(a.backend("late")).record.cancelled) == 1, what="A cancelled")


def test_client_disconnect_closes_the_upstream_stream(
    front: ServerThread, replicas: tuple[ServerThread, ServerThread]
) -> None:
    a, _ = replicas
    record = scripted(a.backend("slow")).record
    backend = fleet(front, "slow")
    with httpx.stream(
        "POST", front.base_url + "/v1/chat/completions", json=chat("slow", stream=True)
    ) as r:
        for line in r.iter_lines():
            if '"content":" w1"' in line:
                break
    wait_for(lambda: len(record.cancelled) == 1, what="upstream saw the disconnect")
    assert record.tokens_generated < 50  # of 200: it stopped, not ran to the end
    wait_for(lambda: a.services.pool.resolve("slow").admission.active == 0)
    assert backend.cancelled == 1 and backend.replicas[0].outstanding == 0
    assert backend.replicas[0].failures == 0  # a client leaving is not the replica's fault


# -- balancing over HTTP ---------------------------------------------------------------------


def who(front: ServerThread, model: str, messages: list[dict[str, str]] | None = None) -> str:
    body = {"model": model, "messages": messages or [{"role": "user", "content": "hi"}]}
    content: str = post(front, body).json()["choices"][0]["message"]["content"]
    return content


def test_round_robin_alternates(front: ServerThread) -> None:
    assert sorted(who(front, "rr") for _ in range(4)) == ["replica-a"] * 2 + ["replica-b"] * 2


def test_least_outstanding_spreads_sequential_requests(front: ServerThread) -> None:
    assert {who(front, "lo") for _ in range(4)} == {"replica-a", "replica-b"}


def test_affinity_keeps_each_conversation_on_one_replica(front: ServerThread) -> None:
    homes: dict[int, set[str]] = {}
    for i in range(16):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}]
        for turn in range(3):
            replica = who(front, "aff", messages)
            homes.setdefault(i, set()).add(replica)
            messages += [
                {"role": "assistant", "content": replica},
                {"role": "user", "content": f"t{turn}"},
            ]
    assert all(len(h) == 1 for h in homes.values())
    assert {h for hs in homes.values() for h in hs} == {"replica-a", "replica-b"}


def test_affinity_keeps_a_responses_chain_on_one_replica(front: ServerThread) -> None:
    """Turn one sends instructions, later turns do not (they are not carried over): the
    messages change, yet the chain of ``previous_response_id`` stays on its replica."""
    homes: dict[int, set[str]] = {}
    with OpenAI(base_url=front.base_url + "/v1", api_key="x", max_retries=0) as c:
        for i in range(12):
            r = c.responses.create(model="aff", input=f"q{i}", instructions="be brief")
            homes[i] = {r.output_text}
            for turn in range(3):
                r = c.responses.create(model="aff", input=f"t{turn}", previous_response_id=r.id)
                homes[i].add(r.output_text)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert {h for hs in homes.values() for h in hs} == {"replica-a", "replica-b"}


# -- API keys from the environment -----------------------------------------------------------


def test_per_replica_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-key"
    keyed = parse_config(
        {
            "models": {"m": {"backend": "scripted", "reply": "authorized"}},
            "plugins": {
                "api_keys": {
                    "keys": [
                        {"name": "front", "sha256": hashlib.sha256(secret.encode()).hexdigest()}
                    ]
                }
            },
        },
        "<keyed upstream>",
    )
    monkeypatch.setenv("REPLICA_KEY", secret)
    monkeypatch.setenv("WRONG_KEY", "not-it")
    with ServerThread(keyed) as up:
        table = {
            "upstream_model": "m",
            "context_length": 4096,
            "health": {**HEALTH, "path": "/health"},
        }
        config = front_config(
            {
                "good": {"replicas": [{"url": up.base_url, "api_key_env": "REPLICA_KEY"}], **table},
                "bad": {"replicas": [{"url": up.base_url, "api_key_env": "WRONG_KEY"}], **table},
            }
        )
        with ServerThread(config) as front:
            assert (
                post(front, chat("good")).json()["choices"][0]["message"]["content"] == "authorized"
            )
            r = post(front, chat("bad"))
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            assert "401" in r.json()["error"]["message"]


# -- more failure paths ----------------------------------------------------------------------


def test_total_time_limit_ends_a_flowing_stream(
    replicas: tuple[ServerThread, ServerThread],
) -> None:
    a, _ = replicas
    timeouts = {"first_byte_s": 5, "between_chunks_s": 5, "total_s": 1.5}
    table = {"replicas": [{"url": a.base_url}], "upstream_model": "stall", "timeouts": timeouts}
    with ServerThread(front_config({"t": {**table, "health": HEALTH}})) as srv:
        events = sse_payloads(post(srv, chat("t", stream=True)).text)
    assert '"content":"x"' in events[1] and "total_s=1.5" in events[-1]


def test_every_replica_busy_is_503_with_retry_after() -> None:
    busy = {
        "busy": {
            "reply": SLOW["reply"],
            "token_delay_s": 0.05,
            "batching": {"max_concurrent": 1, "max_queue": 0},
        }
    }
    with ServerThread(scripted_upstream(busy)) as a, ServerThread(scripted_upstream(busy)) as b:
        table = {"replicas": [{"url": a.base_url}, {"url": b.base_url}], "upstream_model": "busy"}
        with ServerThread(front_config({"f": {**table, "health": HEALTH}})) as srv:
            holds = [
                httpx.stream(
                    "POST", s.base_url + "/v1/chat/completions", json=chat("busy", stream=True)
                )
                for s in (a, b)
            ]
            for hold in holds:
                hold.__enter__()
            try:
                wait_for(
                    lambda: all(
                        s.services.pool.resolve("busy").admission.active == 1 for s in (a, b)
                    )
                )
                r = post(srv, chat("f"))
            finally:
                for hold in holds:
                    hold.__exit__(None, None, None)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
            assert fleet(srv, "f").retries == 2


async def test_start_refuses_a_missing_key_variable_and_bad_fallbacks() -> None:
    from backends.openai.backend import FleetConfigError, OpenAIBackend
    from backends.openai.config import OpenAIConfig
    from gateway.pool import ModelPool

    replica = {"url": f"http://127.0.0.1:{free_port()}"}
    keyed = OpenAIConfig.model_validate(
        {"replicas": [{**replica, "api_key_env": "NO_SUCH_VARIABLE_XYZ"}]}
    )
    with pytest.raises(
        FleetConfigError, match=r"replicas\[0\]\.api_key_env: environment variable NO_SUCH"
    ):
        await OpenAIBackend("k", keyed).start()
    config = front_config(
        {
            "a": {"replicas": [replica], "fallback_model": "b"},
            "b": {"replicas": [replica], "fallback_model": "a"},
            "c": {"replicas": [replica], "fallback_model": "nowhere"},
        }
    )
    pool = ModelPool(config)
    for name, problem in [("a", r"a loop \(a -> b -> a\)"), ("c", "no model 'nowhere'")]:
        backend = OpenAIBackend(name, config.models[name])  # type: ignore[arg-type]
        backend.bind_router(pool)
        with pytest.raises(FleetConfigError, match=problem):
            await backend.start()
