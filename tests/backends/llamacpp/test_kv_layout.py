"""The KV layouts (``kv_cache.layout``) with the real SmolLM2 through real HTTP.

``streams`` gives each of its 2 slots a KV stream of its own and keeps no cached prefix beyond
them (the idle slot holds one); ``pool`` is the unified layout. Both use plain attention
(``flash_attn = "off"``: logits that do not depend on how many tokens a step holds). A prompt
that shares part of another conversation gets that part copied into its own stream: the text
must be what reading the whole prompt gives, the source conversation must stay whole, and the
cells llama.cpp holds for every sequence must be the tokens the engine has for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import backend_of, model_table, serve, wait_for_stats
from tests.support import openai_client

STREAMS, POOL = "streams", "pool"

SYSTEM = (
    "You are a careful assistant for a hardware shop. Answer in one short sentence. "
    "The shop sells hammers, screwdrivers, saws, drills, nails, screws and glue. "
    "It opens at nine and closes at six, every day but Sunday."
)


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    plain = {"flash_attn": "off"}
    models = {
        STREAMS: model_table(
            smol_path, kv_cache={"layout": "per_sequence", "cached_prefixes": 0}, **plain
        ),
        POOL: model_table(smol_path, kv_cache={"layout": "unified"}, **plain),
    }
    with serve(models) as srv:
        yield srv


def _client(server: ServerThread) -> OpenAI:
    return openai_client(server.base_url, timeout=100)


def _ask(server: ServerThread, model: str, messages: list[Any], **kw: Any) -> tuple[str, int, int]:
    """The answer's text, its prompt tokens and how many of them came from the cache."""
    r = _client(server).chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, **kw
    )
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    cached = r.usage.prompt_tokens_details.cached_tokens or 0
    return r.choices[0].message.content or "", r.usage.prompt_tokens, cached


def _chat(question: str, *earlier: Any) -> list[Any]:
    return [{"role": "system", "content": SYSTEM}, *earlier, {"role": "user", "content": question}]


def _assert_cells_counted(server: ServerThread, model: str) -> None:
    engine = backend_of(server, model)._engine
    assert engine is not None
    wait_for_stats(backend_of(server, model).stats, lambda s: s.active_sequences == 0)
    for entry in engine.slots.entries:
        assert engine.model.memory.seq_pos_max(entry.seq_id) + 1 == len(entry.tokens)


def test_each_sequence_has_a_stream_of_its_own(server: ServerThread) -> None:
    streams = backend_of(server, STREAMS)._engine
    pool = backend_of(server, POOL)._engine
    assert streams is not None and pool is not None
    llama = streams.model.llama
    assert len(streams.slots.entries) == 2  # the live slots only
    assert llama.llama_n_ctx_seq(streams.model.ctx) == 1024
    assert llama.llama_n_ctx_seq(pool.model.ctx) == llama.llama_n_ctx(pool.model.ctx)


def test_a_shared_prefix_is_copied_and_its_source_kept(server: ServerThread) -> None:
    first = _chat("When does the shop open?")
    answer, first_prompt, cached = _ask(server, STREAMS, first)
    assert cached == 0
    # another conversation with the same system prompt: that part is copied from the first's
    other = _chat("Do you sell glue?")
    copied, prompt, cached = _ask(server, STREAMS, other)
    assert 40 <= cached < prompt
    _assert_cells_counted(server, STREAMS)
    # the first conversation's next turn still finds its whole first exchange
    follow = _chat("And on Sunday?", *first[1:], {"role": "assistant", "content": answer})
    _, _, cached = _ask(server, STREAMS, follow)
    assert cached >= first_prompt
    # read whole (another cache salt shares nothing), in the slot used least lately
    fresh, _, none = _ask(server, STREAMS, other, extra_body={"cache_salt": "elsewhere"})
    assert none == 0 and copied == fresh  # the copied cells are the ones reading gives
    _assert_cells_counted(server, STREAMS)


def test_the_layouts_write_the_same_text(server: ServerThread) -> None:
    messages = _chat("Name two things the shop sells.")
    assert _ask(server, STREAMS, messages)[0] == _ask(server, POOL, messages)[0]
    _assert_cells_counted(server, POOL)
