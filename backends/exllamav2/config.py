"""The ``[models.<name>]`` table of an ExLlamaV2 (EXL2 or fp16 HF) model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from backends._exllama.config import (
    ExllamaBatching,
    ExllamaKVCache,
    ExllamaModelConfig,
    ExllamaSpeculative,
)

#: ExLlamaV2's cache classes: FP16, and Q8/Q6/Q4 (grouped quantization of keys and values).
CacheMode = Literal["fp16", "q8", "q6", "q4"]


class ExLlamaV2KVCache(ExllamaKVCache):
    mode: CacheMode = "fp16"


class ExLlamaV2Batching(ExllamaBatching):
    #: Paged attention (continuous batching of up to ``max_concurrent`` sequences) needs
    #: flash-attn >= 2.5.7. "auto": paged when it is installed, else one sequence at a time.
    paged: Literal["auto", "on", "off"] = "auto"


class ExLlamaV2Speculative(ExllamaSpeculative):
    """``mode = "ngram"`` is the generator's ``use_ngram_draft`` (an n-gram trie per job)."""

    #: Longest n-gram matched against the sequence (the generator's ``max_ngram``).
    ngram_max: int = Field(4, ge=2, le=16)


class ExLlamaV2ModelConfig(ExllamaModelConfig):
    backend: str = "exllamav2"
    kv_cache: ExLlamaV2KVCache = ExLlamaV2KVCache()
    batching: ExLlamaV2Batching = ExLlamaV2Batching()
    speculative: ExLlamaV2Speculative = ExLlamaV2Speculative()
