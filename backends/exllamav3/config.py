"""The ``[models.<name>]`` table of an ExLlamaV3 (EXL3 or fp16 HF) model."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from backends._exllama.config import (
    ExllamaBatching,
    ExllamaKVCache,
    ExllamaModelConfig,
    ExllamaSpeculative,
)


class ExLlamaV3KVCache(ExllamaKVCache):
    """FP16 by default; ``k_bits``/``v_bits`` (2..8, both or neither) quantize keys and values."""

    k_bits: int | None = Field(None, ge=2, le=8)
    v_bits: int | None = Field(None, ge=2, le=8)
    #: Pinned host memory (bytes) for pages evicted from the GPU cache, restored instead of
    #: prefilled (the generator's own ``cpu_cache_size`` tier; exllamav3 has no disk tier).
    #: 0: off.
    host_cache_bytes: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _both_bits(self) -> Self:
        if (self.k_bits is None) != (self.v_bits is None):
            raise ValueError("set both k_bits and v_bits (quantized cache) or neither (FP16)")
        return self

    @property
    def label(self) -> str:
        return "fp16" if self.k_bits is None else f"k{self.k_bits}v{self.v_bits}"


class ExLlamaV3Speculative(ExllamaSpeculative):
    """``mode = "ngram"`` is the generator's suffix-array n-gram drafting (``ngram_match_min``,
    in exllamav3 since 0.0.31)."""

    #: Shortest match of the sequence's latest tokens, earlier in the sequence, that drafts
    #: the tokens that followed it (the generator's ``ngram_match_min``).
    ngram_min: int = Field(2, ge=1, le=16)


class ExLlamaV3ModelConfig(ExllamaModelConfig):
    backend: str = "exllamav3"
    kv_cache: ExLlamaV3KVCache = ExLlamaV3KVCache()
    batching: ExllamaBatching = ExllamaBatching()
    speculative: ExLlamaV3Speculative = ExLlamaV3Speculative()
