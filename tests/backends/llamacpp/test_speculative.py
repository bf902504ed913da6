"""Speculative decoding in the llama.cpp engine, with the real SmolLM2 through real HTTP.

One server holds the same GGUF twice: ``spec`` verifies every draft it makes (policy
``always``, so drafts are taken and rejected on every request here, whatever this machine's
step times say) and ``off`` decodes one token per step, both with ``flash_attn = "off"`` (see
``LlamaCppConfig.flash_attention``: logits bitwise the same however many tokens a step holds).
At temperature 0, and with a seed above it, both must write the same text: verification draws
every token through the sequence's own sampler chain. After each request the KV cells llama.cpp
holds for every sequence are counted against the engine's bookkeeping: a rejected draft leaves no
cell behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config import parse_config
from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import backend_of, model_table, serve, wait_for_stats
from tests.support import openai_client

SPEC, OFF, DRAFT = "spec", "off", "draft"

#: Code the model is asked to copy: what it writes repeats its context, so drafts are taken.
CODE = """def rgb_to_hls(r, g, b):
    maxc = max(r, g, b)
    minc = min(r, g, b)
    sumc = (maxc + minc)
    rangec = (maxc - minc)
    l = sumc / 2.0
    if minc == maxc:
        return 0.0, l, 0.0
    if l <= 0.5:
        s = rangec / sumc
    else:
        s = rangec / (2.0 - maxc - minc)
    rc = (maxc - r) / rangec
    gc = (maxc - g) / rangec
    bc = (maxc - b) / rangec
    return h, l, s
"""
COPY = f"Copy this Python code exactly, renaming rgb_to_hls to to_hls:\n\n{CODE}"


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    spec = {"mode": "ngram", "policy": "always", "draft_max": 8}
    # attention whose logits do not depend on how many tokens a step holds (flash attention on
    # a CPU adds up one query in another order than several)
    plain = {"flash_attn": "off"}
    models = {
        SPEC: model_table(smol_path, speculative=spec, **plain),
        OFF: model_table(smol_path, speculative={"mode": "off"}, **plain),
        # the model as its own draft: it drafts what it will write (a real second context)
        DRAFT: model_table(
            smol_path,
            speculative={"mode": "draft", "draft_model_path": str(smol_path), "policy": "always"},
            **plain,
        ),
    }
    with serve(models) as srv:
        yield srv


def _client(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, timeout=100)


def _chat(server: ServerThread, model: str, text: str = COPY, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 80)
    kw.setdefault("temperature", 0)
    messages: Any = [{"role": "user", "content": text}]
    return _client(server).chat.completions.create(model=model, messages=messages, **kw)


def _both(
    server: ServerThread, text: str = COPY, *, drafts: bool = True, **kw: Any
) -> tuple[Any, Any]:
    before = backend_of(server, SPEC).stats()
    spec, off = _chat(server, SPEC, text, **kw), _chat(server, OFF, text, **kw)
    after = _settled(server)
    assert (after.draft_tokens > before.draft_tokens) == drafts
    _assert_cells_counted(server)
    return spec, off


def _settled(server: ServerThread) -> Any:
    return wait_for_stats(backend_of(server, SPEC).stats, lambda s: s.active_sequences == 0)


def _assert_cells_counted(server: ServerThread) -> None:
    """Every sequence's cells in llama.cpp are exactly the tokens the engine holds for it."""
    engine = backend_of(server, SPEC)._engine
    assert engine is not None
    memory = engine.model.memory
    for entry in engine.slots.entries:
        assert memory.seq_pos_max(entry.seq_id) + 1 == len(entry.tokens), entry.seq_id


def test_greedy_text_is_the_same_and_drafts_are_taken(server: ServerThread) -> None:
    spec, off = _both(server)
    assert spec.choices[0].message.content == off.choices[0].message.content
    assert spec.choices[0].finish_reason == off.choices[0].finish_reason
    assert spec.usage.completion_tokens == off.usage.completion_tokens
    stats = backend_of(server, SPEC).stats()
    assert 0 < stats.draft_accepted < stats.draft_tokens  # taken and rejected both happened
    # fewer decode steps than tokens: several tokens were written per step
    models = httpx.get(server.base_url + "/admin/models").json()
    spec_info = next(m for m in models["data"] if m["id"] == SPEC)
    assert 0 < spec_info["engine"]["draft_acceptance"] < 1


def test_seeded_sampling_is_the_same_above_temperature_zero(server: ServerThread) -> None:
    spec, off = _both(server, temperature=0.9, seed=7, max_tokens=60)
    assert spec.choices[0].message.content == off.choices[0].message.content


@pytest.mark.parametrize("max_tokens", [1, 5, 23])
def test_max_tokens_inside_a_draft(server: ServerThread, max_tokens: int) -> None:
    spec, off = _both(server, max_tokens=max_tokens, drafts=max_tokens > 1)
    assert spec.choices[0].message.content == off.choices[0].message.content
    assert spec.usage.completion_tokens == off.usage.completion_tokens == max_tokens
    assert spec.choices[0].finish_reason == "length"


def test_stop_strings_spanning_drafts(server: ServerThread) -> None:
    reference = _both(server, max_tokens=80)[1].choices[0].message.content
    lines = [line for line in reference.splitlines() if len(line.strip()) > 12]
    assert len(lines) >= 3, reference
    for line in lines[1:4]:  # stops in the copied body, where drafts run over them
        stop = line.strip()[3:12]
        spec, off = _both(server, stop=[stop], max_tokens=80)
        assert spec.choices[0].message.content == off.choices[0].message.content
        assert stop not in spec.choices[0].message.content
        assert spec.choices[0].finish_reason == "stop"


def test_logprobs_match(server: ServerThread) -> None:
    spec, off = _both(server, logprobs=True, top_logprobs=2, max_tokens=40)
    a, b = spec.choices[0].logprobs.content, off.choices[0].logprobs.content
    assert [t.token for t in a] == [t.token for t in b]
    for x, y in zip(a, b, strict=True):
        # the models' caches placed the shared prompt prefix in other cells (their histories
        # differ), which changes the order attention adds values up in: close, not bitwise
        assert x.logprob == pytest.approx(y.logprob, abs=0.1)
        assert [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]


def test_grammar_constrained_answer_is_the_same(server: ServerThread) -> None:
    schema = {
        "type": "object",
        "properties": {"lines": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["lines"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "code", "schema": schema}}
    text = f"Give the first lines of this code as JSON.\n\n{CODE}"
    spec, off = _both(server, text, response_format=fmt, max_tokens=120)
    assert spec.choices[0].message.content == off.choices[0].message.content
    assert json.loads(spec.choices[0].message.content)["lines"]


def test_n_choices_are_each_the_same(server: ServerThread) -> None:
    spec, off = _both(server, n=2, max_tokens=40)
    texts = {c.message.content for c in spec.choices}
    assert texts == {c.message.content for c in off.choices} and len(texts) == 1


def test_cancel_mid_draft_frees_the_sequence(server: ServerThread) -> None:
    body = {
        "model": SPEC,
        "messages": [{"role": "user", "content": COPY}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    before = backend_of(server, SPEC).stats()
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 8:
                break
    stats = wait_for_stats(
        backend_of(server, SPEC).stats,
        lambda s: s.active_sequences == 0 and s.cancelled > before.cancelled,
    )
    assert stats.draft_tokens > before.draft_tokens
    _assert_cells_counted(server)
    spec, off = _both(server, max_tokens=30)  # the next request is served, and the same
    assert spec.choices[0].message.content == off.choices[0].message.content


def test_a_draft_model_drafts_and_the_text_is_the_same(server: ServerThread) -> None:
    before = backend_of(server, DRAFT).stats()
    for kw in ({"max_tokens": 60}, {"max_tokens": 40, "temperature": 0.8, "seed": 3}):
        spec, off = _chat(server, DRAFT, **kw), _chat(server, OFF, **kw)
        assert spec.choices[0].message.content == off.choices[0].message.content
    stats = wait_for_stats(backend_of(server, DRAFT).stats, lambda s: s.active_sequences == 0)
    drafted = stats.draft_tokens - before.draft_tokens
    accepted = stats.draft_accepted - before.draft_accepted
    assert drafted > 0 and accepted / drafted > 0.5  # its own greedy guesses: mostly right
    engine = backend_of(server, DRAFT)._engine
    assert engine is not None and engine.draft_model is not None
    assert not engine.draft_model.cells  # each sequence's draft cells went with it
    memory = engine.model.memory
    for entry in engine.slots.entries:
        assert memory.seq_pos_max(entry.seq_id) + 1 == len(entry.tokens)


def test_a_draft_model_with_another_vocabulary_is_refused(smol_path: Path, tiny_path: Path) -> None:
    table = model_table(
        smol_path, speculative={"mode": "draft", "draft_model_path": str(tiny_path)}
    )
    config = parse_config({"models": {"bad": table}}, "<test>")
    with ServerThread(config, wait_ready=False) as srv:
        r = httpx.post(
            srv.base_url + "/v1/chat/completions",
            json={"model": "bad", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        admin = httpx.get(srv.base_url + "/admin/models", timeout=10).json()
    assert r.status_code == 503, r.text  # the client is told the model failed to load
    error = next(m for m in admin["data"] if m["id"] == "bad")["error"]
    assert "does not share the main model's vocabulary" in error  # the operator, why
