"""Unknown request fields are ignored and logged once per name, with bounded memory."""

from __future__ import annotations

import json
import logging
import tracemalloc
from typing import Any

import pytest

from gateway.wire.convert import LoggedOnce, chat_request, ignored_fields


def _body(names: range) -> str:
    extra = {f"x_unknown_{i}": 1 for i in names}
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})


def test_each_unknown_name_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.wire"):
        chat_request(_body(range(-3, -1)).encode(), "r")
        chat_request(_body(range(-3, -1)).encode(), "r")
    logged = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert len(logged) == 2


def test_the_set_of_logged_names_stays_bounded() -> None:
    seen = LoggedOnce(limit=3)
    assert all(seen.first_time(n) for n in "abcd")
    assert len(seen) == 3
    assert not seen.first_time("d") and seen.first_time("a")  # "a" was forgotten first


def test_100000_distinct_unknown_names_leave_memory_flat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.wire")  # pytest keeps captured records
    bodies = [_body(range(k * 1000, (k + 1) * 1000)).encode() for k in range(200)]
    tracemalloc.start()
    try:
        for body in bodies[:100]:  # fills every bounded cache (ours, pydantic-core's strings)
            chat_request(body, "r")
        before, _ = tracemalloc.get_traced_memory()
        for body in bodies[100:]:  # 100,000 more distinct names
            chat_request(body, "r")
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ignored_fields) == ignored_fields.limit
    # the names kept would be ~10 MB; the bounded set holds the last 1,024
    assert after - before < 256 * 1024, after - before


@pytest.mark.timeout(10)
def test_long_unknown_names_are_kept_cut_short() -> None:
    """Issue 23 finding 8: the set of logged names was bounded by count but kept whole names,
    which a client makes as long as it likes (50 names held 90 MB); each is kept cut to 64
    characters."""
    seen = LoggedOnce(limit=50)
    for i in range(50):
        assert seen.first_time(f"{i:02d}" + "x" * 100_000)
    assert sum(map(len, seen._seen)) <= 50 * 64
    assert not seen.first_time("07" + "x" * 100_000)  # the same name, still recognised


@pytest.mark.timeout(10)
def test_a_body_of_150000_bad_messages_reads_a_bounded_number_of_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23 finding 2: a 2 MB chat body of 150,000 invalid messages blocked the event loop
    for ~12 s: one pydantic error per element, and each error's location walked the whole
    wire-model tree per part. The 400 reads a bounded number of errors and walks the tree
    once."""
    from gateway.errors import InvalidRequest
    from gateway.wire import convert

    walks = 0
    params = 0
    walk, param = convert._field_names, convert._param

    def counted_walk() -> frozenset[str]:
        nonlocal walks
        walks += 1
        return walk()

    def counted_param(*args: Any) -> str | None:
        nonlocal params
        params += 1
        return param(*args)

    monkeypatch.setattr(convert, "_field_names", counted_walk)
    monkeypatch.setattr(convert, "_param", counted_param)
    body = json.dumps({"model": "m", "messages": [1] * 150_000}).encode()
    assert len(body) < 1_000_000
    with pytest.raises(InvalidRequest) as info:
        chat_request(body, "r")
    assert info.value.param == "messages[0]"
    assert walks == 1 and params <= 25


@pytest.mark.timeout(10)
@pytest.mark.parametrize("field", ["user", "prompt_cache_key"])
def test_client_ids_are_bounded(field: str) -> None:
    """Issue 23 finding 8: ``user`` and ``prompt_cache_key`` were unbounded, and echoed in
    every stored event of a response (30 one-token background responses: +240 MB); a few
    hundred characters are enough for any id (Codex sends a UUID)."""
    from gateway.endpoints.responses.convert import responses_request
    from gateway.errors import InvalidRequest

    base: dict[str, Any] = {"model": "m", "input": "hi"}
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    responses_request(json.dumps({**base, field: uuid}).encode(), "r")
    with pytest.raises(InvalidRequest) as info:
        responses_request(json.dumps({**base, field: "x" * 1_000_000}).encode(), "r")
    assert info.value.param == field
    if field == "user":
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u" * 300}
        with pytest.raises(InvalidRequest):
            chat_request(json.dumps(chat).encode(), "r")
