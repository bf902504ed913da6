"""The gateway on Ray Serve, on a local Ray cluster started on 127.0.0.1 (SmolLM2, CPU
replicas), with the openai SDK as client through Ray Serve's proxy: streaming chat and a
Responses chain; a conversation's turns on one replica with the prefix-aware router (cached
tokens) against round-robin in the same run; autoscaling from 0 to 2 replicas under a burst
and back to 0; a killed replica replaced; a client that leaves frees its sequence."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config import parse_config
from gateway.defaults import default_model_path

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SMOL = "smol"
SYSTEM = "You are a helpful assistant. " + " ".join(f"Rule {i}: be brief." for i in range(25))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster and Serve's proxy on a free port; the proxy's URL."""
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    port = free_port()
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
        _node_ip_address="127.0.0.1", _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def config(tmp: Path, ray_table: dict[str, Any]) -> Any:
    model = {
        "backend": "llamacpp",
        "model_path": str(default_model_path()),
        "batching": {"n_threads": 1, "max_concurrent": 2, "prefill_chunk_tokens": 128},
        "kv_cache": {"n_ctx_per_slot": 1024, "cached_prefixes": 4},
    }
    raw = {
        "models": {SMOL: model},
        "plugins": {"metrics": {"process_metrics": False}},
        "responses": {"path": str(tmp / "responses.sqlite3")},
        "ray": {"num_cpus": 0.5, **ray_table},
    }
    return parse_config(raw, "<ray test>")


def deploy(name: str, tmp: Path, **ray_table: Any) -> None:
    from gateway.ray_serve.deployments import application

    serve.run(
        application(config(tmp, {"app_name": name, **ray_table})),
        name=name, route_prefix=f"/{name}", blocking=False,
    )  # fmt: skip


def client(url: str, app: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/{app}/v1", api_key="x", max_retries=0, timeout=120)


def replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments["ModelServer"].replica_states
    return int(states.get("RUNNING", 0))


def wait_until(check: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def conversation(c: OpenAI, who: str, turns: int) -> list[tuple[int, int, str]]:
    """(prompt tokens, cached tokens, replica) of each turn of one growing conversation."""
    opening = f"I am {who}. " + " ".join(f"{who} likes item {i} a lot." for i in range(20))
    messages: list[Any] = [{"role": "system", "content": "You are brief."}]
    seen = []
    for turn in range(turns):
        content = opening if turn == 0 else f"Turn {turn}: one more word."
        messages.append({"role": "user", "content": content})
        raw = c.chat.completions.with_raw_response.create(
            model=SMOL, messages=messages, max_tokens=8, temperature=0
        )
        r = raw.parse()
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        seen.append((r.usage.prompt_tokens, cached, raw.headers["x-gateway-replica"]))
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    return seen


def followed(turns: list[tuple[int, int, str]]) -> int:
    """Turns that found at least 90% of the previous turn's prompt cached."""
    return sum(cached >= 0.9 * prev for (prev, _, _), (_, cached, _) in pairwise(turns))


def test_streams_chains_and_prefix_routing(cluster: str, tmp_path: Path) -> None:
    deploy("p", tmp_path, num_replicas=2, router="prefix")
    deploy("r", tmp_path, num_replicas=2, router="round_robin")
    c = client(cluster, "p")
    stream = c.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    first = c.responses.create(model=SMOL, input="Name a colour.", max_output_tokens=8)
    events = list(
        c.responses.create(
            model=SMOL, input="And another.", previous_response_id=first.id,
            max_output_tokens=8, stream=True,
        )
    )  # fmt: skip
    done = events[-1]
    assert done.type in ("response.completed", "response.incomplete")
    assert done.response.usage is not None
    chain_cached = done.response.usage.input_tokens_details.cached_tokens
    assert chain_cached > 0, "the chain's second turn ran where its first did"
    prefix = [conversation(c, f"user{i}", 3) for i in range(2)]
    rr = [conversation(client(cluster, "r"), f"user{i}", 3) for i in range(2)]
    for turns in prefix:  # every later turn on the replica that holds the conversation
        assert len({replica for _, _, replica in turns}) == 1, turns
        assert followed(turns) == len(turns) - 1, turns
    for turns in rr:  # round-robin alternates: the second turn misses what the first left
        assert len({replica for _, _, replica in turns}) == 2, turns
        assert followed(turns[:2]) == 0, turns
    print(f"\nprefix router turns (prompt, cached, replica): {prefix}\nround-robin: {rr}")


def test_a_killed_replica_is_replaced(cluster: str, tmp_path: Path) -> None:
    """Killed mid-answer: the stream ends with an error event, Ray starts another replica,
    and the next request is served."""
    deploy("k", tmp_path, num_replicas=2)
    body = {
        "model": SMOL, "stream": True, "max_tokens": 800, "temperature": 1.0,
        "messages": [{"role": "user", "content": "Write a very long story."}],
    }  # fmt: skip
    with httpx.stream("POST", f"{cluster}/k/v1/chat/completions", json=body, timeout=60) as r:
        replica = r.headers["x-gateway-replica"]
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        [name] = [
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::k#ModelServer#") and replica in a["name"]
        ]  # fmt: skip
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest and '"error"' in rest[-1], rest[-3:]  # a clean end, in OpenAI's shape
    wait_until(lambda: replicas("k") < 2, 30, "the kill to be seen")
    took = wait_until(lambda: replicas("k") == 2, 60, "a new replica")
    answer = client(cluster, "k").chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    print(f"\nreplica replaced in {took:.1f} s")
    serve.delete("k")


def metric(text: str, name: str) -> float:
    found = re.search(rf'^{name}{{model="{SMOL}"}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_leaves_frees_its_sequence(cluster: str, tmp_path: Path) -> None:
    deploy("d", tmp_path, num_replicas=1)
    base = f"{cluster}/d"
    body = {
        "model": SMOL, "stream": True, "max_tokens": 800, "temperature": 1.0,
        "messages": [{"role": "user", "content": "Write a very long story."}],
    }  # fmt: skip
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
        # the connection is closed mid-answer

        def freed() -> bool:
            text = http.get(f"{base}/metrics").text
            gone = metric(text, "gateway_engine_cancelled_sequences_total")
            return metric(text, "gateway_active_sequences") == 0 and gone >= 1

        took = wait_until(freed, 30, "the replica to free the sequence")
        text = http.get(f"{base}/metrics").text
        generated = metric(text, "gateway_engine_generated_tokens_total")
    assert generated < 800
    print(f"\nsequence freed {took:.2f} s after the client left")
    serve.delete("d")


def test_autoscaling_from_zero_to_two_and_back(cluster: str, tmp_path: Path) -> None:
    scaling = {
        "min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 3,
        "metrics_interval_s": 0.5, "look_back_period_s": 2,
    }  # fmt: skip
    deploy("a", tmp_path, autoscaling=scaling, max_ongoing_requests=2)
    assert replicas("a") == 0
    c = client(cluster, "a")

    def ask(i: int) -> float:
        started = time.monotonic()
        c.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": f"Story {i}."}], max_tokens=120
        )
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        answers = pool.map(ask, range(6))
        to_two = wait_until(lambda: replicas("a") == 2, 90, "two replicas")
        latencies = sorted(answers)
    burst = time.monotonic() - started
    to_zero = wait_until(lambda: replicas("a") == 0, 90, "scale-down to zero")
    print(
        f"\nautoscaling: 0 -> 2 replicas {to_two:.1f} s into a burst of 6 requests "
        f"(first answer {latencies[0]:.1f} s, burst done in {burst:.1f} s); "
        f"back to 0 replicas {to_zero:.1f} s after it"
    )
    serve.delete("a")
