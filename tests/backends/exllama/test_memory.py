"""The ExLlama memory estimate from config.json and safetensors headers (no library, no GPU)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from backends._exllama.config import ExllamaModelConfig
from backends._exllama.memory import safetensors_bytes
from backends.exllamav2 import factory as v2
from backends.exllamav3 import factory as v3
from gateway.backend import EstimatesMemory
from gateway.config import parse_config

HF = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """``name: (dtype, shape, bytes)`` with zero data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(HF))
    write_safetensors(
        tmp_path / "model-00001.safetensors",
        {"model.embed_tokens.weight": ("F16", [100, 64], 12800)},
    )
    write_safetensors(
        tmp_path / "model-00002.safetensors",
        {
            "model.layers.0.self_attn.q_proj.q_weight": ("I32", [64, 8], 2048),
            "model.layers.1.self_attn.q_proj.q_weight": ("I32", [64, 8], 2048),
            "lm_head.weight": ("F16", [100, 64], 12800),
        },
    )
    return tmp_path


def parse(backend: str, model_dir: Path, **table: Any) -> ExllamaModelConfig:
    raw = {"backend": backend, "model_dir": str(model_dir), **table}
    cfg = parse_config({"models": {"m": raw}}, "<test>").models["m"]
    assert isinstance(cfg, ExllamaModelConfig)
    return cfg


def test_safetensors_header(model_dir: Path) -> None:
    assert safetensors_bytes(model_dir / "model-00001.safetensors") == (12800, 12800)
    assert safetensors_bytes(model_dir / "model-00002.safetensors") == (16896, 0)


def test_v2_estimate(model_dir: Path) -> None:
    assert isinstance(v2, EstimatesMemory)
    est = v2.memory_estimate(parse("exllamav2", model_dir), 1)
    assert est.weights_bytes == 12800 + 16896
    # 1024 cache tokens x 2 layers x 2 KV heads x 16 dims x (K + V) x 2 bytes
    assert est.kv_cache_bytes == 1024 * 2 * 2 * 16 * 2 * 2
    assert est.host_bytes == 12800 and est.gpu_bytes == (est.total_bytes - 12800,)
    q4 = v2.memory_estimate(parse("exllamav2", model_dir, kv_cache={"mode": "q4"}), 1)
    assert q4.kv_cache_bytes == int(est.kv_cache_bytes * (0.5 + 2 / 32) / 2)
    on_host = v2.memory_estimate(parse("exllamav2", model_dir), 0)
    assert on_host.gpu_bytes == () and on_host.host_bytes == on_host.total_bytes


def test_v3_estimate_and_options(model_dir: Path) -> None:
    assert isinstance(v3, EstimatesMemory)
    cfg = parse("exllamav3", model_dir, kv_cache={"k_bits": 4, "v_bits": 6})
    est = v3.memory_estimate(cfg, 2)
    # one spare position rounds the cache up to 1280 tokens
    assert est.kv_cache_bytes == int(1280 * 2 * 2 * 16 * ((0.5 + 2 / 32) + (0.75 + 2 / 32)))
    assert est.gpu_bytes[1] == 0 and "K 4-bit, V 6-bit" in est.kv_cache_shape
    fp16 = v3.memory_estimate(parse("exllamav3", model_dir), 1)
    assert [o.setting for o in fp16.options] == ["kv_cache (8-bit cache)", "kv_cache.size_tokens"]
    tiered = v3.memory_estimate(parse("exllamav3", model_dir, kv_cache={"host_cache_bytes": 99}), 1)
    assert tiered.host_bytes == fp16.host_bytes + 99  # the host page tier, on the host


def test_unreadable_model_dirs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        v2.memory_estimate(parse("exllamav2", tmp_path), 1)
    (tmp_path / "config.json").write_text(json.dumps(HF))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        v2.memory_estimate(parse("exllamav2", tmp_path), 1)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json"):
        v2.memory_estimate(parse("exllamav2", tmp_path), 1)
    (tmp_path / "config.json").write_text(json.dumps(HF))
    (tmp_path / "x.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="not a safetensors file"):
        v2.memory_estimate(parse("exllamav2", tmp_path), 1)


DRAFT_HF = {**HF, "num_hidden_layers": 1, "num_key_value_heads": 1, "intermediate_size": 64}


@pytest.fixture
def draft_dir(tmp_path: Path) -> Path:
    path = tmp_path / "draft"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(DRAFT_HF))
    write_safetensors(
        path / "model.safetensors",
        {
            "model.embed_tokens.weight": ("F16", [100, 64], 12800),
            "model.layers.0.self_attn.q_proj.q_weight": ("I32", [64, 4], 1024),
        },
    )
    return path


@pytest.mark.parametrize("backend", ["exllamav2", "exllamav3"])
def test_a_draft_model_is_counted(backend: str, model_dir: Path, draft_dir: Path) -> None:
    """Its weights, a cache of the main cache's tokens and format, and its compute buffers."""
    factories: dict[str, EstimatesMemory] = {"exllamav2": v2, "exllamav3": v3}
    factory = factories[backend]
    kv = {"mode": "q8"} if backend == "exllamav2" else {"k_bits": 8, "v_bits": 8}
    spec = {"mode": "draft", "draft_model_dir": str(draft_dir), "num_draft_tokens": 4}
    plain = factory.memory_estimate(parse(backend, model_dir, kv_cache=kv), 1)
    ngram = parse(backend, model_dir, kv_cache=kv, speculative={"mode": "ngram"})
    drafted = parse(backend, model_dir, kv_cache=kv, speculative=spec)
    est = factory.memory_estimate(drafted, 1)
    assert est.weights_bytes == plain.weights_bytes + 12800 + 1024
    # the same cache tokens as n-gram drafting (4 more positions for the drafts), for 1 layer x
    # 1 KV head x 16 dims x (K + V) x 8 bits with a 16-bit scale per 32 values
    cache_tokens = 1280
    with_room = factory.memory_estimate(ngram, 1)
    # v2: 1024 tokens grow to 1280; v3's one spare position had rounded them up already
    assert with_room.kv_cache_bytes > plain.kv_cache_bytes or backend == "exllamav3"
    per_token = 1 * 1 * 16 * 2 * (1 + 2 / 32)
    assert est.kv_cache_bytes == with_room.kv_cache_bytes + int(cache_tokens * per_token)
    assert est.compute_bytes > with_room.compute_bytes
    assert est.host_bytes == plain.host_bytes + 12800  # the draft's token embeddings
    assert est.gpu_bytes == (est.total_bytes - est.host_bytes,)
    assert "draft model" in est.kv_cache_shape
