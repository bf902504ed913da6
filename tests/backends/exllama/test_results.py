"""Reading the generators' result dicts (the keys both ExLlamaV2 and exllamav3 return)."""

from __future__ import annotations

from typing import Any

import pytest

from backends._exllama.results import Chunk, End, Failed, count_tokens, read_result
from tests.backends.exllama.fakes import Ids


def streaming(**kw: Any) -> dict[str, Any]:
    return {"job": object(), "stage": "streaming", "serial": 3, "identifier": 7, "eos": False, **kw}


@pytest.mark.parametrize("stage", ["started", "prefill"])
def test_progress_stages_carry_nothing(stage: str) -> None:
    assert read_result({"stage": stage, "identifier": 7, "eos": False}) is None


def test_foreign_or_missing_identifier_is_ignored() -> None:
    assert read_result(streaming(identifier=None, text="x")) is None
    assert read_result(streaming(identifier="job-7", text="x")) is None
    r = streaming(text="x")
    del r["identifier"]
    assert read_result(r) is None


def test_chunk() -> None:
    assert read_result(streaming(text="Hel", token_ids=Ids(2))) == Chunk(7, "Hel", 2)


def test_chunk_with_text_held_back() -> None:
    # the generator holds text (incomplete UTF-8, banned-string prefix): no text, no token_ids
    assert read_result(streaming()) == Chunk(7, "", 0)


def test_end_at_max_new_tokens_is_length() -> None:
    r = streaming(
        eos=True,
        eos_reason="max_new_tokens",
        text="lo",
        token_ids=Ids(1),
        new_tokens=16,
        prompt_tokens=9,
        cached_tokens=256,
        cached_pages=1,
        full_completion="...",
    )
    assert read_result(r) == End(7, "lo", 1, "length", new_tokens=16, cached_tokens=256)


def test_end_on_stop_token_drops_held_text() -> None:
    r = streaming(
        eos=True,
        eos_reason="stop_token",
        eos_triggering_token_id=2,
        new_tokens=5,
        cached_tokens=0,
        held={"text": "\ufffd", "token_ids": Ids(2)},
    )
    assert read_result(r) == End(7, "", 0, "stop", new_tokens=5, cached_tokens=0)


@pytest.mark.parametrize("reason", ["stop_string", "end_filter", "loop_detected", "new_reason"])
def test_other_end_reasons_are_stop(reason: str) -> None:
    event = read_result(streaming(eos=True, eos_reason=reason, text="a", new_tokens=1))
    assert isinstance(event, End) and event.reason == "stop" and event.text == "a"


def test_error_stage() -> None:
    event = read_result(
        {"stage": "error", "identifier": 7, "eos": True, "error": RuntimeError("non-finite logits")}
    )
    assert isinstance(event, Failed) and event.identifier == 7
    assert "non-finite logits" in event.message


def test_count_tokens_shapes() -> None:
    assert count_tokens(None) == 0
    assert count_tokens(Ids(4)) == 4
    assert count_tokens([1, 2, 3]) == 3
    assert count_tokens(object()) == 0
