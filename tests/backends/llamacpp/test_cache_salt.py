"""The prefix cache and the KV tiers are partitioned by cache salt: one per API key by default
(the api_keys plugin), and vLLM's per-request ``cache_salt`` (issue 23 finding 6). The tiny
generated model over HTTP, with a host tier: no key reuses, or sees ``cached_tokens`` of,
another key's prompt, in the cells or restored from the tier."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import TINY, model_table

pytestmark = pytest.mark.timeout(60)

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"
PROMPT = "Tell me the secret plan. " * 12  # about 190 tokens: three KV tier blocks


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[ServerThread]:
    cache = {"host_cache_bytes": 64 << 20, "disk_cache_bytes": 0, "cached_prefixes": 1}
    table = model_table(tiny_path, batching={"max_concurrent": 1}, kv_cache=cache)
    keys = [{"name": "alice", "sha256": sha(ALICE)}, {"name": "bob", "sha256": sha(BOB)}]
    raw = {"models": {TINY: table}, "plugins": {"api_keys": {"keys": keys}}}
    with ServerThread(parse_config(raw, "<test>")) as srv:
        yield srv


def cached(server: ServerThread, key: str, content: str, **extra: Any) -> int:
    """The ``cached_tokens`` of a chat completion of ``content`` with API key ``key``."""
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        **extra,
    }
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_one_key_never_reuses_another_keys_prefix(server: ServerThread) -> None:
    """Issue 23 finding 6: the prefix cache was shared by all API keys and ``cached_tokens``
    reported the exact common prefix, so key B could confirm a guess about key A's prompt
    token by token; each key now has its own partition of the cells."""
    content = "alice 1: " + PROMPT
    assert cached(server, ALICE, content) == 0
    assert cached(server, BOB, content) == 0  # the same prompt: nothing of alice's is reused
    assert cached(server, BOB, content + "and?") > 150  # bob's own prefix is
    assert cached(server, ALICE, content + "and?") > 150  # and alice's own, still cached


def test_a_prefix_restored_from_the_kv_tier_stays_with_its_key(server: ServerThread) -> None:
    """Issue 23 finding 6: the KV tiers' entries were found by token hashes alone; a prefix
    saved there under one key is restored only for that key."""
    content = "alice 2: " + PROMPT
    assert cached(server, ALICE, content) == 0
    for other in range(2):  # one cached prefix: alice's leaves the cells for the host tier
        cached(server, ALICE, f"other {other} " * 40)
    assert cached(server, BOB, content) == 0
    for other in range(2):
        cached(server, ALICE, f"more {other} " * 40)
    assert cached(server, ALICE, content + "and?") > 150


def test_a_request_cache_salt_partitions_a_keys_cache(server: ServerThread) -> None:
    """Issue 23 finding 6: vLLM's per-request ``cache_salt`` (mixed with the key's): the
    same salt reuses, another salt or none does not."""
    content = "alice 3: " + PROMPT
    assert cached(server, ALICE, content, cache_salt="s1") == 0
    assert cached(server, ALICE, content) == 0
    assert cached(server, ALICE, content + "?", cache_salt="s2") == 0
    assert cached(server, BOB, content + "?", cache_salt="s1") == 0
    assert cached(server, ALICE, content + "?", cache_salt="s1") > 150
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": TINY, "messages": [{"role": "user", "content": "x"}], "cache_salt": ""},
        headers={"authorization": f"Bearer {ALICE}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
