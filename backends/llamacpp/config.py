"""The ``[models.<name>]`` table of a llama.cpp model, validated by pydantic.

Every error names its key (``models.<name>.kv_cache.type_k: ...``); cross-field rules are
checked here, before any model file is opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gateway.config import BatchingConfig, FilePath, KVCacheConfig, ModelConfig
from gateway.output.formats import ToolFormatName

KVType = Literal["f16", "q8_0", "q4_0"]

#: llama.cpp's LLAMA_MAX_SEQ (llama_max_parallel_sequences()).
MAX_SEQUENCES = 256

#: ggml_type ids of the K/V cache types this backend offers (ggml.h).
GGML_TYPE_IDS: dict[str, int] = {"f16": 1, "q4_0": 2, "q8_0": 8}


def default_threads() -> int:
    """Decode threads: the cores this process may use, at most 4.

    Token generation on a small model is memory-bound; past ~4 threads it gains little and on a
    shared machine extra threads only contend (OpenMP spin-waits). Set ``n_threads`` to override.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class LlamaCppKVCache(KVCacheConfig):
    """KV cache policy: sizes, K/V types, prefix reuse and the LRU of finished prefixes."""

    #: Tokens one sequence may hold (prompt + completion): the model's context length as
    #: clients see it. Capped by the model's training context at load time.
    n_ctx_per_slot: int = Field(2048, ge=16)
    #: Total KV cells shared by all sequences (live and cached). Default: slots x per-slot,
    #: so live sequences can always grow to their limit (cached prefixes are evicted first).
    n_ctx: int | None = Field(None, ge=16)
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    #: Place a new request on the cached sequence sharing its longest prompt prefix and
    #: prefill only the rest.
    prefix_reuse: bool = True
    #: Finished sequences kept in the cache (beyond the live slots) for later reuse, LRU.
    cached_prefixes: int = Field(8, ge=0, le=240)
    #: Shortest shared prefix (tokens) worth reusing.
    min_prefix_tokens: int = Field(16, ge=1)
    #: Host memory (bytes) for cached prefixes evicted from the KV cells; what it evicts in
    #: turn goes to the disk tier. 0: no host tier.
    host_cache_bytes: int = Field(0, ge=0)
    #: Disk space (bytes) for cached prefixes, kept across restarts; 0: no disk tier.
    disk_cache_bytes: int = Field(0, ge=0)
    #: Where the disk tier keeps its files (one folder per model fingerprint); default:
    #: ``$XDG_CACHE_HOME/gateway/kv`` (``~/.cache/gateway/kv``).
    disk_cache_dir: FilePath | None = None

    def disk_dir(self) -> Path:
        if self.disk_cache_dir is not None:
            return self.disk_cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "gateway" / "kv"


class LlamaCppBatching(BatchingConfig):
    """Admission limits (core) plus the engine's step budget and threads.

    ``max_concurrent`` is also the number of live slots in the engine.
    """

    #: Prompt tokens processed per decode step, across all sequences in prefill: bounds
    #: how long running streams wait for one step while a long prompt is read.
    prefill_chunk_tokens: int = Field(256, ge=16, le=8192)
    n_threads: int = Field(default_factory=default_threads, ge=1, le=512)
    #: Threads for prompt processing (batches of many tokens); default: ``n_threads``.
    n_threads_batch: int | None = Field(None, ge=1, le=512)


class LlamaCppConfig(ModelConfig):
    backend: str = "llamacpp"
    model_path: FilePath
    #: A Jinja chat template file overriding the GGUF's ``tokenizer.chat_template``.
    chat_template_file: FilePath | None = None
    #: How the model writes tool calls (default: detected from the chat template).
    tool_format: ToolFormatName | None = None
    #: Steer constrained answers (JSON, forced tool calls) to finish within ``max_tokens``
    #: (:mod:`gateway.output.finish`); off: they may be cut off (``length``), as elsewhere.
    budget_steering: bool = True
    #: Limits for rendering the chat template.
    template_render_timeout_s: float = Field(1.0, gt=0, le=60)
    template_max_output_bytes: int = Field(4_000_000, ge=1024)
    kv_cache: LlamaCppKVCache = LlamaCppKVCache()
    batching: LlamaCppBatching = LlamaCppBatching()
    #: Layers offloaded to the GPU: -1 = all (ignored on a CPU-only build).
    n_gpu_layers: int = Field(-1, ge=-1)
    #: Flash attention: "auto" lets llama.cpp decide; quantized V cache needs it on.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    main_gpu: int = Field(0, ge=0)
    #: Fraction of the model per GPU, e.g. [0.5, 0.5]; empty = llama.cpp's default split.
    tensor_split: tuple[float, ...] = ()
    #: An embedding model: serves ``/v1/embeddings`` only (every model serves it; this one
    #: serves nothing else, and its whole input is run in one batch, as encoders need).
    embeddings: bool = False
    #: How token vectors become one embedding; default: the GGUF's ``<arch>.pooling_type``,
    #: else "mean".
    pooling: Literal["mean", "cls", "last"] | None = None
    #: Scale embeddings to unit length (as OpenAI's are).
    normalize_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> LlamaCppConfig:
        kv = self.kv_cache
        quantized = [k for k in ("type_k", "type_v") if getattr(kv, k) != "f16"]
        if quantized and self.flash_attn == "off":
            raise ValueError(
                f"kv_cache.{quantized[0]} = {getattr(kv, quantized[0])!r} needs flash "
                "attention in llama.cpp: set flash_attn = 'on' (or 'auto')"
            )
        need = kv.n_ctx_per_slot * self.batching.max_concurrent
        if kv.n_ctx is not None and kv.n_ctx < need:
            raise ValueError(
                f"kv_cache.n_ctx = {kv.n_ctx} is less than batching.max_concurrent x "
                f"kv_cache.n_ctx_per_slot = {need}: live sequences could run out of KV cells"
            )
        n_seq = self.batching.max_concurrent + (kv.cached_prefixes if kv.prefix_reuse else 0)
        if n_seq > MAX_SEQUENCES:
            raise ValueError(
                f"batching.max_concurrent + kv_cache.cached_prefixes = {n_seq}: llama.cpp runs "
                f"at most {MAX_SEQUENCES} sequences in one context"
            )
        if any(x < 0 for x in self.tensor_split) or (
            self.tensor_split and sum(self.tensor_split) <= 0
        ):
            raise ValueError("tensor_split: fractions must be >= 0 with a positive sum")
        return self

    @property
    def n_ctx_total(self) -> int:
        kv = self.kv_cache
        return kv.n_ctx or kv.n_ctx_per_slot * self.batching.max_concurrent

    @property
    def n_threads_batch(self) -> int:
        return self.batching.n_threads_batch or self.batching.n_threads

    @property
    def flash_attn_type(self) -> int:
        """llama.cpp's LLAMA_FLASH_ATTN_TYPE_*: auto -1, off 0, on 1."""
        return {"auto": -1, "off": 0, "on": 1}[self.flash_attn]
