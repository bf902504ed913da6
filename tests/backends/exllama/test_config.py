"""Config tables of the exllamav2/exllamav3 backends, and the engine plan made from them."""

from __future__ import annotations

from typing import Any

import pytest

from backends._exllama.config import EnginePlan, ExllamaModelConfig, plan_engine, round_up_to_page
from backends.exllamav2.config import ExLlamaV2ModelConfig
from backends.exllamav2.model import decide_paged, model_batch_size
from backends.exllamav3.config import ExLlamaV3ModelConfig
from gateway.config import parse_config
from gateway.errors import ConfigError, EngineError


def parse(backend: str, **table: Any) -> ExllamaModelConfig:
    raw = {"models": {"m": {"backend": backend, "model_dir": "/models/m", **table}}}
    cfg = parse_config(raw, "t")
    model = cfg.models["m"]
    assert isinstance(model, ExllamaModelConfig)
    return model


def problems(backend: str, **table: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(backend, **table)
    return info.value.problems


@pytest.mark.parametrize("backend", ["exllamav2", "exllamav3"])
def test_defaults(backend: str) -> None:
    cfg = parse(backend)
    assert str(cfg.model_dir) == "/models/m"
    assert cfg.kv_cache.max_seq_len is None and cfg.kv_cache.size_tokens is None
    assert cfg.batching.prefill_chunk_tokens == 2048
    assert cfg.chat_template_file is None


def test_v2_table() -> None:
    cfg = parse(
        "exllamav2",
        kv_cache={"mode": "q4", "max_seq_len": 4096, "size_tokens": 16384},
        batching={"max_concurrent": 8, "prefill_chunk_tokens": 512, "paged": "off"},
        chat_template_file="/t.jinja",
    )
    assert isinstance(cfg, ExLlamaV2ModelConfig)
    assert cfg.kv_cache.mode == "q4" and cfg.batching.paged == "off"


def test_v3_table() -> None:
    cfg = parse("exllamav3", kv_cache={"k_bits": 4, "v_bits": 6})
    assert isinstance(cfg, ExLlamaV3ModelConfig)
    assert cfg.kv_cache.label == "k4v6"
    assert isinstance(parse("exllamav3"), ExLlamaV3ModelConfig)


def test_v3_host_tier_is_the_generator_s_cpu_cache() -> None:
    """``host_cache_bytes`` becomes exllamav3's ``cpu_cache_size``; a Generator without that
    parameter (an older exllamav3) fails the load instead of running without the tier."""
    from backends.exllamav3.model import host_tier

    cfg = parse("exllamav3", kv_cache={"host_cache_bytes": 1 << 30})
    assert isinstance(cfg, ExLlamaV3ModelConfig) and cfg.kv_cache.host_cache_bytes == 1 << 30

    def new(model: object, cache: object, cpu_cache_size: int = 0) -> None: ...

    def old(model: object, cache: object) -> None: ...

    assert host_tier(new, 1 << 30) == {"cpu_cache_size": 1 << 30}
    assert host_tier(old, 0) == {} and host_tier(new, 0) == {}
    with pytest.raises(RuntimeError, match="cpu_cache_size"):
        host_tier(old, 1 << 30)


@pytest.mark.parametrize(
    ("backend", "table", "expected"),
    [
        ("exllamav2", {"kv_cache": {"mode": "q5"}}, "models.m.kv_cache.mode"),
        ("exllamav2", {"kv_cache": {"size_tokens": 1000}}, "multiple of 256"),
        ("exllamav2", {"kv_cache": {"k_bits": 4, "v_bits": 4}}, "models.m.kv_cache.k_bits"),
        ("exllamav3", {"kv_cache": {"mode": "q4"}}, "models.m.kv_cache.mode"),
        ("exllamav3", {"kv_cache": {"k_bits": 4}}, "both k_bits and v_bits"),
        ("exllamav3", {"kv_cache": {"k_bits": 1, "v_bits": 4}}, "models.m.kv_cache.k_bits"),
        ("exllamav3", {"kv_cache": {"k_bits": 4, "v_bits": 9}}, "models.m.kv_cache.v_bits"),
        ("exllamav3", {"batching": {"prefill_chunk_tokens": 300}}, "multiple of 256"),
        ("exllamav3", {"batching": {"paged": "on"}}, "models.m.batching.paged"),
        ("exllamav2", {"batching": {"paged": "maybe"}}, "models.m.batching.paged"),
        ("exllamav2", {"kv_cache": {"max_seq_len": 100}}, "models.m.kv_cache.max_seq_len"),
        ("exllamav2", {"model_dirr": "/x"}, "models.m.model_dirr"),
    ],
)
def test_rejected(backend: str, table: dict[str, Any], expected: str) -> None:
    assert any(expected in p for p in problems(backend, **table)), problems(backend, **table)


def test_cache_smaller_than_context_is_rejected() -> None:
    found = problems("exllamav2", kv_cache={"max_seq_len": 8192, "size_tokens": 4096})
    assert any("models.m.kv_cache" in p and "size_tokens = 4096" in p for p in found), found


def test_model_dir_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": {"m": {"backend": "exllamav3"}}}, "t")
    # model_dir, or a Hub repo (hf) in its place
    assert any(p.startswith("models.m") and "model_dir" in p for p in info.value.problems)


@pytest.mark.parametrize("backend", ["exllamav2", "exllamav3"])
def test_revision_goes_with_hf(backend: str) -> None:
    found = problems(backend, revision="4.0bpw")
    assert any("revision goes with hf" in p for p in found), found
    raw = {"models": {"m": {"backend": backend, "hf": "org/repo-exl2", "revision": "4.0bpw"}}}
    model = parse_config(raw, "t").models["m"]
    assert isinstance(model, ExllamaModelConfig) and model.revision == "4.0bpw"


def test_plan_paged_defaults_to_one_context_of_cache() -> None:
    cfg = parse("exllamav2", batching={"max_concurrent": 6})
    assert plan_engine(cfg, 4096, paged=True) == EnginePlan(
        max_seq_len=4096, cache_tokens=4096, max_batch_size=6, chunk_tokens=2048, paged=True
    )


def test_plan_paged_with_sizes() -> None:
    cfg = parse("exllamav2", kv_cache={"max_seq_len": 3000, "size_tokens": 32768})
    p = plan_engine(cfg, 131072, paged=True)
    assert (p.max_seq_len, p.cache_tokens, p.chunk_tokens) == (3000, 32768, 2048)


def test_plan_unpaged_runs_one_sequence() -> None:
    cfg = parse("exllamav2", kv_cache={"size_tokens": 8192}, batching={"max_concurrent": 8})
    p = plan_engine(cfg, 2000, paged=False)
    assert p.max_batch_size == p.max_concurrent == 1
    assert (p.max_seq_len, p.cache_tokens) == (2000, 2048), "one sequence's worth of cache"
    cfg = parse("exllamav2", kv_cache={"size_tokens": 1024})
    p = plan_engine(cfg, 4096, paged=False)
    assert (p.max_seq_len, p.cache_tokens) == (1024, 1024), "size_tokens caps the context"


def test_plan_spare_tokens_stay_inside_the_cache() -> None:
    p = plan_engine(parse("exllamav3"), 2048, paged=True, spare_tokens=1)
    assert p.cache_tokens == 2304 and p.max_seq_len == 2048
    cfg = parse("exllamav3", kv_cache={"max_seq_len": 1024, "size_tokens": 1024})
    p = plan_engine(cfg, 2048, paged=True, spare_tokens=1)
    assert (p.max_seq_len, p.cache_tokens) == (1023, 1024)


def test_plan_chunk_never_exceeds_the_context() -> None:
    cfg = parse("exllamav3", batching={"prefill_chunk_tokens": 4096})
    assert plan_engine(cfg, 1000, paged=True).chunk_tokens == 768
    assert plan_engine(cfg, 300, paged=True).chunk_tokens == 256


def test_plan_context_shorter_than_a_page() -> None:
    with pytest.raises(ValueError, match="shorter than one cache page"):
        plan_engine(parse("exllamav2"), 128, paged=True)


def test_round_up_to_page() -> None:
    assert [round_up_to_page(n) for n in (1, 256, 257, 2048)] == [256, 256, 512, 2048]


def test_decide_paged() -> None:
    assert decide_paged("auto", True) is True
    assert decide_paged("auto", False) is False
    assert decide_paged("off", True) is False
    assert decide_paged("on", True) is True
    with pytest.raises(EngineError, match="flash-attn"):
        decide_paged("on", False)


def test_model_batch_size_satisfies_the_generator_check() -> None:
    # ExLlamaV2DynamicGenerator asserts max_batch_size * max_input_len >= batch * max_q_size (8)
    for batch, chunk in [(1, 256), (8, 256), (64, 256), (256, 2048), (33, 512)]:
        p = EnginePlan(4096, 4096, batch, chunk, True)
        assert model_batch_size(p) * chunk >= batch * 8
    assert model_batch_size(EnginePlan(4096, 4096, 8, 2048, True)) == 1
