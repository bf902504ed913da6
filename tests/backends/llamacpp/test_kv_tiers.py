"""The KV tiers on the real SmolLM2 over HTTP (openai SDK): a conversation continued after its
prefix left the KV cells (evicted, idle unload, restart) has ``cached_tokens`` covering its
earlier prompt and the same text at temperature 0 as without the tiers; damaged and foreign
entries on disk are deleted and never loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from backends.llamacpp import LlamaCppBackend
from backends.llamacpp.kv_tiers import fingerprint
from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, TINY, model_table, serve
from tests.support import gateway_process, openai_client, wait_for

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer in plain words about topic {i}." for i in range(30)
)
MiB = 1 << 20


def table(path: Path, disk_dir: Path, **kv: Any) -> dict[str, Any]:
    """One live slot and one cached prefix: a second and third conversation evict the first."""
    cache = {"n_ctx_per_slot": 2048, "cached_prefixes": 1, "disk_cache_dir": str(disk_dir), **kv}
    return model_table(path, batching={"max_concurrent": 1}, kv_cache=cache)


def ask(client: OpenAI, user: str) -> tuple[str, int, int]:
    """The answer, the prompt's tokens and how many of them came from a cache."""
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=12,
        temperature=0,
    )
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    cached = r.usage.prompt_tokens_details.cached_tokens or 0
    return r.choices[0].message.content or "", r.usage.prompt_tokens, cached


def evict(client: OpenAI) -> None:
    for other in range(2):
        client.chat.completions.create(
            model=SMOL,
            messages=[{"role": "user", "content": f"Other topic {other}. " * 40}],
            max_tokens=2,
        )


def client_of(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, timeout=120)


def baseline(smol_path: Path, tmp_path: Path, user: str) -> str:
    """The answer without the tiers."""
    with serve({SMOL: table(smol_path, tmp_path)}) as srv, client_of(srv) as c:
        return ask(c, user)[0]


def test_an_evicted_conversation_comes_back_from_host_memory(
    smol_path: Path, tmp_path: Path
) -> None:
    expected = baseline(smol_path, tmp_path, "alice: hello")
    with serve({SMOL: table(smol_path, tmp_path, host_cache_bytes=256 * MiB)}) as srv:
        with client_of(srv) as c:
            first, prompt, cached = ask(c, "alice: hello")
            assert cached == 0 and first == expected
            evict(c)
            again, prompt2, cached2 = ask(c, "alice: hello")
        backend = srv.backend(SMOL)
        assert isinstance(backend, LlamaCppBackend)
        stats = backend.stats()
        admin = httpx.get(srv.base_url + "/admin/models").json()["data"][0]["kv_tiers"]
    assert prompt2 == prompt and cached2 == prompt - 1  # all but the last prompt token
    assert again == expected
    assert stats.kv_tier_hits == 1 and stats.kv_tier_restored_tokens == cached2
    assert stats.kv_tier_saved >= 1 and stats.kv_host_tier_bytes > 0
    assert stats.kv_tier_restore_seconds > 0 and stats.kv_disk_tier_bytes == 0
    assert admin["hits"] == 1 and admin["host"]["entries"] >= 1 and "disk" not in admin
    assert not list(tmp_path.rglob("*.kv"))  # no disk tier configured


def test_an_idle_unload_keeps_the_prefixes(smol_path: Path, tmp_path: Path) -> None:
    models = {SMOL: {**table(smol_path, tmp_path, host_cache_bytes=256 * MiB)}}
    models[SMOL]["idle_unload_after_s"] = 0.5
    with serve(models) as srv, client_of(srv) as c:
        _, prompt, _ = ask(c, "bob: hi")
        entry = srv.services.pool.resolve(SMOL)
        loads = entry.loads
        wait_for(lambda: entry.state.value == "unloaded", 10)
        _, _, cached = ask(c, "bob: hi")  # reloaded: its cells are new, the host tier is not
        assert entry.loads == loads + 1 and cached == prompt - 1


@pytest.mark.parametrize("host", [0, 256 * MiB], ids=["disk-only", "host-and-disk"])
def test_a_restart_finds_the_disk_entries(smol_path: Path, tmp_path: Path, host: int) -> None:
    """``gateway serve`` stopped with SIGTERM and started again on the same folder: the new
    process finds the entry the shutdown saved. With a host tier the entry is read into it
    before the request reaches the engine (prefetched); without one the engine reads it."""
    expected = baseline(smol_path, tmp_path, "carol: hey")
    disk = table(smol_path, tmp_path / "kv", disk_cache_bytes=512 * MiB, host_cache_bytes=host)
    config = {"models": {SMOL: disk}}
    first = gateway_process(tmp_path, "first", config).start()
    try:
        with OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0) as c:
            _, prompt, _ = ask(c, "carol: hey")
        first.terminate()
        assert first.wait(60) == 0
    finally:
        first.stop()
    assert list((tmp_path / "kv").rglob("*.kv"))  # the shutdown saved the cached prefix
    second = gateway_process(tmp_path, "second", config).start()
    try:
        with OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0) as c:
            text, _, cached = ask(c, "carol: hey")
        tiers = httpx.get(second.url + "/admin/models", timeout=30).json()["data"][0]["kv_tiers"]
    finally:
        second.stop()
    assert cached == prompt - 1 and text == expected
    assert tiers["hits"] == 1 and tiers["prefetched"] == (1 if host else 0)


def test_a_restart_reads_only_the_prefix_it_restores(smol_path: Path, tmp_path: Path) -> None:
    """After a restart, a prompt sharing only the system prompt with a long saved conversation
    has that prefix alone read (into the host tier: the state of those tokens, a fraction of
    the file) and restored; the answer is the one without the tiers."""
    expected = baseline(smol_path, tmp_path, "frank: hi")
    kv = {"disk_cache_bytes": 512 * MiB, "host_cache_bytes": 256 * MiB}
    config = {"models": {SMOL: table(smol_path, tmp_path / "kv", **kv)}}
    first = gateway_process(tmp_path, "first", config).start()
    try:
        with OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0) as c:
            ask(c, "erin: " + "tell me more about topic seven. " * 50)
        first.terminate()
        assert first.wait(60) == 0
    finally:
        first.stop()
    (entry,) = (tmp_path / "kv").rglob("*.kv")
    second = gateway_process(tmp_path, "second", config).start()
    try:
        with OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0) as c:
            text, prompt, cached = ask(c, "frank: hi")
        tiers = httpx.get(second.url + "/admin/models", timeout=30).json()["data"][0]["kv_tiers"]
    finally:
        second.stop()
    assert text == expected and 0 < cached < prompt - 1
    assert tiers["hits"] == 1 and tiers["prefetched"] == 1 and tiers["restored_tokens"] == cached
    assert 0 < tiers["host"]["bytes"] < entry.stat().st_size * 2 // 3  # the prefix's state


def test_damaged_and_foreign_entries_are_deleted(smol_path: Path, tmp_path: Path) -> None:
    disk = table(smol_path, tmp_path, disk_cache_bytes=512 * MiB)
    with serve({SMOL: disk}) as srv, client_of(srv) as c:
        ask(c, "dave: yo")
    (path,) = tmp_path.rglob("*.kv")
    # the same entry copied where a q8_0 cache's entries go: another fingerprint's folder
    q8 = fingerprint(smol_path, type_k="q8_0", type_v="q8_0", flash_attn="on")
    foreign = tmp_path / q8 / path.name
    foreign.parent.mkdir()
    foreign.write_bytes(path.read_bytes())
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF  # one byte of K/V flipped: only the checksum can tell
    path.write_bytes(bytes(data))
    with serve({SMOL: disk}) as srv, client_of(srv) as c:
        _, _, cached = ask(c, "dave: yo")
        assert cached == 0 and not path.exists()  # prefilled again, the file gone
    q8_table = table(smol_path, tmp_path, disk_cache_bytes=512 * MiB, type_k="q8_0", type_v="q8_0")
    q8_table["flash_attn"] = "on"
    with serve({SMOL: q8_table}) as srv, client_of(srv) as c:
        # an f16 state in the q8_0 folder: its header names another fingerprint
        assert not foreign.exists()
        _, _, cached = ask(c, "dave: yo")
        assert cached == 0


def test_the_disk_budget_holds_under_200_conversations(tiny_path: Path, tmp_path: Path) -> None:
    """200 distinct conversations on the tiny model (one cell slot: each evicts the one
    before it, straight to disk): the folder stays within its budget, the recent ones come
    back from it, the oldest are gone."""
    budget = 1 << 20  # ~6 entries of this model's ~290-token prompts
    kv = {"cached_prefixes": 1, "disk_cache_bytes": budget, "disk_cache_dir": str(tmp_path)}
    tiny = model_table(tiny_path, batching={"max_concurrent": 1}, kv_cache=kv)

    def prompt(i: int) -> str:
        return f"conversation {i}: " + "abc def " * 40

    with serve({TINY: tiny}) as srv, client_of(srv) as c:
        for i in range(200):
            c.completions.create(model=TINY, prompt=prompt(i), max_tokens=1)

        def cached(i: int) -> int:
            r = c.completions.create(model=TINY, prompt=prompt(i), max_tokens=1)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            return r.usage.prompt_tokens_details.cached_tokens or 0

        backend = srv.backend(TINY)
        assert isinstance(backend, LlamaCppBackend) and backend.tiers is not None
        assert backend.tiers.disk is not None
        backend.tiers.disk.flush()
        assert cached(197) > 0  # evicted two conversations ago: restored from disk
        assert cached(0) == 0  # long gone: the budget took it
    files = list(tmp_path.rglob("*.kv"))
    assert len(files) >= 2 and sum(f.stat().st_size for f in files) <= budget
