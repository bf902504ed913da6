"""Speculative decoding in the ExLlama backends: the ``speculative`` table, what the loaders
pass the generators (over fake libraries), the jobs' extra room, and the engine's draft counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends._exllama.config import EnginePlan, ExllamaModelConfig, plan_engine
from backends._exllama.drafting import check_draft_vocab
from backends._exllama.engine import EngineLoop, JobSpec
from backends.exllamav2 import model as v2_model
from backends.exllamav2.config import ExLlamaV2ModelConfig, ExLlamaV2Speculative
from backends.exllamav3 import model as v3_model
from backends.exllamav3.config import ExLlamaV3ModelConfig, ExLlamaV3Speculative
from gateway.config import parse_config
from gateway.errors import ConfigError, EngineError
from gateway.types import SamplingParams
from tests.backends.exllama import fake_libs
from tests.backends.exllama.fakes import PAGE, FakeGenerator, FakeModel, plan, words
from tests.backends.exllama.test_engine import spec, submit, wait_until

pytestmark = pytest.mark.timeout(30)


def parse(backend: str, **speculative: Any) -> ExllamaModelConfig:
    table = {"backend": backend, "model_dir": "/models/m", "speculative": speculative}
    model = parse_config({"models": {"m": table}}, "t").models["m"]
    assert isinstance(model, ExllamaModelConfig)
    return model


def problems(backend: str, **speculative: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(backend, **speculative)
    return info.value.problems


# ---- the table ----


@pytest.mark.parametrize("backend", ["exllamav2", "exllamav3"])
def test_off_by_default(backend: str) -> None:
    cfg = parse(backend)
    assert cfg.speculative.mode == "off" and cfg.speculative.draft_tokens == 0
    assert plan_engine(cfg, 4096, paged=True).draft_tokens == 0


def test_version_tables() -> None:
    v2 = parse("exllamav2", mode="ngram", num_draft_tokens=6, ngram_max=5)
    assert isinstance(v2.speculative, ExLlamaV2Speculative)
    assert (v2.speculative.draft_tokens, v2.speculative.ngram_max) == (6, 5)
    v3 = parse("exllamav3", mode="draft", draft_model_dir="/models/d", ngram_min=3)
    assert isinstance(v3.speculative, ExLlamaV3Speculative)
    assert str(v3.speculative.draft_model_dir) == "/models/d" and v3.speculative.draft_tokens == 4


@pytest.mark.parametrize(
    ("backend", "table", "expected"),
    [
        ("exllamav2", {"mode": "medusa"}, "models.m.speculative.mode"),
        ("exllamav3", {"mode": "eagle"}, "models.m.speculative.mode"),
        ("exllamav2", {"mode": "draft"}, 'draft_model_dir goes with mode = "draft"'),
        ("exllamav3", {"mode": "ngram", "draft_model_dir": "/d"}, "draft_model_dir goes with"),
        ("exllamav2", {"mode": "ngram", "num_draft_tokens": 0}, "speculative.num_draft_tokens"),
        ("exllamav3", {"num_draft_tokens": 33}, "models.m.speculative.num_draft_tokens"),
        ("exllamav2", {"ngram_min": 2}, "models.m.speculative.ngram_min"),  # v3's knob
        ("exllamav3", {"ngram_max": 4}, "models.m.speculative.ngram_max"),  # v2's knob
        ("exllamav3", {"draft_model_path": "/d.gguf"}, "speculative.draft_model_path"),
    ],
)
def test_rejected(backend: str, table: dict[str, Any], expected: str) -> None:
    found = problems(backend, **table)
    assert any(expected in p and "models.m.speculative" in p for p in found), found


def test_plan_keeps_room_for_the_drafts() -> None:
    """Both libraries end a drafting job ``num_draft_tokens`` early and let its last drafts
    use the cache past it: jobs are made that much longer, and the cache keeps the room."""
    cfg = parse("exllamav2", mode="ngram", num_draft_tokens=5)
    p = plan_engine(cfg, 4096, paged=True)
    assert (p.max_seq_len, p.cache_tokens, p.draft_tokens) == (4096, 4352, 5)
    table = {"kv_cache": {"max_seq_len": 2048, "size_tokens": 2048}}
    raw = {"backend": "exllamav3", "model_dir": "/m", "speculative": {"mode": "ngram"}, **table}
    sized = parse_config({"models": {"m": raw}}, "t").models["m"]
    assert isinstance(sized, ExllamaModelConfig)
    p = plan_engine(sized, 4096, paged=True, spare_tokens=1)
    assert (p.max_seq_len, p.cache_tokens) == (2048 - 4 - 1, 2048), "the context gives way"
    p = plan_engine(sized, 4096, paged=False)
    assert p.max_seq_len + p.draft_tokens <= p.cache_tokens


def test_v2_q_size_fits_the_drafts() -> None:
    for drafts, batch, chunk in [(0, 8, 256), (4, 8, 256), (12, 64, 256), (32, 256, 2048)]:
        p = EnginePlan(4096, 8192, batch, chunk, True, draft_tokens=drafts)
        assert v2_model.q_size(p) >= max(8, drafts + 1)
        assert v2_model.model_batch_size(p) * chunk >= batch * v2_model.q_size(p)


def test_draft_vocab() -> None:
    check_draft_vocab(152064, 151936)  # a padded vocabulary on the model's side
    check_draft_vocab(None, 1000)
    with pytest.raises(EngineError, match=r"speculative\.draft_model_dir"):
        check_draft_vocab(32000, 32064)


# ---- the loaders, over fake libraries ----


def v2_config(tmp_path: Path, **table: Any) -> ExLlamaV2ModelConfig:
    (tmp_path / "draft").mkdir(exist_ok=True)
    table = {
        "kv_cache": {"max_seq_len": 2048, "size_tokens": 8192, "mode": "q4"},
        "batching": {"max_concurrent": 8},
        **table,
    }
    return ExLlamaV2ModelConfig(model_dir=tmp_path, **table)


def load_v2(
    monkeypatch: pytest.MonkeyPatch,
    config: ExLlamaV2ModelConfig,
    configs: dict[str, dict[str, Any]] | None = None,
) -> tuple[v2_model.ExLlamaV2Model, fake_libs.Record]:
    record = fake_libs.Record()
    fake_libs.install(monkeypatch, fake_libs.v2(record, configs or {}))
    return v2_model.load("m", config), record


def job_spec(max_new: int = 10) -> JobSpec:
    return JobSpec((5, 6, 7), max_new, SamplingParams(), (2,))


def test_v2_off_passes_no_drafting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, record = load_v2(monkeypatch, v2_config(tmp_path))
    args = record.generator
    assert args["max_q_size"] == 8
    assert not {"draft_model", "use_ngram_draft", "num_draft_tokens"} & set(args)
    loaded.make_job(job_spec(10), 1)
    assert record.jobs[0]["max_new_tokens"] == 10
    assert "speculative" not in loaded.describe()


def test_v2_ngram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"mode": "ngram", "num_draft_tokens": 5, "ngram_max": 6}
    loaded, record = load_v2(monkeypatch, v2_config(tmp_path, speculative=spec))
    args = record.generator
    assert args["use_ngram_draft"] is True and args["max_ngram"] == 6
    assert args["num_draft_tokens"] == 5 and args["max_q_size"] == 8
    assert "draft_model" not in args and len(record.models) == 1
    (model,) = record.models
    assert model.config.max_seq_len == loaded.plan.max_seq_len + 5
    loaded.make_job(job_spec(10), 1)
    assert record.jobs[0]["max_new_tokens"] == 15, "the library stops 5 short when drafting"
    assert "5 tokens from n-grams" in loaded.describe()


def test_v2_draft_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"mode": "draft", "draft_model_dir": str(tmp_path / "draft"), "num_draft_tokens": 12}
    config = v2_config(tmp_path, speculative=spec)
    configs = {str(tmp_path / "draft"): {"vocab_size": 900, "max_seq_len": 32768}}
    loaded, record = load_v2(monkeypatch, config, configs)
    draft, main = record.models  # the draft first
    assert draft.config.model_dir == str(tmp_path / "draft")
    assert main.config.model_dir == str(tmp_path)
    draft_cache, cache = record.caches
    assert type(draft_cache).__name__ == type(cache).__name__ == "ExLlamaV2Cache_Q4"
    assert draft_cache.max_seq_len == cache.max_seq_len == loaded.plan.cache_tokens
    assert draft.load_args is not None and draft.load_args["cache"] is draft_cache
    for key in ("max_seq_len", "max_input_len", "max_attention_size", "max_batch_size"):
        assert getattr(draft.config, key) == getattr(main.config, key), key
    args = record.generator
    assert args["draft_model"] is draft and args["draft_cache"] is draft_cache
    assert args["num_draft_tokens"] == 12 and args["max_q_size"] == 13
    assert "use_ngram_draft" not in args
    # the generator's check: max_batch_size * max_input_len >= batch * max_q_size
    assert main.config.max_batch_size * main.config.max_input_len >= 8 * 13
    loaded.make_job(job_spec(10), 1)
    assert record.jobs[0]["max_new_tokens"] == 22
    loaded.unload()
    assert main.unloaded and draft.unloaded


def test_v2_draft_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"mode": "draft", "draft_model_dir": str(tmp_path / "draft")}
    draft = str(tmp_path / "draft")
    with pytest.raises(EngineError, match="vocabulary"):
        load_v2(monkeypatch, v2_config(tmp_path, speculative=spec), {draft: {"vocab_size": 1200}})
    # a draft model without flash-attn runs the pair unpaged, or refuses paged = "on"
    loaded, _ = load_v2(
        monkeypatch, v2_config(tmp_path, speculative=spec), {draft: {"no_flash_attn": True}}
    )
    assert not loaded.plan.paged
    on = v2_config(tmp_path, speculative=spec, batching={"max_concurrent": 8, "paged": "on"})
    with pytest.raises(EngineError, match="draft model"):
        load_v2(monkeypatch, on, {draft: {"no_flash_attn": True}})


def test_v2_a_failed_load_unloads_the_draft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {"mode": "draft", "draft_model_dir": str(tmp_path / "draft")}
    record = fake_libs.Record()
    lib = fake_libs.v2(record, {})

    def broken(**kw: Any) -> None:
        raise RuntimeError("no room")

    lib.generator.ExLlamaV2DynamicGenerator = broken
    fake_libs.install(monkeypatch, lib)
    with pytest.raises(RuntimeError, match="no room"):
        v2_model.load("m", v2_config(tmp_path, speculative=spec))
    assert all(m.unloaded for m in record.models) and len(record.models) == 2


def v3_config(tmp_path: Path, **table: Any) -> ExLlamaV3ModelConfig:
    (tmp_path / "draft").mkdir(exist_ok=True)
    kv = {"max_seq_len": 2048, "size_tokens": 8192, "k_bits": 4, "v_bits": 6}
    return ExLlamaV3ModelConfig(model_dir=tmp_path, kv_cache=kv, **table)


def load_v3(
    monkeypatch: pytest.MonkeyPatch, config: ExLlamaV3ModelConfig, *, ngram: bool = True
) -> tuple[v3_model.ExLlamaV3Model, fake_libs.Record]:
    record = fake_libs.Record()
    fake_libs.install(monkeypatch, fake_libs.v3(record, {}, ngram=ngram))
    return v3_model.load("m", config), record


def test_v3_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, record = load_v3(monkeypatch, v3_config(tmp_path))
    args = record.generator
    assert args["draft_model"] is None and args["num_draft_tokens"] is None
    assert args["ngram_match_min"] == 0
    loaded.make_job(job_spec(10), 1)
    assert record.jobs[0]["max_new_tokens"] == 10


def test_v3_ngram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"mode": "ngram", "num_draft_tokens": 6, "ngram_min": 3}
    loaded, record = load_v3(monkeypatch, v3_config(tmp_path, speculative=spec))
    args = record.generator
    assert args["ngram_match_min"] == 3 and args["num_draft_tokens"] == 6
    assert args["draft_model"] is None and len(record.models) == 1
    assert loaded.plan.cache_tokens >= loaded.plan.max_seq_len + 6 + v3_model.SPARE_TOKENS
    loaded.make_job(job_spec(10), 1)
    assert record.jobs[0]["max_new_tokens"] == 16


def test_v3_ngram_needs_a_generator_that_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match=r'speculative\.mode = "ngram".*ngram_match_min'):
        load_v3(monkeypatch, v3_config(tmp_path, speculative={"mode": "ngram"}), ngram=False)


def test_v3_draft_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"mode": "draft", "draft_model_dir": str(tmp_path / "draft"), "num_draft_tokens": 3}
    loaded, record = load_v3(monkeypatch, v3_config(tmp_path, speculative=spec))
    draft, main = record.models
    assert draft.config.model_dir == str(tmp_path / "draft")
    draft_cache, cache = record.caches
    assert draft_cache.model is draft and cache.model is main
    assert draft_cache.max_num_tokens == cache.max_num_tokens == loaded.plan.cache_tokens
    assert draft_cache.layer_type == cache.layer_type == "quant"
    assert draft_cache.bits == cache.bits == {"k_bits": 4, "v_bits": 6}
    assert draft.load_args is not None and main.load_args is not None
    assert draft.load_args["callback"].model == "m (draft model)"
    del draft.load_args["callback"], main.load_args["callback"]
    assert draft.load_args == main.load_args  # the same chunk and batch sizes
    args = record.generator
    assert args["draft_model"] is draft and args["draft_cache"] is draft_cache
    assert args["num_draft_tokens"] == 3 and args["ngram_match_min"] == 0
    loaded.unload()
    assert main.unloaded and draft.unloaded


# ---- the engine's counts ----


def test_engine_counts_drafted_and_accepted_tokens() -> None:
    """From the jobs' own counters, however a job leaves: its end, a stop string, a cancel.
    Each fake decode step verifies 3 drafts and accepts 2."""
    gen = FakeGenerator(max_batch_size=4, max_pages=64, drafts=(2, 1), step_delay_s=0.002)
    model = FakeModel(plan(batch=4, cache=64 * PAGE), gen, words("Hello world"))
    engine = EngineLoop(model, "test")
    assert engine.stats().draft_tokens == 0
    engine.start()
    try:
        _, ended = submit(engine, spec())
        ended.wait()
        stats = engine.stats()  # 11 characters and EOS: 12 steps
        assert (stats.draft_tokens, stats.draft_accepted) == (12 * 3, 12 * 2)
        _, stopped = submit(engine, spec(), stops=("lo",))
        stopped.wait()
        stats = engine.stats()  # "Hello": 5 steps
        assert (stats.draft_tokens, stats.draft_accepted) == (17 * 3, 17 * 2)
        ticket, cancelled = submit(engine, spec())
        wait_until(lambda: bool(cancelled.items))
        engine.cancel(ticket)
        wait_until(lambda: engine.stats().cancelled == 1)
        stats = engine.stats()
        steps = stats.draft_tokens // 3 - 17
        assert 1 <= steps <= 12 and stats.draft_tokens % 3 == 0
        assert stats.draft_accepted == (17 + steps) * 2
    finally:
        engine.stop(timeout_s=5)
