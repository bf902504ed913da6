"""Unknown request fields are ignored and logged once per name, with bounded memory."""

from __future__ import annotations

import json
import logging
import tracemalloc

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
