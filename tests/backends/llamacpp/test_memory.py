"""The GGUF memory estimate: header parsing, placement on GPUs, and each term against the buffer
sizes llama.cpp itself logs when it loads SmolLM2 (f16 and q8_0 K/V, 1 and 4 slots)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from backends.llamacpp import LlamaCppBackend, factory
from backends.llamacpp.config import LlamaCppConfig
from backends.llamacpp.gguf_file import read_header
from backends.llamacpp.memory import ModelShape, estimate
from gateway.backend import EstimatesMemory
from gateway.config import parse_config

MiB = 1 << 20


def llama_config(path: Path, **table: Any) -> LlamaCppConfig:
    raw = {"backend": "llamacpp", "model_path": str(path), **table}
    cfg = parse_config({"models": {"m": raw}}, "<test>").models["m"]
    assert isinstance(cfg, LlamaCppConfig)
    return cfg


def write_gguf(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    head_count_kv: int | list[int] = 2,
    n_vocab: int = 100,
    tied: bool = True,
) -> Path:
    """A header-only-sized GGUF (tensors of zeros) to exercise the estimate's arithmetic."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(head_count_kv)
    w.add_key_length(32)
    w.add_value_length(16)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), np.float16))
    w.add_tensor("output_norm.weight", np.zeros(n_embd, np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((n_vocab, n_embd), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_factory_offers_an_estimate(smol_path: Path) -> None:
    assert isinstance(factory, EstimatesMemory)
    est = factory.memory_estimate(llama_config(smol_path), 0)
    assert est.total_bytes == est.host_bytes and est.gpu_bytes == ()


def test_the_host_kv_tier_counts_against_host_memory(smol_path: Path) -> None:
    plain = factory.memory_estimate(llama_config(smol_path), 0)
    tiered = factory.memory_estimate(
        llama_config(smol_path, kv_cache={"host_cache_bytes": 64 << 20}), 0
    )
    assert tiered.host_bytes == plain.host_bytes + (64 << 20)
    assert "host KV tier 64 MiB" in tiered.kv_cache_shape


def test_a_draft_model_is_counted(smol_path: Path, tiny_path: Path) -> None:
    """``gateway plan`` and the lifecycle budget see the draft model's weights, cells and
    graph beside the main model's, placed on the GPUs like a model of its own."""
    spec = {"mode": "draft", "draft_model_path": str(tiny_path)}
    for gpus in (0, 2):
        plain = factory.memory_estimate(llama_config(smol_path), gpus)
        both = factory.memory_estimate(llama_config(smol_path, speculative=spec), gpus)
        alone = factory.memory_estimate(llama_config(tiny_path), gpus)
        assert both.weights_bytes == plain.weights_bytes + alone.weights_bytes
        assert both.kv_cache_bytes == plain.kv_cache_bytes + alone.kv_cache_bytes
        assert both.total_bytes > plain.total_bytes
        assert both.host_bytes + sum(both.gpu_bytes) > plain.host_bytes + sum(plain.gpu_bytes)
        assert "draft model tiny.gguf" in both.kv_cache_shape


def test_smollm2_header(smol_path: Path) -> None:
    header = read_header(smol_path)
    shape = ModelShape.of(header)
    assert shape == ModelShape(30, 576, 9, (3,) * 30, 64, 64, 49152)
    weights = sum(t.nbytes for t in header.tensors)
    assert 0 < smol_path.stat().st_size - weights < 4 * MiB  # the rest is the header


def test_per_layer_kv_heads_and_head_sizes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", head_count_kv=[1, 3])
    shape = ModelShape.of(read_header(path))
    assert shape.n_head_kv == (1, 3) and (shape.head_k, shape.head_v) == (32, 16)
    # f16: per cell, layer 0 holds 1 x (32 + 16) values, layer 1 holds 3 x (32 + 16)
    assert shape.kv_bytes(256, "f16", "f16", range(2)) == 256 * 2 * (48 + 144)
    # q8_0 rows are 34-byte blocks of 32: K 1 block, V 1 block (16 -> padded) for layer 0
    assert shape.kv_bytes(256, "q8_0", "q8_0", [0]) == 256 * 34 * 2
    # a stream per sequence, each padded to 256 cells; one pool of 300, padded to 512
    cfg = llama_config(path, kv_cache={"n_ctx_per_slot": 100}, batching={"max_concurrent": 3})
    assert estimate(cfg, 0).kv_cache_bytes == shape.kv_bytes(3 * 256, "f16", "f16", range(2))
    pool = {"n_ctx_per_slot": 100, "layout": "unified", "cached_prefixes": 0}
    cfg = llama_config(path, kv_cache=pool, batching={"max_concurrent": 3})
    assert estimate(cfg, 0).kv_cache_bytes == shape.kv_bytes(512, "f16", "f16", range(2))


def test_placement_on_gpus(tmp_path: Path) -> None:
    tied = write_gguf(tmp_path / "tied.gguf", n_layer=4)
    embd = 100 * 64 * 4
    layer = 64 * 64 * 2
    one = estimate(llama_config(tied), 1)
    host_only = estimate(llama_config(tied), 0)
    assert one.weights_bytes == host_only.weights_bytes + embd  # the tied output is copied
    # on the host: the embeddings, the logits of 4 sequences (a stream each, no more cached),
    # the inputs for a 512-token micro-batch (embeddings twice, an f16 mask over a stream's
    # 2048 cells)
    assert one.host_bytes == embd + 4 * 100 * 4 + 2 * 4 * 512 * 64 + 2048 * 512 * 2
    assert sum(one.gpu_bytes) + one.host_bytes == one.total_bytes
    split = estimate(llama_config(tied, tensor_split=[1, 3]), 2)
    kv_layer = one.kv_cache_bytes // 4
    assert split.gpu_bytes[0] == layer + kv_layer  # one layer of four on device 0
    assert split.gpu_bytes[1] > 3 * (layer + kv_layer)  # three, the output and the graph
    partial = estimate(llama_config(tied, n_gpu_layers=2), 1)
    assert partial.gpu_bytes[0] == 2 * (layer + kv_layer)  # the last two layers, no output
    assert partial.weights_bytes == host_only.weights_bytes
    untied = estimate(llama_config(write_gguf(tmp_path / "u.gguf", tied=False)), 1)
    assert untied.weights_bytes == estimate(llama_config(tmp_path / "u.gguf"), 0).weights_bytes


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        estimate(llama_config(bad), 0)
    with pytest.raises(ValueError, match=r"missing\.gguf cannot be read"):
        estimate(llama_config(tmp_path / "missing.gguf"), 0)
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="truncated"):
        estimate(llama_config(bad), 0)


# -- against llama.cpp's own numbers ------------------------------------------------------------

_BUFFERS = {
    "weights": re.compile(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"KV buffer size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"compute buffer size =\s*([\d.]+) MiB"),
    "output": re.compile(r"output buffer size =\s*([\d.]+) MiB"),
}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def llama_log() -> Iterator[_Lines]:
    logger = logging.getLogger("backends.llamacpp.llama_cpp")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def reported_sizes(config: LlamaCppConfig, log: _Lines) -> dict[str, float]:
    """The buffer sizes (MiB) llama.cpp logs while the real backend starts ``config``."""
    log.lines.clear()
    backend = LlamaCppBackend("m", config)
    await backend.start()
    await backend.aclose()
    text = "\n".join(log.lines)
    found = {k: [float(x) for x in p.findall(text)] for k, p in _BUFFERS.items()}
    assert all(len(v) == 1 for v in found.values()), found
    return {k: v[0] for k, v in found.items()}


@pytest.mark.parametrize(
    ("kv_type", "slots", "flash_attn", "layout"),
    [
        ("f16", 1, "auto", "unified"),
        ("f16", 4, "auto", "unified"),
        ("q8_0", 1, "on", "unified"),
        ("q8_0", 4, "on", "unified"),
        ("f16", 4, "off", "unified"),
        ("f16", 4, "auto", "per_sequence"),
        ("q8_0", 3, "on", "per_sequence"),
        ("f16", 2, "off", "per_sequence"),
    ],
)
async def test_each_term_against_llama_cpp(
    smol_path: Path, llama_log: _Lines, kv_type: str, slots: int, flash_attn: str, layout: str
) -> None:
    cfg = llama_config(
        smol_path,
        kv_cache={"type_k": kv_type, "type_v": kv_type, "layout": layout},
        batching={"max_concurrent": slots, "n_threads": 1},
        flash_attn=flash_attn,
    )
    est = estimate(cfg, 0)
    got = await reported_sizes(cfg, llama_log)
    terms = {
        "weights": (est.weights_bytes / MiB, got["weights"]),
        "kv": (est.kv_cache_bytes / MiB, got["kv"]),
        "compute": (est.compute_bytes / MiB, got["compute"] + got["output"]),
    }
    print(f"\nSmolLM2 {est.kv_cache_shape}, flash attention {flash_attn}:")
    for term, (mine, theirs) in terms.items():
        error = (mine - theirs) / theirs
        print(f"  {term:8} estimate {mine:8.2f} MiB  llama.cpp {theirs:8.2f} MiB  {error:+.2%}")
        assert abs(mine - theirs) <= 0.01 + 0.05 * theirs, term


def test_block_sizes_are_ggml_s() -> None:
    """From ggml-common.h's static_asserts (the hand-written table had IQ2_S and IQ1_M wrong)."""
    from backends.llamacpp.gguf_file import row_bytes

    assert row_bytes(2, 4096) == 128 * 18  # Q4_0: half + 16 bytes per 32
    assert row_bytes(12, 4096) == 16 * 144  # Q4_K
    assert row_bytes(22, 256) == 2 + 64 + 8 + 8  # IQ2_S: d, qs[QK_K/4], qh[QK_K/32], scales
    assert row_bytes(29, 256) == 32 + 16 + 8  # IQ1_M: qs[QK_K/8], qh[QK_K/16], scales
    with pytest.raises(ValueError, match="unknown ggml tensor type"):
        row_bytes(999, 1)
