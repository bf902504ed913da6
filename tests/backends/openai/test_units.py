"""The backend's own logic: config rules, balancing, replica state, SSE and error mapping."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from backends.openai import OpenAIBackend
from backends.openai.balance import (
    Affinity,
    LeastOutstanding,
    RoundRobin,
    rendezvous_order,
)
from backends.openai.client import request_body
from backends.openai.config import AffinityConfig, OpenAIConfig
from backends.openai.errors import ReplicaFailed, UpstreamError, stream_error, upstream_error
from backends.openai.replicas import Replica
from backends.openai.stream import ChunkDecoder, sse_data
from gateway.affinity import affinity_key
from gateway.capabilities import model_capabilities
from gateway.config import parse_config
from gateway.errors import (
    ConfigError,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
)
from gateway.types import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    ToolCallDelta,
    Usage,
)


def replicas(*weights: float) -> list[Replica]:
    out = [
        Replica(f"http://r{i}:8000", w, eject_after=3, readmit_after=2)
        for i, w in enumerate(weights)
    ]
    for r in out:
        r.probed(True)
    return out


def conversation(i: int, turns: int = 1) -> GenerationRequest:
    msgs = [ChatMessage("system", "be brief"), ChatMessage("user", f"question {i}")]
    for t in range(1, turns):
        msgs += [ChatMessage("assistant", f"answer {t}"), ChatMessage("user", f"follow-up {t}")]
    return GenerationRequest(request_id=f"r{i}-{turns}", messages=tuple(msgs))


# -- config ----------------------------------------------------------------------------------


def model_table(**table: object) -> dict[str, object]:
    return {"models": {"f": {"backend": "openai", "replicas": [{"url": "http://a:1"}], **table}}}


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"replicas": []}, "models.f.replicas"),
        ({"replicas": [{"url": "ftp://a"}]}, "models.f.replicas.0.url"),
        ({"replicas": [{"url": "http://user:pw@a:1"}]}, "credentials may not be in the URL"),
        ({"replicas": [{"url": "http://a:1?x=1"}]}, "query"),
        ({"replicas": [{"url": "http://a:1"}, {"url": "http://a:1/"}]}, "each url may appear once"),
        ({"replicas": [{"url": "http://a:1", "api_key": "sk-x"}]}, "replicas.0.api_key"),
        ({"replicas": [{"url": "http://a:1", "weight": 0}]}, "weight"),
        ({"balancing": "random"}, "models.f.balancing"),
        ({"pool": {"max_connections": 2}}, "at least batching.max_concurrent"),
        ({"health": {"path": "health"}}, "models.f.health.path"),
        ({"affinity": {"load_factor": 0.5}}, "load_factor"),
        ({"timeouts": {"first_byte": 3}}, "models.f.timeouts.first_byte"),
    ],
)
def test_config_problems_name_their_key(table: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(model_table(**table), "<t>")
    assert problem in str(err.value)


def test_config_defaults_are_explicit() -> None:
    cfg = parse_config(model_table(), "<t>").models["f"]
    assert cfg.balancing == "least_outstanding"  # type: ignore[attr-defined]
    assert cfg.max_connections == cfg.batching.max_concurrent == 64  # type: ignore[attr-defined]
    assert cfg.replicas[0].url == "http://a:1"  # type: ignore[attr-defined]


def test_before_its_start_the_fleet_is_described_from_its_config() -> None:
    """``/v1/models`` lists an unstarted fleet (no replica asked) by what its table says."""

    def unstarted(**table: object) -> OpenAIBackend:
        cfg = parse_config(model_table(**table), "<t>").models["f"]
        assert isinstance(cfg, OpenAIConfig)
        return OpenAIBackend("f", cfg)

    listed = model_capabilities(unstarted(capabilities=["tools"], context_length=512), loaded=False)
    assert (listed.chat, listed.tools, listed.structured_output, listed.embeddings) == (
        True,
        True,
        False,
        False,
    )
    # the replicas may send reasoning or not; the context is theirs unless the table sets it
    assert listed.reasoning is None and listed.context_length == 512
    unsized = model_capabilities(unstarted(), loaded=False)
    assert unsized.context_length is None and unsized.tools is False


# -- balancing -------------------------------------------------------------------------------


def test_least_outstanding_honours_weights_and_shares_ties() -> None:
    a, b = replicas(1, 3)
    lo = LeastOutstanding()
    req = conversation(0)
    picks: Counter[str] = Counter()
    for _ in range(8):  # held requests: b takes 3 per 1 of a
        r = lo.pick([a, b], req)
        r.outstanding += 1
        picks[r.url] += 1
    assert picks == {a.url: 2, b.url: 6}
    a.outstanding = b.outstanding = 0
    c, d = replicas(1, 1)
    assert {lo.pick([c, d], req).url for _ in range(4)} == {c.url, d.url}  # idle: both used


def test_round_robin_is_smooth_and_weighted() -> None:
    a, b, c = replicas(5, 1, 1)
    rr = RoundRobin()
    seq = [rr.pick([a, b, c], conversation(0)).url[7:9] for _ in range(7)]
    assert seq == ["r0", "r0", "r1", "r0", "r2", "r0", "r0"]


def test_affinity_key_is_stable_across_turns_and_differs_between_conversations() -> None:
    keys = {affinity_key(conversation(1, turns), 256) for turns in (1, 2, 5)}
    assert len(keys) == 1
    assert affinity_key(conversation(2), 256) not in keys
    text = GenerationRequest(request_id="t", prompt="x" * 300)
    assert affinity_key(text, 256) == b"x" * 256


def test_rendezvous_spreads_by_weight_and_moves_only_the_removed_replicas_keys() -> None:
    rs = replicas(1, 1, 2)
    keys = [f"conversation {i}".encode() for i in range(4000)]
    first = {k: rendezvous_order(k, rs)[0] for k in keys}
    share = Counter(r.url for r in first.values())
    assert 800 < share[rs[0].url] < 1200 and 1800 < share[rs[2].url] < 2200
    without = [rs[0], rs[2]]
    for k in keys:
        if first[k] is not rs[1]:
            assert rendezvous_order(k, without)[0] is first[k]


def test_affinity_keeps_a_conversation_on_one_replica() -> None:
    rs = replicas(1, 1, 1)
    aff = Affinity(AffinityConfig())
    for i in range(20):
        homes = {aff.pick(rs, conversation(i, turns)).url for turns in range(1, 6)}
        assert len(homes) == 1


def test_affinity_bounded_load_overflows_to_the_next_replica_in_key_order() -> None:
    rs = replicas(1, 1)
    aff = Affinity(AffinityConfig(load_factor=1.25))
    req = conversation(7)
    home, second = rendezvous_order(affinity_key(req, 256), rs)
    placed: Counter[str] = Counter()
    for _ in range(8):  # the same hot conversation, requests held open
        r = aff.pick(rs, req)
        r.outstanding += 1
        placed[r.url] += 1
    assert placed[home.url] > placed[second.url] > 0
    assert placed[home.url] <= 5  # ceil(1.25 * 8 / 2)


# -- replica state ---------------------------------------------------------------------------


def test_ejection_after_consecutive_failures_and_readmission_by_probes() -> None:
    (r,) = replicas(1)
    r.request_failed("boom")
    r.request_failed("boom")
    r.request_succeeded()  # resets the streak
    r.request_failed("boom")
    r.probed(False, "refused")
    assert r.up
    r.request_failed("boom")
    assert not r.up and r.ejections == 1 and "boom" in r.reason
    r.probed(True)
    r.probed(False, "refused")  # the streak of good probes starts over
    r.probed(True)
    assert not r.up
    r.probed(True)
    assert r.up and r.readmissions == 1 and r.failures == 0


def test_first_probe_decides_the_initial_state() -> None:
    down = Replica("http://x:1", 1, eject_after=3, readmit_after=2)
    assert not down.up
    down.probed(False, "connection refused")
    assert not down.up and "refused" in down.reason
    up = Replica("http://y:1", 1, eject_after=3, readmit_after=2)
    up.probed(True)
    assert up.up


# -- upstream request and stream -------------------------------------------------------------


def test_request_body_streams_with_usage_and_omits_neutral_samplers() -> None:
    req = GenerationRequest(
        request_id="r",
        messages=(ChatMessage("user", "hi", name="ann"),),
        sampling=SamplingParams(temperature=0.0, top_k=5, seed=3, logit_bias=((2, -100.0),)),
        max_tokens=7,
        stop=("\n",),
    )
    body = json.loads(request_body(req, "up"))
    assert body == {
        "model": "up",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        "temperature": 0.0,
        "top_k": 5,
        "seed": 3,
        "logit_bias": {"2": -100.0},
        "max_tokens": 7,
        "stop": ["\n"],
    }
    text = json.loads(request_body(GenerationRequest(request_id="t", prompt="p"), "up"))
    assert text["prompt"] == "p" and "messages" not in text and "top_p" not in text
    salted = GenerationRequest(request_id="s", prompt="p", cache_salt="key-a")
    assert json.loads(request_body(salted, "up"))["cache_salt"] == "key-a"  # vLLM's partition


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_data_skips_comments_and_joins_multiline_data() -> None:
    got = [
        d
        async for d in sse_data(
            lines(": ping", "", "data: a", "", "event: x", "data:b", "data: c", "", "data: [DONE]")
        )
    ]
    assert got == ["a", "b\nc", "[DONE]"]


def chunk(**fields: object) -> str:
    return json.dumps(fields)


def test_chunk_decoder_maps_text_finish_and_usage_with_cached_tokens() -> None:
    d = ChunkDecoder(chat=True)
    assert (
        d.feed(chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])) == []
    )
    assert d.feed(chunk(choices=[{"index": 0, "delta": {"content": "Hel"}}])) == [TextDelta("Hel")]
    assert d.feed(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}])) == []
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert d.feed(chunk(choices=[], usage=usage)) == []
    assert d.feed("[DONE]") == [] and d.done
    fin = d.finish()
    assert fin.reason == "length" and fin.usage == Usage(9, 1, 8)


def test_chunk_decoder_without_upstream_usage_counts_pieces() -> None:
    d = ChunkDecoder(chat=False)
    for t in ("a", "b", "c"):
        d.feed(chunk(choices=[{"index": 0, "text": t, "finish_reason": None}]))
    d.feed(chunk(choices=[{"index": 0, "text": "", "finish_reason": "content_filter"}]))
    assert d.finish().reason == "stop" and d.finish().usage == Usage(0, 3, 0)


def test_chunk_decoder_maps_tool_call_pieces() -> None:
    d = ChunkDecoder(chat=True)
    first = {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "f", "arguments": '{"x"'}}  # fmt: skip
    assert d.feed(chunk(choices=[{"index": 0, "delta": {"tool_calls": [first]}}])) == [
        ToolCallDelta(0, '{"x"', id="call_a", name="f", tokens=1)
    ]
    more = {"index": 0, "function": {"arguments": ": 1}"}}
    second = {"index": 3, "id": "call_b", "function": {"name": "g", "arguments": ""}}
    got = d.feed(chunk(choices=[{"index": 0, "delta": {"tool_calls": [more, second]}}]))
    assert got == [
        ToolCallDelta(0, ": 1}", tokens=1),
        ToolCallDelta(1, "", id="call_b", name="g", tokens=1),
    ]
    d.feed(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    assert d.finish().reason == "tool_calls"


def test_chunk_decoder_raises_on_error_events_and_garbage() -> None:
    d = ChunkDecoder(chat=True)
    bad = {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    with pytest.raises(ContextLengthExceeded):
        d.feed(json.dumps(bad))
    with pytest.raises(ReplicaFailed):
        d.feed(json.dumps({"error": {"message": "oom", "type": "server_error"}}))
    with pytest.raises(ReplicaFailed):
        d.feed("{not json")


def error_body(code: str | None, message: str = "m", param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "x", "param": param, "code": code}}
    ).encode()


def test_upstream_client_errors_keep_status_code_and_param() -> None:
    err = upstream_error(400, error_body("context_length_exceeded", "too long", "messages"))
    assert isinstance(err, ContextLengthExceeded)
    assert (err.status, err.message, err.param, err.code) == (
        400,
        "too long",
        "messages",
        "context_length_exceeded",
    )
    other = upstream_error(422, b'{"detail": [{"loc": ["body"], "msg": "bad"}]}')
    assert type(other) is InvalidRequest and "bad" in other.message
    assert isinstance(upstream_error(413, b"too big"), PayloadTooLarge)


@pytest.mark.parametrize("status", [401, 403, 404, 405, 500, 502, 503, 429])
def test_replica_faults_mean_try_the_next_replica(status: int) -> None:
    err = upstream_error(status, b"<html>nope</html>", retry_after="7")
    assert isinstance(err, ReplicaFailed)
    if status in (429, 503):
        assert isinstance(err.error, Overloaded) and err.error.headers["Retry-After"] == "7"
    else:
        assert isinstance(err.error, UpstreamError) and err.error.status == 502


def test_stream_error_events_map_like_statuses() -> None:
    assert isinstance(
        stream_error({"error": {"type": "invalid_request_error", "message": "x"}}), InvalidRequest
    )
    assert isinstance(stream_error({"error": "plain text"}), ReplicaFailed)
