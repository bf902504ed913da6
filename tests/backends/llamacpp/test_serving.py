"""The real engine on the real SmolLM2 model, through real HTTP with the official openai SDK."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, backend_of, client_for, wait_for_stats

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Say hello in Spanish.",
    "What is two plus two?",
]


def _user(text: str) -> list[ChatMessageParam]:
    return [{"role": "user", "content": text}]


ChatMessageParam = ChatCompletionMessageParam


def _stream(server: ServerThread, text: str, max_tokens: int, **kw: Any) -> dict[str, Any]:
    """Stream one chat completion; return its text, chunk times, finish and usage."""
    client = client_for(server)
    times: list[float] = []
    parts: list[str] = []
    finish = None
    usage = None
    stream = client.chat.completions.create(
        model=SMOL,
        messages=_user(text),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                times.append(time.monotonic())
            if choice.finish_reason:
                finish = choice.finish_reason
    return {"text": "".join(parts), "times": times, "finish": finish, "usage": usage}


def test_concurrent_streams_complete_with_correct_usage(smol_server: ServerThread) -> None:
    client = client_for(smol_server)
    alone = {
        q: client.chat.completions.create(
            model=SMOL, messages=_user(q), max_tokens=1, temperature=0
        ).usage
        for q in QUESTIONS
    }
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # 4 streams on 2 slots: 2 wait
        results = list(pool.map(lambda q: _stream(smol_server, q, 12), QUESTIONS))
    for q, r in zip(QUESTIONS, results, strict=True):
        usage = r["usage"]
        single = alone[q]
        assert usage is not None and single is not None
        assert r["text"] and r["finish"] in ("stop", "length")
        assert usage.prompt_tokens == single.prompt_tokens
        assert 1 <= usage.completion_tokens <= 12
        if r["finish"] == "length":
            assert usage.completion_tokens == 12
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = wait_for_stats(backend_of(smol_server, SMOL).stats, lambda s: s.active_sequences == 0)
    assert stats.queued_sequences == 0


def test_two_streams_interleave_in_one_decode_step(smol_server: ServerThread) -> None:
    backend = backend_of(smol_server, SMOL)
    barrier = threading.Barrier(2)

    def run(q: str) -> dict[str, Any]:
        barrier.wait()
        return _stream(smol_server, q, 24, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(run, ["Tell me a story about a cat.", "Tell me a story about a dog."])
    assert len(a["times"]) > 3 and len(b["times"]) > 3
    # each stream got tokens while the other was still producing: they ran together
    assert a["times"][0] < b["times"][-1] and b["times"][0] < a["times"][-1]
    assert min(a["times"][-1], b["times"][-1]) > max(a["times"][1], b["times"][1])
    assert backend.stats().max_batch_sequences >= 2


def test_prefix_reuse_users_a_b_c_a_on_two_slots(smol_server: ServerThread) -> None:
    """Three users, two live slots: user A's second turn reuses A's whole first exchange."""
    client = client_for(smol_server)
    backend = backend_of(smol_server, SMOL)
    history: dict[str, list[ChatCompletionMessageParam]] = {}
    usages = {}
    for user, text in (("a", "I like green apples."), ("b", "Tell me about rain."),
                       ("c", "Count to three."), ("a", "What fruit do I like?")):  # fmt: skip
        messages: list[ChatCompletionMessageParam] = [
            *history.get(user, []),
            {"role": "user", "content": text},
        ]
        before = backend.stats()
        r = client.chat.completions.create(
            model=SMOL, messages=messages, max_tokens=8, temperature=0
        )
        after = backend.stats()
        reply = r.choices[0].message.content or ""
        history[user] = [*messages, {"role": "assistant", "content": reply}]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        processed = after.prompt_tokens_processed - before.prompt_tokens_processed
        assert processed == r.usage.prompt_tokens - cached  # cached tokens were not re-run
        usages[(user, len(history[user]))] = (r.usage.prompt_tokens, cached)
    first_a, first_cached = usages[("a", 2)]
    second_a, second_cached = usages[("a", 4)]
    assert first_cached < first_a
    # A's first prompt (system + user turn) and most of A's reply came from the cache
    assert second_cached >= first_a
    assert second_cached < second_a


def test_a_cached_prompt_is_not_queued_behind_a_long_one(smol_server: ServerThread) -> None:
    """Prompt reading goes to the prompts with the least left first: a prompt found in the
    cache gets its first token while a long prompt admitted before it is still being read."""
    backend = backend_of(smol_server, SMOL)
    short = "What is two plus two?"
    assert _stream(smol_server, short, 1)["usage"] is not None  # now it is cached
    before = backend.stats()
    long_text = "Summarize this. " + "The sky is blue and the grass is green. " * 70
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_stream, smol_server, long_text, 1)
        wait_for_stats(  # the long prompt is being read (64 tokens a step, 11 steps)
            backend.stats, lambda s: s.prompt_tokens_processed > before.prompt_tokens_processed
        )
        fast = _stream(smol_server, short, 1)
        long = slow.result()
    assert fast["usage"].prompt_tokens_details.cached_tokens > 0
    assert fast["times"][0] < long["times"][0]


def test_stop_strings_are_never_emitted(smol_server: ServerThread) -> None:
    client = client_for(smol_server)
    for stream in (False, True):
        if stream:
            r = _stream(smol_server, "List the numbers 1 to 5, one per line.", 40, stop=["3"])
            text, finish = r["text"], r["finish"]
        else:
            c = client.chat.completions.create(
                model=SMOL,
                messages=_user("List the numbers 1 to 5, one per line."),
                max_tokens=40,
                temperature=0,
                stop=["3"],
            )
            text, finish = c.choices[0].message.content or "", c.choices[0].finish_reason
        assert "3" not in text
        assert finish == "stop"


def test_context_overflow_is_a_400_before_any_byte(smol_server: ServerThread) -> None:
    client = client_for(smol_server)
    long_text = "word " * 1500  # > 1024 tokens per slot
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=SMOL, messages=_user(long_text), max_tokens=4, stream=stream
            )
        assert info.value.code == "context_length_exceeded"
        assert "1024" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SMOL, messages=_user("hi"), max_tokens=1020)
    assert info.value.code == "context_length_exceeded"
    raw = httpx.post(
        smol_server.base_url + "/v1/completions",
        json={"model": SMOL, "prompt": long_text, "stream": True, "max_tokens": 4},
    )
    assert raw.status_code == 400
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.json()["error"]["code"] == "context_length_exceeded"


def _counters(server: ServerThread) -> Any:
    return backend_of(server, SMOL).stats()


def test_disconnect_while_decoding_frees_the_slot(smol_server: ServerThread) -> None:
    backend = backend_of(smol_server, SMOL)
    before = backend.stats()
    client = client_for(smol_server)
    stream = client.chat.completions.create(
        model=SMOL, messages=_user("Write a long essay about the ocean."), max_tokens=500,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 3:
                break
    stream.close()
    stats = wait_for_stats(
        backend.stats, lambda s: s.cancelled > before.cancelled and s.active_sequences == 0
    )
    assert stats.tokens_after_cancel - before.tokens_after_cancel <= 1  # at most one step
    assert stats.tokens_generated - before.tokens_generated < 100
    assert stats.kv_cells_used <= before.kv_cells_used + 8  # its cells were freed
    assert _stream(smol_server, "Hi!", 2)["usage"] is not None  # the next request is served


def test_disconnect_during_prefill_frees_the_slot(smol_server: ServerThread) -> None:
    backend = backend_of(smol_server, SMOL)
    before = backend.stats()
    client = client_for(smol_server)
    long_text = "Summarize this. " + "The sky is blue and the grass is green. " * 90
    stream = client.chat.completions.create(
        model=SMOL, messages=_user(long_text), max_tokens=4, stream=True
    )
    first = next(iter(stream))  # the role chunk comes before prefill ends
    assert first.choices[0].delta.role == "assistant"
    wait_for_stats(
        backend.stats, lambda s: s.prompt_tokens_processed > before.prompt_tokens_processed
    )
    stream.close()
    stats = wait_for_stats(
        backend.stats, lambda s: s.cancelled > before.cancelled and s.active_sequences == 0
    )
    assert stats.tokens_generated == before.tokens_generated  # never reached a first token
    assert stats.tokens_after_cancel - before.tokens_after_cancel <= 64  # one prefill step
    assert stats.prompt_tokens_processed - before.prompt_tokens_processed < 600
    assert _stream(smol_server, "Hi!", 2)["usage"] is not None


def test_disconnect_while_queued_frees_its_place(smol_server: ServerThread) -> None:
    backend = backend_of(smol_server, SMOL)
    client = client_for(smol_server)
    streams = [
        client.chat.completions.create(
            model=SMOL,
            messages=_user(f"Story number {i}."),
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i in range(2)
    ]
    for s in streams:  # both slots busy decoding
        next(iter(s))
    wait_for_stats(backend.stats, lambda s: s.active_sequences == 2)
    # a third request waits for a slot; its client gives up after 0.5 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            smol_server.base_url + "/v1/chat/completions",
            json={"model": SMOL, "messages": _user("queued"), "max_tokens": 2},
            timeout=httpx.Timeout(5, read=0.5),
        )
    before = backend.stats()
    for s in streams:
        s.close()
    stats = wait_for_stats(
        backend.stats, lambda s: s.cancelled >= before.cancelled + 2 and s.active_sequences == 0
    )
    assert stats.queued_sequences == 0
    r = client.chat.completions.create(model=SMOL, messages=_user("Hi"), max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert backend.stats().active_sequences == 0
